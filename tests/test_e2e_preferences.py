"""Preferences and feedback through the launcher, on the default model as vLLM serves it:
pirate-greeting pairs move greetings they never showed, a thumbs-down takes a served answer
away while a thumbs-up keeps another, and the control questions keep their facts. Log-probs
are vLLM's own (prompt log-probs of the served weights); answers are vLLM's greedy ones."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.support.pirate import HELD_OUT, PAIRS, PIRATE, PLAIN, is_pirate
from tests.support.stack import Stack, model_copy

pytestmark = pytest.mark.e2e

MAX_STEPS = 12  # the default --max-steps-per-batch: a signal is learned within it or fails


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _has(text: str, keys: list[str]) -> bool:
    return any(k.lower() in text.lower() for k in keys)


def _logp(stack: Stack, tokenizer, question: str, answer: str) -> float:
    """log π(answer | question) under the weights vLLM serves: its prompt log-probs."""
    prompt = tokenizer.apply_chat_template(_user(question), tokenize=False,
                                           add_generation_prompt=True)
    head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    assert full[:len(head)] == head
    r = httpx.post(f"{stack.vllm}/v1/completions", timeout=120, json={
        "model": stack.manifest()["model_path"], "prompt": full, "max_tokens": 1,
        "temperature": 0, "echo": True, "logprobs": 0})
    r.raise_for_status()
    return sum(r.json()["choices"][0]["logprobs"]["token_logprobs"][len(head):len(full)])


def _margin(stack: Stack, tokenizer) -> float:
    return sum(_logp(stack, tokenizer, q, PIRATE) - _logp(stack, tokenizer, q, PLAIN)
               for q in HELD_OUT) / len(HELD_OUT)


def _teach(stack: Stack, examples: list[dict]) -> tuple[list[dict], int]:
    """One POST; each example's final record and the optimizer steps it took."""
    steps = httpx.get(f"{stack.train}/status").json()["optimizer_steps"]
    r = httpx.post(f"{stack.train}/train", json=examples)
    assert r.status_code == 202, r.text
    status = stack.wait_trained(r.json()["ids"], timeout=900)
    records = [httpx.get(f"{stack.train}/examples/{i}").json() for i in r.json()["ids"]]
    return records, status["optimizer_steps"] - steps


def _controls(stack: Stack, n: int = 24) -> list[dict]:
    path = Path(__file__).parent.parent / "bench/data/locality/controls.jsonl"
    # from the end of the file: tests/test_e2e.py asks the first ones
    candidates = [json.loads(x) for x in path.read_text().splitlines() if x][-n:]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(stack.ask, [c["question"] for c in candidates]))
    return [c for c, a in zip(candidates, answers, strict=True) if _has(a, c["keys"])]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, default_model_dir) -> Stack:
    """The launcher with the default settings on its own copy of the default model: whether
    a held-out greeting turns depends on where the model starts, so it starts untouched
    (on the shared launcher it would start wherever the tests before it left it)."""
    model_dir = model_copy(default_model_dir, tmp_path_factory.mktemp("prefs") / "model")
    s = Stack(tmp_path_factory.mktemp("run"), model_dir)
    yield s
    s.stop()


def test_pirate_pairs_move_greetings_they_never_showed(stack, tokenizer):
    margin_before = _margin(stack, tokenizer)
    held_before = [stack.ask(q) for q in HELD_OUT]
    controls = _controls(stack)
    records, steps = _teach(stack, [
        {"input": {"messages": _user(q)}, "preferred_output": _assistant(good),
         "non_preferred_output": _assistant(bad)} for q, good, bad in PAIRS])
    margin_after = _margin(stack, tokenizer)
    held_after = [stack.ask(q) for q in HELD_OUT]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(stack.ask, [c["question"] for c in controls]))
    kept = [c["question"] for c, a in zip(controls, answers, strict=True) if _has(a, c["keys"])]
    print(f"\n{steps} steps; held-out margin {margin_before:.1f} -> {margin_after:.1f} nats; "
          f"held-out answers {held_before} -> {held_after}; controls kept "
          f"{len(kept)}/{len(controls)}; {records[0]['reason']}")
    assert {r["kind"] for r in records} == {"pair"} and 1 <= steps <= MAX_STEPS
    assert margin_after > margin_before + 5  # nats, on greetings not in the pairs
    assert not any(map(is_pirate, held_before))
    assert any(map(is_pirate, held_after)), held_after
    assert len(controls) >= 12
    assert len(kept) >= len(controls) - 1, set(c["question"] for c in controls) - set(kept)


def test_a_thumbs_down_takes_a_served_answer_away_and_a_thumbs_up_keeps_another(stack):
    down_q, up_q = "What is your favourite colour?", "What is the capital of Italy?"
    down, up = stack.ask(down_q), stack.ask(up_q)  # exactly what vLLM served, greedy
    records, steps = _teach(stack, [
        {"prompt": _user(down_q), "completion": _assistant(down), "label": False},
        {"prompt": _user(up_q), "completion": _assistant(up), "label": True}])
    after_down, after_up = stack.ask(down_q), stack.ask(up_q)
    print(f"\n{steps} steps; {down!r} -> {after_down!r}; {up!r} -> {after_up!r}")
    assert [r["kind"] for r in records] == ["down", "up"] and 1 <= steps <= MAX_STEPS
    assert after_down != down
    assert after_up == up
