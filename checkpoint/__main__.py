"""python -m checkpoint verify|recover MODEL_DIR

verify: headers, sizes, index and journal state; exit 1 with a message on any problem.
recover: roll an interrupted sync forward or back (the launcher runs it before vLLM starts).
"""

from __future__ import annotations

import sys
from pathlib import Path

from checkpoint.journal import JOURNAL, JOURNAL_TMP, JournalError, read, recover
from checkpoint.layout import LayoutError, read_layout
from checkpoint.sync import dir_lock


def verify(model_dir: Path) -> list[str]:
    problems = []
    try:
        slots = read_layout(model_dir)
        if not slots:
            problems.append("no tensors found")
    except (LayoutError, OSError, ValueError) as exc:
        problems.append(str(exc))
    if (model_dir / JOURNAL_TMP).exists():
        problems.append(f"an uncommitted sync was interrupted ({JOURNAL_TMP}); run recover")
    if (model_dir / JOURNAL).exists():
        try:
            read(model_dir / JOURNAL)
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
            with dir_lock(model_dir):
                print(f"{model_dir}: {recover(model_dir)}")
        except (JournalError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    problems = verify(model_dir)
    for p in problems:
        print(f"error: {model_dir}: {p}", file=sys.stderr)
    if not problems:
        print(f"{model_dir}: ok ({len(read_layout(model_dir))} tensors)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
