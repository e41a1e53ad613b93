"""python -m checkpoint verify|recover MODEL_DIR

verify: headers, sizes, index, journal state, and whether a checkpoint may be written there
(no links, no unsafe names, no forged journal); exit 1 with a message on any problem.
recover: roll an interrupted sync forward or back (the launcher runs it before vLLM starts);
refuses (exit 1) a journal that would write anywhere but inside this model's tensors.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from checkpoint.guard import dir_writable, write_problem
from checkpoint.journal import JOURNAL, JOURNAL_TMP, JournalError, pending, recover
from checkpoint.layout import LayoutError, read_layout
from checkpoint.preflight import lock_problem


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
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("verify", "recover"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    model_dir = Path(argv[1])
    if not model_dir.is_dir():
        print(f"error: {model_dir} is not a directory", file=sys.stderr)
        return 2
    if argv[0] == "recover":
        try:
            print(f"{model_dir}: {recover(model_dir)}")
        except (RuntimeError, OSError) as exc:  # JournalError, CheckpointRefused, lock busy
            print(f"error: {model_dir}: {exc}", file=sys.stderr)
            return 1
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
