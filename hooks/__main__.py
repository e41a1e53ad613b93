"""python -m hooks serve MODEL [vLLM args]   vLLM's `vllm serve` on a tested vLLM
python -m hooks cleanup EXPORT_DIR           remove an export and its shared memory, and
                                             the files a stopped vLLM left (its rendezvous
                                             file, its CPU tensor-parallel shared memory)
python -m hooks sweep                        stop what killed launchers left behind; print
                                             the directory of launcher records
python -m hooks record FILE ROLE PID [K=V]   add a process to a launcher's record
python -m hooks healthy URL                  exit 0 if URL answers 200 (one try, no proxy:
                                             the launcher needs no curl)"""

import sys


def main(argv: list[str]) -> int:
    if argv[:1] != ["serve"] and {"-h", "--help"} & set(argv):  # serve's help is vLLM's
        print(__doc__)
        return 0
    if len(argv) >= 2 and argv[0] == "serve":
        from hooks.compat import UnsupportedVllm, serve

        try:
            serve(argv[1:])
        except UnsupportedVllm as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    if len(argv) == 2 and argv[0] == "cleanup":
        from hooks.leftovers import clean_export

        n, files = clean_export(argv[1])
        print(f"removed {n} export(s) from {argv[1]} and {len(files)} file(s) vLLM left",
              file=sys.stderr)
        return 0
    if argv == ["sweep"]:
        from hooks.leftovers import state_dir, sweep

        directory = state_dir()
        for line in sweep(directory):
            print(f"launcher: {line}", file=sys.stderr)
        print(directory)
        return 0
    if len(argv) == 2 and argv[0] == "healthy":
        import urllib.request

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(argv[1], timeout=5) as response:
                return 0 if response.status == 200 else 1
        except OSError:
            return 1
    if len(argv) >= 4 and argv[0] == "record":
        from pathlib import Path

        from hooks.leftovers import record

        record(Path(argv[1]), argv[2], int(argv[3]), **dict(a.split("=", 1) for a in argv[4:]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
