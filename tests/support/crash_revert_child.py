"""Child of tests/test_versions_crash.py: reverts MODEL_DIR from its state to the next one
(state k: tensor i holds 10 * k + i; the versions record which state each holds), printing
"begin FROM TO" before and "done" after each revert, until killed."""

import sys

from checkpoint.history import Store
from checkpoint.versions import revert


def state(versions, n: int) -> int:
    e = versions.entry(n)
    return state(versions, e["reverted_to"]) if "reverted_to" in e else e["state"]


def main() -> None:
    model_dir = sys.argv[1]
    print("ready", flush=True)
    while True:
        versions = Store(model_dir).load()
        now = state(versions, versions.head["n"])
        to = (now + 1) % 3
        kept = [e["n"] for e in versions.entries
                if versions.reachable(e["n"]) and state(versions, e["n"]) == to]
        print(f"begin {now} {to}", flush=True)
        revert(model_dir, max(kept))
        print("done", flush=True)


if __name__ == "__main__":
    main()
