"""python -m hooks cleanup EXPORT_DIR: remove an export and its shared memory."""

import sys

from hooks.export import remove_all_exports


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] != "cleanup":
        print("usage: python -m hooks cleanup EXPORT_DIR", file=sys.stderr)
        return 2
    n = remove_all_exports(sys.argv[2])
    print(f"removed {n} export(s) from {sys.argv[2]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
