"""Can a Checkpointer write into this model directory? Asked before creating one.

The training server asks at start-up and, when the answer is no, serves with checkpointing
disabled and says why, instead of failing: a read-only directory, a Hugging Face cache
snapshot (symbolic links to shared blobs) or a directory holding a journal that may not be
replayed are all fine to serve from.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from checkpoint.guard import LOCK, dir_writable, file_problems
from checkpoint.journal import JournalError, pending
from checkpoint.layout import LayoutError, read_layout


def lock_problem(model_dir: Path) -> str | None:
    try:
        st = os.lstat(model_dir / LOCK)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return f"{LOCK} is not a regular file (a link?): remove it"
    return None


def checkpoint_blockers(model_dir: str | os.PathLike,
                        tensor_names: Iterable[str] | None = None) -> list[str]:
    """Why a Checkpointer could not write into `model_dir` (empty: it can).

    `tensor_names`: the layout names it would write (default: all); only their files count.
    Writes nothing.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return [f"{model_dir} is not a directory"]
    if not dir_writable(model_dir):
        return [f"{model_dir} is read-only"]
    try:
        slots = read_layout(model_dir)
    except (LayoutError, OSError) as exc:
        return [str(exc)]
    wanted = None if tensor_names is None else set(tensor_names)
    problems = file_problems(model_dir, {s.file for n, s in slots.items()
                                         if wanted is None or n in wanted})
    if (p := lock_problem(model_dir)) is not None:
        problems.append(p)
    try:
        pending(model_dir)
    except JournalError as exc:
        problems.append(str(exc))
    return problems
