"""Ten minutes of everything at once on the launcher: chat (plain, streamed, through the
console's proxy), every kind of lesson, a checkpoint every 30 s and dashboard reads.

    .venv/bin/python -m bench.mixed_load [--minutes 10] [--chat-clients 3] [--posters 2]
        [--train-args "..."]

Prints one row per kind of request (answered, 429s, errors, hangs, p50 / p99 / max seconds),
the optimizer steps and checkpoint versions made under the load, the accepted examples'
final states and the seconds it took them to settle after the load.
The one-minute version is tests/test_e2e_mixed_load.py.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import tempfile
from pathlib import Path

from server.default_model import build
from tests.support import mixed_load
from tests.support.stack import Stack, model_copy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--chat-clients", type=int, default=3)
    ap.add_argument("--posters", type=int, default=2)
    ap.add_argument("--checkpoint-every", type=float, default=30)
    ap.add_argument("--post-pause", type=float, default=0.5)
    ap.add_argument("--train-args", default="--max-queue 32",
                    help="training-server flags (default: a short queue, so posters meet 429)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-mixed-"))
    try:
        model_dir = work / "model"
        model_copy(build(), model_dir)
        stack = Stack(work / "run", model_dir, train_args=args.train_args)
        try:
            out = mixed_load.run(stack.vllm, stack.train, str(model_dir), args.minutes * 60,
                                 chat_clients=args.chat_clients, posters=args.posters,
                                 post_pause=args.post_pause,
                                 checkpoint_every=args.checkpoint_every)
        finally:
            stack.stop()
        print(f"{args.minutes:g} min; {args.chat_clients} chat clients, {args.posters} "
              f"posters, a checkpoint every {args.checkpoint_every:g} s; "
              f"training server: defaults {args.train_args}\n")
        print(mixed_load.table(out))
        states = collections.Counter(out["states"].values())
        made = sum(c.get("version") is not None for c in out["checkpoints"])
        print(f"\nunder the load: {out['steps_under_load']} optimizer steps, {made} of "
              f"{len(out['checkpoints'])} checkpoints made a version")
        print(f"accepted examples: {len(out['states'])}, final states {dict(states)}, "
              f"settled {out['settled_after']:.0f} s after the load; client threads left "
              f"running: {out['alive']}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
