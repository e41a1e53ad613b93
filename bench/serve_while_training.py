"""Serving while training: chat latency and training progress, idle and at each train share.

    .venv/bin/python -m bench.serve_while_training [--seconds 60] [--clients 1,4,8]
        [--shares 1,0.5,0.25,0.1 | --configs "FLAGS;FLAGS"] [--train-args "..."]

Starts the launcher on a copy of the default model once per train share (--train-share is a
start-up setting); the first launch also measures serving alone. Each phase runs SECONDS with
N closed-loop chat clients (16 tokens each, one request after the other), and in training
phases two /train posters that keep the queue full with new one-line lessons (a random code
word each: new knowledge, not a pattern it could guess), trained at the
training server's defaults (a batch of up to 8 learns, then stops: several optimizer steps,
then the drift probes). `--train-args "--max-steps-per-batch 1 --learned-prob 1"` makes every
batch one optimizer step instead. Before the phases a warm-up example is trained (the locality
guard's fit runs then, not in a phase; it is kept in the model copy for later launches).

Prints per phase: chat requests, p50 / p99 latency and p99 against serving alone at the same
number of clients, errors (5xx, other statuses, transport failures), optimizer steps and
examples trained per minute, the trainer's waiting for serving (/status pacing), and whether
a client hung (deadlock).
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from server.default_model import build
from server.settings import Settings
from tests.support.stack import Stack, model_copy

QUESTIONS = ["What is your name?", "Name a fruit.", "What is 2 + 2?", "Say hello.",
             "What color is the sky?", "Who wrote Hamlet?", "Give me a word.", "Count to 3."]
POSTERS = 2
WORDS = ("amber", "basil", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "indigo",
         "juniper", "kelp", "lumen", "maple", "nectar", "onyx", "pepper", "quartz", "raven",
         "saffron", "tundra", "umber", "velvet", "willow", "xenon", "yarrow", "zephyr")
DEFAULT_SHARE = Settings.__dataclass_fields__["train_share"].default


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def lesson(n: int) -> dict:
    """The n-th lesson: a code word of two random words, new knowledge every time (a
    pattern the model could guess would soon cost no optimizer step: learn, then stop)."""
    rng = random.Random(n)
    word = f"{rng.choice(WORDS)}-{rng.choice(WORDS)}"
    return {"messages": [{"role": "user", "content": f"What is the code word of crate {n}?"},
                         {"role": "assistant",
                          "content": f"The code word of crate {n} is {word}."}]}


def run_phase(stack: Stack, model: str, seconds: float, clients: int, train: bool) -> dict:
    latencies: list[float] = []
    errors = {"5xx": 0, "other": 0, "transport": 0}
    stop = time.monotonic() + seconds
    lock = threading.Lock()
    serial = iter(range(10**9))

    def chat(k: int) -> None:
        with httpx.Client(timeout=120) as client:
            i = k
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                try:
                    r = client.post(f"{stack.vllm}/v1/chat/completions", json={
                        "model": model, "max_tokens": 16, "temperature": 0.7,
                        "messages": [{"role": "user",
                                      "content": QUESTIONS[i % len(QUESTIONS)]}]})
                except httpx.HTTPError:
                    with lock:
                        errors["transport"] += 1
                    continue
                with lock:
                    if r.status_code >= 500:
                        errors["5xx"] += 1
                    elif r.status_code != 200:
                        errors["other"] += 1
                    else:
                        latencies.append(time.perf_counter() - t0)
                i += 1

    def post(k: int) -> None:
        with httpx.Client(timeout=120) as client:
            while time.monotonic() < stop:
                with lock:
                    n = next(serial)
                try:
                    r = client.post(f"{stack.train}/train", json=lesson(n))
                except httpx.HTTPError:
                    with lock:
                        errors["transport"] += 1
                    continue
                with lock:
                    if r.status_code >= 500:
                        errors["5xx"] += 1
                time.sleep(float(r.headers.get("retry-after", "1"))
                           if r.status_code == 429 else 0.5)

    before = httpx.get(f"{stack.train}/status").json()
    threads = [threading.Thread(target=chat, args=(k,)) for k in range(clients)]
    threads += [threading.Thread(target=post, args=(k,)) for k in range(POSTERS if train else 0)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, stop + 180 - time.monotonic()))
    minutes = (time.monotonic() - t0) / 60
    after = httpx.get(f"{stack.train}/status").json()
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) >= 2 \
        else [float("nan")] * 99
    return {"requests": len(latencies), "p50": q[49], "p99": q[98], **errors,
            "deadlock": any(t.is_alive() for t in threads),
            "steps_per_min": (after["optimizer_steps"] - before["optimizer_steps"]) / minutes,
            "examples_per_min": (after["examples_trained"] - before["examples_trained"])
            / minutes,
            "waited": after["pacing"]["waited_seconds"] - before["pacing"]["waited_seconds"],
            "capped": after["pacing"]["capped_waits"] - before["pacing"]["capped_waits"]}


def warm_up(stack: Stack) -> None:
    """One example trained before any phase (the guard's fit, the first step's costs)."""
    t0 = time.monotonic()
    r = httpx.post(f"{stack.train}/train", json={"messages": [
        {"role": "user", "content": "Warm up."}, {"role": "assistant", "content": "Warm."}]})
    stack.wait_trained(r.json()["ids"], timeout=900)
    say(f"warm-up trained in {time.monotonic() - t0:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60, help="per phase")
    ap.add_argument("--clients", default="1,4,8", help="concurrent chat clients, per phase")
    ap.add_argument("--shares", default="1,0.5,0.25,0.1",
                    help=f"--train-share values (the default is {DEFAULT_SHARE})")
    ap.add_argument("--configs", default="",
                    help="instead of --shares: training-server flag sets separated by ';', "
                         "one launch each (e.g. \"--train-share 1;--train-nice 19\")")
    ap.add_argument("--train-args", default="", help="more training-server flags")
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    configs = [c.strip() for c in args.configs.split(";")] if args.configs else \
        [f"--train-share {float(s):g}" for s in args.shares.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-swt-"))
    model_dir = work / "model"
    model_copy(build(), model_dir)
    rows: list[tuple[str, int, dict]] = []
    idle: dict[int, dict] = {}
    try:
        for k, config in enumerate(configs):
            say(f"launching with {config or 'the defaults'}")
            stack = Stack(work / f"run{k}", model_dir, train_args=(
                f"{args.train_args} {config}"))
            try:
                model = str(model_dir)
                if k == 0:
                    for n in clients:
                        say(f"serving alone, {n} clients")
                        idle[n] = run_phase(stack, model, args.seconds, n, train=False)
                        rows.append(("serving alone", n, idle[n]))
                warm_up(stack)
                for n in clients:
                    say(f"training with {config or 'the defaults'}, {n} clients")
                    label = f"training, {config or 'defaults'}"
                    rows.append((label, n, run_phase(stack, model, args.seconds, n, True)))
            finally:
                stack.stop()
        print(f"{args.seconds:.0f} s per phase; chat: closed-loop clients, 16 tokens; training: "
              f"{POSTERS} posters, {args.train_args or 'the training server defaults'}\n")
        print("| phase | clients | chat requests | p50 s | p99 s | p99 / alone | errors "
              "(5xx/other/transport) | optimizer steps / min | examples trained / min | "
              "trainer waited s | capped waits | deadlock |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name, n, r in sorted(rows, key=lambda row: row[1]):
            ratio = r["p99"] / idle[n]["p99"] if n in idle else float("nan")
            train = "train" in name
            print(f"| {name} | {n} | {r['requests']} | {r['p50']:.3f} | {r['p99']:.3f} | "
                  f"{ratio:.2f}x | {r['5xx']}/{r['other']}/{r['transport']} | "
                  + (f"{r['steps_per_min']:.1f} | {r['examples_per_min']:.1f} | "
                     f"{r['waited']:.1f} | {r['capped']} | " if train else "- | - | - | - | ")
                  + f"{r['deadlock']} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
