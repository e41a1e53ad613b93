"""python -m checkpoint verify|recover|log MODEL_DIR
python -m checkpoint revert MODEL_DIR VERSION|original

verify: headers, sizes, index, journal state, the history store (every kept byte against its
CRC), and whether a checkpoint may be written there (no links, no unsafe names, no forged
journal); exit 1 with a message on any problem.
recover: roll an interrupted sync forward or back (the launcher runs it before vLLM starts);
refuses (exit 1) a journal or undo record that would write anywhere but inside this model's
tensors.
log: the versions (what each holds, its size on disk, whether it can still be restored).
revert: make the files that version's, all or nothing, as a new version (stop the training
server first: it holds the files it wrote).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from checkpoint.commit import NEW, leftovers
from checkpoint.guard import dir_writable, write_problem
from checkpoint.history import HistoryError, Regions, Store
from checkpoint.journal import JOURNAL, JOURNAL_TMP, JournalError, pending
from checkpoint.layout import LayoutError, read_layout
from checkpoint.preflight import lock_problem
from checkpoint.recovery import recover
from checkpoint.versions import Blobs, check_head, revert


def verify_history(model_dir: Path, slots) -> list[str]:
    store = Store(model_dir)
    if not os.path.lexists(store.root):
        return []
    problems = []
    try:
        store.check_dirs()
        if any(n.endswith(NEW) for n in os.listdir(model_dir)) or leftovers(model_dir):
            problems.append("an interrupted checkpoint left files behind; run recover")
        if not store.exists():
            return problems
        versions = store.load()
        check_head(versions, slots)
        blobs, regions = Blobs(store), Regions(slots.values())
        try:
            for e in versions.entries:
                if e.get("undo"):
                    for c in store.read_index(e["undo"], regions).chunks:
                        blobs.check(e["undo"], c)
        finally:
            blobs.close()
    except (HistoryError, OSError) as exc:
        problems.append(f"history store: {exc}")
    return problems


def verify(model_dir: Path) -> list[str]:
    problems = []
    slots = {}
    try:
        slots = read_layout(model_dir)
        if not slots:
            problems.append("no tensors found")
    except (LayoutError, OSError) as exc:
        problems.append(str(exc))
    for f in sorted({s.file for s in slots.values()}):
        if (p := write_problem(f)) is not None:
            problems.append(f"cannot checkpoint into it: {p}")
    if (p := lock_problem(model_dir)) is not None:
        problems.append(p)
    if os.path.lexists(model_dir / JOURNAL_TMP):
        problems.append(f"an uncommitted sync was interrupted ({JOURNAL_TMP}); run recover")
    if os.path.lexists(model_dir / JOURNAL):
        try:
            pending(model_dir)
            problems.append(f"a committed sync was interrupted ({JOURNAL}); run recover")
        except JournalError as exc:
            problems.append(str(exc))
    if slots:
        problems += verify_history(model_dir, slots)
    return problems


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def log_lines(model_dir: Path) -> list[str]:
    store = Store(model_dir)
    if not store.exists():
        return [f"{model_dir}: no versions (no checkpoint written with this version of the "
                "checkpointer)"]
    versions = store.load()
    lines = ["version  time                 examples  steps  drift  changed      kept     "
             "  restorable  note"]
    for e in versions.entries:
        drift = (e.get("drift") or {}).get("mean_kl")
        note = e.get("name") or e.get("note") or ""
        restorable = "head" if e is versions.head else \
            "yes" if versions.reachable(e["n"]) else "no"
        if e.get("reverted_to") is None and e.get("parent") not in (None, e["n"] - 1):
            note = f"trained from version {e['parent']} (after a rollback)"
        lines.append(
            f"{e['n']:<7}  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(e['time']))}"
            f"  {e.get('examples', '') !s:>8}  {e.get('optimizer_steps', '') !s:>5}"
            f"  {'' if drift is None else f'{drift:.4f}':>5}"
            f"  {_mib(e['bytes_changed']) if 'bytes_changed' in e else '':>11}"
            f"  {_mib(store.segment_bytes(e['undo'])) if e.get('undo') else '-':>11}"
            f"  {restorable:>10}"
            f"  {note}")
    policy = versions.policy
    keep = "history off" if not policy else \
        f"keep {'all' if policy.get('keep') is None else policy['keep']}, budget " \
        f"{_mib(policy['budget']) if policy.get('budget') else 'none'}, original " \
        f"{'kept' if policy.get('keep_original', True) else 'may be dropped'}"
    lines.append(f"history store: {_mib(store.disk_bytes())} on disk ({keep})")
    return lines


def main(argv: list[str]) -> int:
    commands = {"verify": 2, "recover": 2, "log": 2, "revert": 3}
    if not argv or commands.get(argv[0]) != len(argv):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    model_dir = Path(argv[1])
    if not model_dir.is_dir():
        print(f"error: {model_dir} is not a directory", file=sys.stderr)
        return 2
    try:
        if argv[0] == "recover":
            print(f"{model_dir}: {recover(model_dir)}")
        elif argv[0] == "log":
            print("\n".join(log_lines(model_dir)))
        elif argv[0] == "revert":
            head = Store(model_dir).load().head["n"] if Store(model_dir).exists() else None
            entry = revert(model_dir, argv[2])
            print(f"{model_dir}: already version {argv[2]}" if entry["n"] == head else
                  f"{model_dir}: reverted to version {entry['reverted_to']} (recorded as "
                  f"version {entry['n']})")
    except (RuntimeError, OSError, ValueError) as exc:  # Journal/HistoryError, lock busy
        print(f"error: {model_dir}: {exc}", file=sys.stderr)
        return 1
    if argv[0] != "verify":
        return 0
    problems = verify(model_dir)
    for p in problems:
        print(f"error: {model_dir}: {p}", file=sys.stderr)
    if not problems:
        note = "" if dir_writable(model_dir) else "; read-only: no checkpoint can be written"
        print(f"{model_dir}: ok ({len(read_layout(model_dir))} tensors{note})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
