"""Recovery after a crash: the redo journal first (a sync without history), then the history
store (a sync that kept history: undone unless committed), so the files hold one version.

Run by the launcher before vLLM starts (`python -m checkpoint recover`), by every
Checkpointer and before a revert. Writes nothing when there is nothing to do.
"""

from __future__ import annotations

import os
from pathlib import Path

import checkpoint.journal as journal
from checkpoint.commit import leftovers, recover_history
from checkpoint.guard import dir_lock, dir_writable
from checkpoint.history import INDEX, Store, segment_name


def recover_locked(model_dir: Path) -> str:
    """recover() for a caller that holds the directory lock."""
    outcome = journal.recover_locked(model_dir)
    undone = recover_history(model_dir)
    if undone is None:
        return outcome
    return undone if outcome == "clean" else f"{outcome}; {undone}"


def _interrupted_with_history(model_dir: Path) -> bool:
    store = Store(model_dir)
    head = store.load().head["n"] if store.exists() else 0
    return os.path.lexists(store.segment(segment_name(head + 1)) / INDEX)


def recover(model_dir: str | os.PathLike) -> str:
    """Roll an interrupted sync forward or back; returns what was done ("clean" if nothing).

    A read-only directory is left untouched: fine when nothing has to reach the files, an
    error when an interrupted sync still has to be replayed or undone.
    """
    model_dir = Path(model_dir)
    committed = os.path.lexists(model_dir / journal.JOURNAL)
    uncommitted = os.path.lexists(model_dir / journal.JOURNAL_TMP)
    stale = leftovers(model_dir)
    if not dir_writable(model_dir) and stale and not committed:
        if _interrupted_with_history(model_dir):
            raise journal.JournalError(
                f"{model_dir} is read-only but holds an interrupted checkpoint whose changes "
                "must be undone before the weights are loaded: make the directory writable "
                "and run `python -m checkpoint recover` again")
        return "nothing to recover (read-only directory; leftovers of an uncommitted sync " \
               "are harmless)"
    if not dir_writable(model_dir) or (not committed and not uncommitted and not stale):
        return journal.recover(model_dir)
    with dir_lock(model_dir):
        return recover_locked(model_dir)
