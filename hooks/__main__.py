"""python -m hooks serve MODEL [vLLM args]   vLLM's `vllm serve` on a tested vLLM
python -m hooks cleanup EXPORT_DIR           remove an export and its shared memory"""

import sys


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "serve":
        from hooks.compat import UnsupportedVllm, serve

        try:
            serve(argv[1:])
        except UnsupportedVllm as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    if len(argv) == 2 and argv[0] == "cleanup":
        from hooks.export import remove_all_exports

        n = remove_all_exports(argv[1])
        print(f"removed {n} export(s) from {argv[1]}", file=sys.stderr)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
