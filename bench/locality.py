"""Teach without breaking: reliability, generalization and locality of live lessons, for
several ways of training them, side by side in one run.

    .venv/bin/python -m bench.locality [--lessons 10] [--approaches a,b,...]

The default model (fp32, in this process) is taught the lessons of bench/data/locality one
POST at a time through the real engine (trainer, stepper, drift monitor); then, at
temperature 0: reliability (each lesson's question answered with its key), generalization
(its first paraphrase), locality (control questions the untouched model answers right that
still carry their key fact), "What is your name?" unchanged, and the drift monitor's KL on
the whole probe set. Then, for the default settings: a flood (one example posted 200 times)
and the gate (a batch of wrong answers to a dozen control questions).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.default_model import build
from server.engine import drift
from server.engine.locality import Monitor
from server.engine.tokenization import encode
from server.engine.wiring import assemble
from server.settings import Settings

DATA = Path(__file__).parent / "data" / "locality"
NAME = "What is your name?"
# How the approaches measured before the gate and the MLP-only default differ from the
# server's defaults (learn, then stop at p >= 0.5, at most 12 steps, lr 3e-4, the null-space
# guard at eps 1e-2, MLP matrices, --drift-budget 0.02): no gate, every matrix.
EARLIER = dict(drift_budget=0.0, train_matrices="all")
APPROACHES = {
    # name: (settings overrides, what it is). Bench only: "end_of_turn": False leaves the
    # lessons' end-of-turn token out of their targets; "distill_probes": N adds KL to the
    # reference on N probes to every step under the null-space guard; "augment": N teaches
    # each lesson with N more phrasings of its question; "name_probe": "pin" pins the
    # shipped probe "What is your name?" instead of keeping it, "plain" does neither.
    "fixed-5": ({**EARLIER, "learned_prob": 1.0, "max_steps_per_batch": 5, "lr": 1e-4,
                 "guard": "none"}, "5 steps per lesson, lr 1e-4, no guard (before)"),
    "stop": ({**EARLIER, "lr": 1e-4, "guard": "none"}, "learn, then stop (p >= 0.5), lr 1e-4"),
    "stop-lr1e-5": ({**EARLIER, "max_steps_per_batch": 30, "lr": 1e-5, "guard": "none"},
                    "learn, then stop, lr 1e-5"),
    "distill": ({**EARLIER, "max_steps_per_batch": 16, "lr": 3e-5, "guard": "distill",
                 "guard_probes": 4},
                "learn, then stop, lr 3e-5, KL to the reference on 4 probes per step"),
    "nullspace-lr1e-4": ({**EARLIER, "lr": 1e-4},
                         "learn, then stop, lr 1e-4, null-space guard (eps 1e-2), norms frozen"),
    "nullspace-eps1e-3": ({**EARLIER, "lr": 1e-4, "guard_eps": 1e-3},
                          "learn, then stop, lr 1e-4, null-space guard (eps 1e-3)"),
    "nullspace-mlp": ({"drift_budget": 0.0},
                      "learn, then stop, lr 3e-4, null-space guard, MLP matrices only"),
    "nullspace-all": ({"train_matrices": "all"},
                      "learn, then stop, lr 3e-4, null-space guard, every matrix (attention "
                      "too), --drift-budget 0.02 (the default before)"),
    "nullspace-no-eot": ({**EARLIER, "end_of_turn": False},
                         "learn, then stop, lr 3e-4, null-space guard, the answer's "
                         "end-of-turn token not trained"),
    "nullspace-distill": ({**EARLIER, "distill_probes": 2},
                          "learn, then stop, lr 3e-4, null-space guard and KL to the "
                          "reference on 2 probes per step"),
    "nullspace-augment": ({"train_matrices": "all", "augment": 1},
                          "the default before (every matrix, gated), each lesson taught with "
                          "its question asked one more way (one batch)"),
    "nullspace-unkept": ({"name_probe": "plain"},
                         "the server's defaults but the probe \"What is your name?\" not kept "
                         "(the defaults before)"),
    "nullspace-pinned": ({"name_probe": "pin"},
                         "the server's defaults with the probe \"What is your name?\" pinned "
                         "instead of kept"),
    "nullspace": ({}, "learn, then stop, lr 3e-4, null-space guard (eps 1e-2), MLP matrices "
                      "only, --drift-budget 0.02, \"What is your name?\" kept (the server's "
                      "defaults)"),
}


def load(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line]


@torch.no_grad()
def answer(model, tokenizer, questions: list[str], max_new: int = 24, batch: int = 32
           ) -> list[str]:
    tokenizer.padding_side = "left"
    out = []
    for lo in range(0, len(questions), batch):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                               add_generation_prompt=True, tokenize=False)
                 for q in questions[lo:lo + batch]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new,
                             pad_token_id=tokenizer.pad_token_id)
        out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:],
                                      skip_special_tokens=True)
    return out


def has(text: str, keys: list[str]) -> bool:
    return any(k.lower() in text.lower() for k in keys)


def lesson_example(lesson: dict, tokenizer, end_of_turn: bool = True):
    return encode([{"role": "user", "content": lesson["question"]},
                   {"role": "assistant", "content": lesson["answer"]}], tokenizer, 512,
                  end_of_turn=end_of_turn)


def teach(engine, examples: list, timeout: float = 600) -> tuple[list[str], float]:
    """Submit `examples` as one POST; wait until all are finished; ids and seconds."""
    t0 = time.monotonic()
    ids = engine.trainer.submit(examples)
    while time.monotonic() - t0 < timeout:
        if all(engine.trainer.records[i].state != "queued" for i in ids):
            return ids, time.monotonic() - t0
        time.sleep(0.02)
    raise TimeoutError("lesson not trained")


class Bench:
    def __init__(self, args):
        torch.set_num_threads(args.threads)
        self.model_dir = build()
        self.cache = Path(tempfile.mkdtemp(prefix="locality-bench-"))
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        self.original = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.lessons = load("lessons.jsonl")[:args.lessons]
        candidates = load("controls.jsonl")[:args.controls or None]
        base = answer(self.model, self.tokenizer, [c["question"] for c in candidates])
        self.controls = [c for c, a in zip(candidates, base, strict=True) if has(a, c["keys"])]
        self.base_answers = [a for c, a in zip(candidates, base, strict=True)
                             if has(a, c["keys"])]
        self.base_name = answer(self.model, self.tokenizer, [NAME], 30)[0]
        self.settings = Settings(export_dir="unused", drift_probes=args.drift_probes)
        self.pad = self.tokenizer.pad_token_id or 0
        t0 = time.monotonic()
        self.reference = Monitor(self.tokenizer, None, None, per_batch=1,
                                 pad_id=self.pad).ensure_reference(self.model)
        self.reference_seconds = time.monotonic() - t0
        print(f"controls the base model answers right: {len(self.controls)} of "
              f"{len(candidates)}; drift reference: {len(self.reference)} probes in "
              f"{self.reference_seconds:.0f} s; base name answer: {self.base_name!r}",
              flush=True)

    def tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def reset(self) -> None:
        self.model.load_state_dict(self.original)
        for module in self.model.modules():  # a guard's patched forward goes with its engine
            module.__dict__.pop("forward", None)
            module.__dict__.pop("null_guard", None)

    def example(self, lesson: dict):
        return lesson_example(lesson, self.tokenizer, self.end_of_turn)

    def examples(self, lesson: dict) -> list:
        """The lesson, and with `augment` its question asked another way (the lessons'
        second paraphrase; generalization is measured on the first) with the same answer."""
        more = [{**lesson, "question": q} for q in lesson["paraphrases"][1:1 + self.augment]]
        return [self.example(x) for x in [lesson, *more]]

    def engine(self, end_of_turn: bool = True, distill_probes: int = 0, augment: int = 0,
               name_probe: str = "", **overrides):
        """The engine with `overrides` of the settings; the bench-only keys of APPROACHES
        (`end_of_turn`, `distill_probes`, `augment`, `name_probe`) are taken here."""
        self.end_of_turn, self.augment = end_of_turn, augment
        if name_probe:  # the same prompts (and reference), the name probe held otherwise
            lines = [json.loads(line) for line in drift.DEFAULT_PROBES.read_text().splitlines()
                     if line.strip()]
            held = {"pin": {"pin": True}, "plain": {}}[name_probe]
            path = self.cache / f"probes-name-{name_probe}.jsonl"
            path.write_text("".join(json.dumps(
                {**{k: v for k, v in x.items() if k not in ("pin", "keep")}, **held}
                if x["messages"][-1]["content"] == NAME else x) + "\n" for x in lines))
            overrides["probe_file"] = str(path)
        for p in self.model.parameters():  # the engine freezes what its settings do not train
            p.requires_grad_(True)
        engine = assemble(replace(self.settings, **overrides), self.model, self.tokenizer,
                          model_path=str(self.model_dir))
        monitor = engine.trainer.monitor
        if monitor is not None:  # the bench's reference; the guard's bases: fit once
            monitor.store = self.cache / "probe-reference.pt"
            self.reference.save(monitor.store)
            monitor.store.with_name("pins-released.json").unlink(missing_ok=True)
            monitor.ensure_reference(self.model)  # and the kept answers it holds
            t0 = time.monotonic()
            monitor.ensure_guard(self.model)  # once per start, before the first lesson
            self.guard_seconds = time.monotonic() - t0
        if distill_probes:  # the distillation term beside the null-space guard
            engine.trainer.stepper.guard = "distill"
            engine.trainer.stepper.guard_probes = distill_probes
        engine.start()
        return engine

    def evaluate(self) -> dict:
        lessons = answer(self.model, self.tokenizer, [x["question"] for x in self.lessons])
        paraphrases = answer(self.model, self.tokenizer,
                             [x["paraphrases"][0] for x in self.lessons])
        controls = answer(self.model, self.tokenizer, [c["question"] for c in self.controls])
        name = answer(self.model, self.tokenizer, [NAME], 30)[0]
        d = drift.measure(self.model, self.reference, range(len(self.reference)), pad_id=self.pad)
        return {
            "reliability": sum(has(a, [x["key"]]) for a, x in zip(lessons, self.lessons,
                                                                   strict=True)),
            "generalization": sum(has(a, [x["key"]]) for a, x in zip(paraphrases, self.lessons,
                                                                      strict=True)),
            "locality": sum(has(a, c["keys"]) for a, c in zip(controls, self.controls,
                                                              strict=True)),
            # lost controls whose answer ended sooner (fewer tokens) than the untouched model's
            "lost_shorter": sum(not has(a, c["keys"]) and self.tokens(a) < self.tokens(b)
                                for a, c, b in zip(controls, self.controls, self.base_answers,
                                                   strict=True)),
            "lost": [(c["question"], a) for a, c in zip(controls, self.controls, strict=True)
                     if not has(a, c["keys"])][:5],
            "name_same": name == self.base_name, "name": name,
            "probe_kl": d.mean_kl, "probe_changed": d.changed,
        }

    def run_approach(self, overrides: dict) -> dict:
        self.reset()
        self.guard_seconds = 0.0
        engine = self.engine(**overrides)
        seconds, steps, drifts, batch_kls = [], 0, [], []
        try:
            for lesson in self.lessons:
                before = engine.trainer.stats.optimizer_steps
                ids, s = teach(engine, self.examples(lesson))
                seconds.append(s)
                steps += engine.trainer.stats.optimizer_steps - before
                d = engine.trainer.records[ids[0]].drift
                drifts.append(round(d["mean_kl"], 5) if d else None)
                if d and d.get("batch_kl") is not None:
                    batch_kls.append(round(d["batch_kl"], 5))
        finally:
            engine.stop()
        return {**self.evaluate(), "steps": steps, "seconds": sum(seconds) / len(seconds),
                "max_seconds": max(seconds), "guard_fit_seconds": self.guard_seconds,
                "batch_drift": drifts, "batch_kl": batch_kls}

    def flood(self, overrides: dict, copies: int = 200) -> dict:
        self.reset()
        engine = self.engine(**overrides)
        try:
            example = self.example(self.lessons[0])
            t0 = time.monotonic()
            for _ in range(copies):  # one POST each, as a retrying client would
                engine.trainer.submit([example])
            while engine.trainer.queued:
                time.sleep(0.05)
            seconds = time.monotonic() - t0
            stats = engine.trainer.stats
            result = {"steps": stats.optimizer_steps, "seconds": seconds,
                      "no_step": stats.learned_without_steps, "undone": stats.undone_batches}
        finally:
            engine.stop()
        return {**result, **self.evaluate()}

    def gate(self, overrides: dict, wrong: int = 12) -> dict:
        """Wrong answers to `wrong` control questions in one POST, trained as one batch (a
        POST larger than --batch-size is split, and each batch is judged on its own)."""
        self.reset()
        engine = self.engine(**{**overrides, "batch_size": max(wrong, 1)})
        before = {k: v.clone() for k, v in self.model.state_dict().items()}
        harmful = [self.example({"question": c["question"], "answer": "I am sure it is Zanzibar."})
                   for c in self.controls[:wrong]]
        name = self.example({"question": NAME, "answer": "My name is Apollo."})
        try:
            ids, seconds = teach(engine, harmful)
            records = [engine.trainer.records[i] for i in ids]
            same = all(torch.equal(v, before[k]) for k, v in self.model.state_dict().items())
            named, _ = teach(engine, [name])  # a lesson that contradicts a probe on purpose
            named = engine.trainer.records[named[0]]
        finally:
            engine.stop()
        return {"states": sorted({r.state for r in records}), "reason": records[0].reason,
                "drift": records[0].drift, "bit_identical": same, "seconds": seconds,
                "name_lesson": {"state": named.state, "reason": named.reason,
                                "drift": named.drift}}


def noise_floor(bench: Bench, target_kl: float) -> dict:
    """The controls kept when the decoder's matrices get seeded Gaussian noise (each scaled by
    its own std) sized so that the probe KL is `target_kl`: how many answers any change of
    that size flips, whatever it teaches."""
    gen = torch.Generator().manual_seed(0)
    noise = {k: torch.randn(v.shape, generator=gen) * v.std()
             for k, v in bench.original.items() if v.dim() == 2 and "embed" not in k}

    def kl_at(scale: float) -> float:
        bench.model.load_state_dict({k: v + scale * noise[k] if k in noise else v
                                     for k, v in bench.original.items()})
        return drift.measure(bench.model, bench.reference, range(0, len(bench.reference), 3),
                             pad_id=bench.pad).mean_kl
    lo, hi = 0.0, 0.05
    for _ in range(9):  # bisect the scale on a third of the probes
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kl_at(mid) < target_kl else (lo, mid)
    kl_at(hi)
    r = bench.evaluate()
    bench.reset()
    return {"target_kl": target_kl, "scale": hi, **{k: r[k] for k in (
        "locality", "lost_shorter", "name_same", "name", "probe_kl", "probe_changed")}}


def table(results: dict[str, dict], n_lessons: int, n_controls: int) -> str:
    head = ("| approach | reliability | generalization (1 paraphrase) | locality (controls kept) "
            "| name unchanged | probe KL / token | probes changed | optimizer steps | s per "
            "lesson |\n|---|---|---|---|---|---|---|---|---|\n")
    rows = [f"| {APPROACHES[k][1]} | {r['reliability']}/{n_lessons} | "
            f"{r['generalization']}/{n_lessons} | {r['locality']}/{n_controls} "
            f"({100 * r['locality'] / n_controls:.1f}%) | {'yes' if r['name_same'] else 'no'} | "
            f"{r['probe_kl']:.4f} | {100 * r['probe_changed']:.0f}% | {r['steps']} | "
            f"{r['seconds']:.1f} |" for k, r in results.items()]
    return head + "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lessons", type=int, default=10)
    ap.add_argument("--controls", type=int, default=0, help="candidates to use (0: all)")
    ap.add_argument("--approaches", default=",".join(APPROACHES))
    ap.add_argument("--default", default="nullspace",
                    help="approach for the flood and the gate")
    ap.add_argument("--budget", type=float, default=None,
                    help="drift budget for the flood and the gate (default: the server's)")
    ap.add_argument("--drift-probes", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--answer-tokens", type=int, default=drift.ANSWER_TOKENS,
                    help="probe answer tokens the reference keeps and the guard is fitted on")
    ap.add_argument("--noise", default="", help="probe KLs (comma-separated) at which to "
                    "measure the controls kept under random noise of that size")
    ap.add_argument("--skip-flood", action="store_true", help="only the approaches and the gate")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("vllm_apollo.trainer").setLevel(logging.WARNING)
    drift.ANSWER_TOKENS = args.answer_tokens
    bench = Bench(args)
    results = {}
    for name in filter(None, args.approaches.split(",")):
        results[name] = bench.run_approach(APPROACHES[name][0])
        r = results[name]
        print(f"{name}: {json.dumps({k: v for k, v in r.items() if k != 'lost'})}\n  lost: "
              f"{r['lost']}", flush=True)
    if results:
        print("\n" + table(results, len(bench.lessons), len(bench.controls)))
    for target in filter(None, args.noise.split(",")):
        print(f"noise: {json.dumps(noise_floor(bench, float(target)))}", flush=True)
    default = APPROACHES[args.default][0]
    if args.budget is None:
        args.budget = bench.settings.drift_budget
    if not args.skip_flood:
        flood = bench.flood({**default, "drift_budget": args.budget})
        print(f"\nflood (one example x200, {args.default}, budget {args.budget}): "
              f"{json.dumps({k: v for k, v in flood.items() if k != 'lost'})}", flush=True)
    gate = bench.gate({**default, "drift_budget": args.budget})
    print(f"gate (wrong answers to 12 controls in one batch, budget {args.budget}): "
          f"{json.dumps(gate)}", flush=True)


if __name__ == "__main__":
    main()
