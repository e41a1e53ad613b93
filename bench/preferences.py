"""Preferences and feedback on the default model: steps and seconds to a learned signal, per
loss, and what each changed.

    .venv/bin/python -m bench.preferences [--margins 0,1,3] [--sft 1] [--max-steps 12]

In this process, through the real engine (trainer, stepper, null-space guard: the defaults),
the default model (fp32) is taught, each time from its original weights:

- pirate greetings by DPO: three pairs (a pirate answer preferred over a plain one; `--pairs`
  up to six) in one POST, for each --preference-margin in --margins and each --dpo-sft-weight
  in --sft; and the same pirate answers as demonstrations (cross-entropy), for comparison.
  Measured on four held-out greetings: the pirate answer's log-prob margin over the plain one
  (mean, before and after), and how many greedy answers turn pirate; and the control questions
  still answered right (locality);
- thumbs down / up (KTO): the model's own greedy answer to a prompt gets a thumbs-down, its
  answer to another a thumbs-up, in one batch; three such batches. Is the first no longer
  greedy, the second still greedy?
- a thumbs-down with the answer wanted (a pair): "What is your name?".
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from types import SimpleNamespace

import torch

from bench.locality import Bench, answer, has, teach
from server.engine.loss import greedy_mismatch, sequence_logps
from server.engine.tokenization import encode_lesson
from tests.support.pirate import HELD_OUT, PAIRS, PIRATE, PLAIN, is_pirate

FEEDBACK = [  # thumbs-down on the served answer to the first, thumbs-up on the second's
    ("What is your favourite colour?", "What is the capital of France?"),
    ("Tell me a joke.", "What is 2 + 2?"),
    ("What do you like to eat?", "Name a primary colour."),
]
NAME, WANTED = "What is your name?", "My name is Apollo."


def chat(prompt: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


@torch.no_grad()
def logp(bench: Bench, prompt: str, reply: str) -> float:
    enc = encode_lesson("demo", chat(prompt, reply), bench.tokenizer, 512)
    logits = bench.model(input_ids=torch.tensor([enc.input_ids])).logits
    return float(sequence_logps(logits, torch.tensor([enc.labels]))[0])


@torch.no_grad()
def greedy(bench: Bench, prompt: str, reply: str) -> bool:
    """Is `reply`'s text the greedy answer to `prompt`?"""
    enc = encode_lesson("down", chat(prompt, reply), bench.tokenizer, 512)
    logits = bench.model(input_ids=torch.tensor([enc.input_ids])).logits
    return not bool(greedy_mismatch(logits, torch.tensor([enc.labels]))[0])


def style(bench: Bench) -> dict:
    answers = answer(bench.model, bench.tokenizer, HELD_OUT, 30)
    controls = answer(bench.model, bench.tokenizer, [c["question"] for c in bench.controls])
    return {
        "margin": sum(logp(bench, q, PIRATE) - logp(bench, q, PLAIN) for q in HELD_OUT)
        / len(HELD_OUT),
        "pirate": sum(map(is_pirate, answers)),
        "answers": answers,
        "controls": sum(has(a, c["keys"]) for a, c in zip(controls, bench.controls,
                                                          strict=True)),
    }


def run(bench: Bench, examples: list, **overrides) -> dict:
    """One POST of `examples` on the original weights; its record, steps and seconds."""
    bench.reset()
    if bench.budget is not None:
        overrides = {"drift_budget": bench.budget, **overrides}
    engine = bench.engine(**overrides)
    try:
        ids, seconds = teach(engine, examples)
        rec = engine.trainer.records[ids[0]]
        return {"steps": engine.trainer.stats.optimizer_steps, "seconds": seconds,
                "reason": rec.reason, "state": rec.state, "drift": rec.drift}
    finally:
        engine.stop()


