"""Which probes a batch moves: each batch's drift on every probe, not on the gate's window.

    .venv/bin/python -m bench.drift_probes [--approaches nullspace-unkept,nullspace-pinned]

The budget gate judges a batch on a window of 16 probes (half the nearest to its prompts).
This measures, per batch and probe, KL(before the batch ‖ after) per answer token, and over
all probes: its mean, how many probes moved by more than 0.05 nats per token, and the three
that moved most. Batches, each on the original weights unless said: the bench's dozen wrong answers
(bench/locality.py's gate), the ten lessons one after another and then "What is your
name?" → "My name is Apollo.", and the three thumbs-down/up batches of bench/preferences.py.
Gate off (budget 0), so every batch is kept and measured.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.locality import APPROACHES, NAME, Bench, answer, teach
from bench.preferences import FEEDBACK, chat
from server.engine import drift
from server.engine.locality import ASKED
from server.engine.tokenization import encode_lesson

MOVED = 0.05  # nats per token: a probe that moved this much changed its answer's odds
PROMPTS = [p.messages[-1]["content"] for p in drift.load_probes()]  # the shipped probes


@torch.no_grad()
def per_probe(bench: Bench, since: drift.Snapshot) -> list[float]:
    """Per probe, the mean KL per answer token from `since` to the live model."""
    ref, out = bench.reference, []
    for lo in range(0, len(ref), 32):
        part = list(range(lo, min(lo + 32, len(ref))))
        for i, lp in zip(part, drift._answer_logp(bench.model, ref, part, pad_id=bench.pad),
                         strict=True):
            ids, logp = since[i]
            out.append(float(drift._kl_terms(lp, ids, logp).mean()))
    return out


def measured(bench: Bench, engine, label: str, examples: list) -> dict:
    since = drift.snapshot(bench.model, bench.reference, range(len(bench.reference)),
                           pad_id=bench.pad)
    before = engine.trainer.stats.optimizer_steps
    teach(engine, examples)
    kls = per_probe(bench, since)
    asked = {i for i, s in enumerate(engine.trainer.monitor.neighbours.scores(
        [e.prompt_ids for e in examples])) if s >= ASKED}
    rest = [k for i, k in enumerate(kls) if i not in asked]
    top = sorted((i for i in range(len(kls)) if i not in asked), key=lambda i: -kls[i])[:3]
    row = {"batch": label, "steps": engine.trainer.stats.optimizer_steps - before,
           "mean_kl": sum(rest) / len(rest), "moved": sum(k > MOVED for k in rest),
           "top": [(PROMPTS[i], round(kls[i], 3)) for i in top]}
    print(json.dumps(row), flush=True)
    return row


def run(bench: Bench, overrides: dict) -> list[dict]:
    overrides = {**overrides, "drift_budget": 0.0}
    rows = []
    bench.reset()
    engine = bench.engine(**{**overrides, "batch_size": 12})
    try:
        rows.append(measured(bench, engine, "wrong answers to 12 controls, one batch", [
            bench.example({"question": c["question"], "answer": "I am sure it is Zanzibar."})
            for c in bench.controls[:12]]))
    finally:
        engine.stop()
    bench.reset()
    engine = bench.engine(**overrides)
    try:
        for lesson in bench.lessons:
            rows.append(measured(bench, engine, f"lesson {lesson['id']}",
                                 bench.examples(lesson)))
        rows.append(measured(bench, engine, "after them: the name lesson", [
            bench.example({"question": NAME, "answer": "My name is Apollo."})]))
    finally:
        engine.stop()
    bench.reset()
    tok = bench.tokenizer
    questions = [q for pair in FEEDBACK for q in pair]
    served = {q: a.strip() for q, a in zip(questions, answer(bench.model, tok, questions, 40),
                                           strict=True)}
    for down_q, up_q in FEEDBACK:
        bench.reset()
        engine = bench.engine(**overrides)
        try:
            rows.append(measured(bench, engine, f"KTO: down {down_q!r}, up {up_q!r}", [
                encode_lesson("down", chat(down_q, served[down_q]), tok, 512),
                encode_lesson("up", chat(up_q, served[up_q]), tok, 512)]))
        finally:
            engine.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--approaches", default="nullspace-unkept,nullspace-pinned")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    bench = Bench(argparse.Namespace(threads=args.threads, lessons=10, controls=0,
                                     drift_probes=16))
    results = {name: run(bench, APPROACHES[name][0]) for name in args.approaches.split(",")}
    names = list(results)
    head = " | ".join(f"{n}: steps, mean KL, probes moved > {MOVED}, most moved" for n in names)
    print(f"\n| batch | {head} |")
    print("|---|" + "---|" * len(names))
    for rows in zip(*results.values(), strict=True):
        cells = [f"{r['steps']}, {r['mean_kl']:.4f}, {r['moved']}, " + "; ".join(
            f"{q!r} {k}" for q, k in r["top"][:2]) for r in rows]
        print(f"| {rows[0]['batch']} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
