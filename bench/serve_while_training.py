"""Serving while training: chat latency with and without live training, side by side.

    .venv/bin/python -m bench.serve_while_training [--seconds 60]

Starts the launcher on a copy of the default model, then runs two phases of SECONDS each:
8 concurrent chat clients alone, then the same 8 plus 4 concurrent /train posters. Prints
p50 / p99 chat latency per phase, their ratio, 5xx counts and the trainer's total serving
stall (time vLLM's engine steps were excluded by in-place writes).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from server.default_model import build
from tests.support.stack import Stack

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ["What is your name?", "Name a fruit.", "What is 2 + 2?", "Say hello.",
             "What color is the sky?", "Who wrote Hamlet?", "Give me a word.", "Count to 3."]


def run_phase(vllm: str, train: str, model: str, seconds: float, posters: int) -> dict:
    latencies: list[float] = []
    errors = {"5xx": 0, "other": 0}
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def chat(k: int) -> None:
        with httpx.Client(timeout=120) as client:
            i = k
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                r = client.post(f"{vllm}/v1/chat/completions", json={
                    "model": model, "max_tokens": 16, "temperature": 0.7,
                    "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]})
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
                r = client.post(f"{train}/train", json={"messages": [
                    {"role": "user", "content": f"Tell me fact number {k}."},
                    {"role": "assistant", "content": f"Fact {k}: water is wet."}]})
                with lock:
                    if r.status_code >= 500:
                        errors["5xx"] += 1
                if r.status_code == 429:
                    time.sleep(float(r.headers.get("retry-after", "1")))
                else:
                    time.sleep(1.0)

    threads = [threading.Thread(target=chat, args=(k,)) for k in range(8)]
    threads += [threading.Thread(target=post, args=(k,)) for k in range(posters)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 180)
    deadlocked = any(t.is_alive() for t in threads)
    q = statistics.quantiles(latencies, n=100)
    return {"requests": len(latencies), "p50": q[49], "p99": q[98], **errors,
            "deadlock": deadlocked}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-swt-"))
    model_dir = work / "model"
    shutil.copytree(build(), model_dir)
    stack = Stack(work / "run", model_dir, train_args="--max-steps-per-batch 1")
    try:
        model = str(model_dir)
        idle = run_phase(stack.vllm, stack.train, model, args.seconds, posters=0)
        busy = run_phase(stack.vllm, stack.train, model, args.seconds, posters=4)
        st = httpx.get(f"{stack.train}/status").json()
        print("| phase | chat requests | p50 s | p99 s | 5xx | deadlock |")
        print("|---|---|---|---|---|---|")
        for name, r in (("8 chat clients", idle), ("8 chat + 4 /train posters", busy)):
            print(f"| {name} | {r['requests']} | {r['p50']:.3f} | {r['p99']:.3f} | {r['5xx']} "
                  f"| {r['deadlock']} |")
        print(f"\np50 ratio {busy['p50'] / idle['p50']:.2f}x, p99 ratio "
              f"{busy['p99'] / idle['p99']:.2f}x; optimizer steps {st['optimizer_steps']}, "
              f"examples trained {st['examples_trained']}, total serving stall "
              f"{st['serving_stall_seconds']:.3f} s of writes, vLLM waited "
              f"{st['vllm_waited_seconds']:.3f} s (last write "
              f"{1e3 * (st['last_write_seconds'] or 0):.1f} ms, last step "
              f"{st['last_step_seconds'] or 0:.2f} s)")
    finally:
        stack.stop()
        shutil.rmtree(work, ignore_errors=True)

if __name__ == "__main__":
    main()