def pirate(bench: Bench, margins: list[float], sfts: list[float], demos: bool,
           n: int = 3) -> list[dict]:
    tok = bench.tokenizer
    pairs = [encode_lesson("pair", chat(q, good), tok, 512, rejected=chat(q, bad))
             for q, good, bad in PAIRS[:n]]
    taught = [encode_lesson("demo", chat(q, good), tok, 512) for q, good, _ in PAIRS[:n]]
    rows = []
    for margin in margins:
        r = run(bench, pairs, preference_margin=margin, max_steps_per_batch=bench.max_steps)
        rows.append({"signal": f"DPO, {n} pairs, --preference-margin {margin:g}", **r,
                     **style(bench)})
        print(json.dumps(rows[-1]), flush=True)
    for sft in sfts:
        r = run(bench, pairs, dpo_sft_weight=sft, max_steps_per_batch=bench.max_steps)
        rows.append({"signal": f"DPO + {sft:g} x cross-entropy on the preferred (RPO), {n} pairs",
                     **r, **style(bench)})
        print(json.dumps(rows[-1]), flush=True)
    if demos:
        r = run(bench, taught, max_steps_per_batch=bench.max_steps)
        rows.append({"signal": f"the pirate answers as {n} demonstrations (cross-entropy)", **r,
                     **style(bench)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def feedback(bench: Bench) -> list[dict]:
    tok, rows = bench.tokenizer, []
    bench.reset()
    served = {q: answer(bench.model, tok, [q], 40)[0].strip()
              for pair in FEEDBACK for q in pair}
    for down_q, up_q in FEEDBACK:
        down, up = served[down_q], served[up_q]
        greedy_before = greedy(bench, down_q, down), greedy(bench, up_q, up)
        r = run(bench, [encode_lesson("down", chat(down_q, down), tok, 512),
                        encode_lesson("up", chat(up_q, up), tok, 512)])
        rows.append({"signal": f"KTO: thumbs-down on {down_q!r}, thumbs-up on {up_q!r}", **r,
                     "greedy_before": greedy_before,
                     "down_still_greedy": greedy(bench, down_q, down),
                     "up_still_greedy": greedy(bench, up_q, up),
                     "after": answer(bench.model, tok, [down_q], 30)[0]})
        print(json.dumps(rows[-1]), flush=True)
    bench.reset()
    wrong = answer(bench.model, tok, [NAME], 40)[0].strip()
    r = run(bench, [encode_lesson("pair", chat(NAME, WANTED), tok, 512,
                                  rejected=chat(NAME, wrong))])
    rows.append({"signal": "thumbs-down on the name answer, with the answer wanted (DPO)", **r,
                 "down_still_greedy": greedy(bench, NAME, wrong),
                 "after": answer(bench.model, tok, [NAME], 30)[0]})
    print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--margins", default="0,1,3")
    ap.add_argument("--controls", type=int, default=30, help="candidates to use (0: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=12, help="--max-steps-per-batch for the "
                                                              "pirate runs")
    ap.add_argument("--sft", default="1", help="--dpo-sft-weight values to run ('' none)")
    ap.add_argument("--pairs", type=int, default=3, choices=range(1, len(PAIRS) + 1),
                    help=f"pirate pairs taught (of {len(PAIRS)})")
    ap.add_argument("--drift-budget", type=float, default=None,
                    help="--drift-budget for every run (default: the server's; 0: no gate)")
    ap.add_argument("--skip-feedback", action="store_true")
    ap.add_argument("--skip-demos", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    t0 = time.monotonic()
    bench = Bench(SimpleNamespace(threads=args.threads, lessons=0, controls=args.controls,
                                  drift_probes=16))
    bench.max_steps, bench.budget = args.max_steps, args.drift_budget
    base = style(bench)
    print(f"before: {json.dumps(base)}", flush=True)
    rows = pirate(bench, [float(m) for m in args.margins.split(",") if m],
                  [float(w) for w in args.sft.split(",") if w], not args.skip_demos,
                  args.pairs)
    rows += [] if args.skip_feedback else feedback(bench)
    n = len(bench.controls)
    print("\n| signal | steps | s | held-out pirate margin (nats) | held-out greedy answers "
          "pirate | controls kept |\n|---|---|---|---|---|---|")
    print(f"| before | | | {base['margin']:.1f} | {base['pirate']}/{len(HELD_OUT)} | {n}/{n} |")
    for r in rows:
        if "margin" in r:
            print(f"| {r['signal']} | {r['steps']} | {r['seconds']:.1f} | {r['margin']:.1f} | "
                  f"{r['pirate']}/{len(HELD_OUT)} | {r['controls']}/{n} |")
    print("\n| feedback | steps | s | rejected answer still greedy | thumbs-up answer still "
          "greedy |\n|---|---|---|---|---|")
    for r in rows:
        if "down_still_greedy" in r:
            print(f"| {r['signal']} | {r['steps']} | {r['seconds']:.1f} | "
                  f"{'yes' if r['down_still_greedy'] else 'no'} | "
                  f"{({True: 'yes', False: 'no'}).get(r.get('up_still_greedy'), '—')} |")
    print(f"\ntotal {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
