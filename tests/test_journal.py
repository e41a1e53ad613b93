"""server/journal.py and the training server's crash recovery: nothing accepted is lost,
nothing is trained twice."""

import os
import random
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from server.engine.distributed import free_port
from server.engine.example_log import ExampleLog
from server.engine.example_replay import replay
from server.engine.tokenization import Encoded
from tests.support import ROOT
from tests.support.health import wait_healthy
from tests.support.tiny_models import make_tiny_chat_model
from tests.support.zygote import Zygote
from weight_mapping import attach

E = Encoded([1, 2, 3], [-100, 2, 3])


def _tiny_chat_model(tmp_path, default_model_dir):
    return make_tiny_chat_model(tmp_path / "model", default_model_dir)


def test_replay_resolves_an_interrupted_batch_with_the_applied_counter(tmp_path):
    j = ExampleLog(tmp_path / "j.jsonl")
    j.accept([("a", E), ("b", E), ("c", E)])
    j.begin(["a"], steps=1, base=0)
    j.done(["a"], step=1)
    j.begin(["b"], steps=5, base=1)  # crashed after 2 of its 5 steps
    j.close()
    with open(tmp_path / "j.jsonl", "ab") as f:
        f.write(b'{"op":"accept","id":"torn"')  # a torn last line: never acknowledged
    state = ExampleLog(tmp_path / "j.jsonl").replay(applied_steps=3)
    assert state.trained == {"a": 1}
    assert state.unfinished == (["b"], 3)
    assert state.pending == ["c"]
    assert "torn" not in state.accepted



def test_compaction_keeps_every_state_and_drops_finished_tokens(tmp_path):
    path = tmp_path / "j.jsonl"
    long = Encoded(list(range(400)), [-100] * 200 + list(range(200, 400)))
    j = ExampleLog(path)
    j.accept([(f"e{k}", long) for k in range(40)])
    for k in range(0, 30, 10):  # three trained batches of 10
        j.begin([f"e{i}" for i in range(k, k + 10)], steps=1, base=k // 10)
        j.done([f"e{i}" for i in range(k, k + 10)], step=k // 10 + 1)
    j.begin(["e30", "e31"], steps=1, base=3)
    j.fail(["e30", "e31"], "non-finite gradient")
    j.begin(["e32", "e33"], steps=4, base=3)  # crashed after 1 of its 4 steps
    before = j.replay(applied_steps=4)
    size = path.stat().st_size
    (tmp_path / "j.jsonl.compact").write_bytes(b"half-written by a crashed compaction")

    j.compact(before, applied_steps=4)
    after = replay(path, applied_steps=4)
    assert (after.trained, after.failed, after.pending) == \
        (before.trained, before.failed, before.pending)
    assert after.unfinished == before.unfinished == (["e32", "e33"], 3)
    assert path.stat().st_size < 0.25 * size  # 40 examples' tokens -> 8 still needed
    assert after.accepted["e0"] is None and after.accepted["e39"] == long

    j.accept([("late", E)])  # appends reach the new file, not the replaced one
    assert replay(path, applied_steps=4).pending == before.pending + ["late"]
    # the counter moves on after the rebase: one more applied step of the batch is seen
    assert replay(path, applied_steps=5).unfinished == (["e32", "e33"], 2)

@pytest.fixture
def servers():
    """Training-server processes (`python -m server`), each forked fresh from one process
    that imported it once (tests/support/zygote.py)."""
    with Zygote("server.__main__", stderr=subprocess.DEVNULL) as zygote:
        yield zygote


def test_kill_9_mid_batch_trains_every_acknowledged_example_exactly_once(
        tmp_path, default_model_dir, owner_factory, servers):
    model_dir = _tiny_chat_model(tmp_path, default_model_dir)
    _, export_dir = owner_factory(model_dir)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    journal = tmp_path / "examples.jsonl"
    args = ["--export-dir", str(export_dir), "--port", str(port),
            "--batch-size", "1", "--max-steps-per-batch", "1", "--learned-prob", "1",
            "--journal", str(journal), "--threads", "1",
            "--guard", "none", "--drift-probes", "0"]  # the journal's test: no probe passes
    acked: list[str] = []
    rejected = 0
    lost = 0  # requests whose connection died with the server: outcome unknown to the client
    rng = random.Random(7)

    def start():
        proc = servers.spawn(*args, talk=False)
        wait_healthy(url, timeout=60, proc=proc)
        return proc

    def post_until(stop: threading.Event):
        nonlocal rejected, lost
        while not stop.is_set():
            n = rng.randint(1, 3)
            body = [{"prompt": f"q{rng.random()}", "completion": "an answer"}] * n
            if rng.random() < 0.2:
                body.append({"prompt": "invalid: no completion"})
            try:
                r = httpx.post(f"{url}/train", json=body, timeout=10)
            except httpx.HTTPError:
                lost += 1
                return
            if r.status_code == 202:
                acked.extend(r.json()["ids"])
            else:
                assert r.status_code == 422, r.text
                rejected += 1

    for _ in range(10):
        proc = start()
        stop = threading.Event()
        poster = threading.Thread(target=post_until, args=(stop,))
        poster.start()
        time.sleep(rng.uniform(0.5, 2.0))
        proc.send_signal(signal.SIGKILL)  # mid-batch, examples in flight
        proc.wait()
        stop.set()
        poster.join()

    proc = start()
    try:
        deadline = time.monotonic() + 600
        while (st := httpx.get(f"{url}/status").json())["examples_queued"] > 0:
            assert time.monotonic() < deadline, f"not drained in 600 s: {st}"
            time.sleep(0.1)
        states = {i: httpx.get(f"{url}/examples/{i}").json()["state"] for i in acked}
        assert set(states.values()) == {"trained"}, states
        # Exactly once: one optimizer step per example (batch 1, 1 step), counted by the
        # export's applied-step counter, which the crashes did not reset.
        assert st["applied_steps"] == st["examples_trained"]
        # Requests that died with the server may have been journaled; nothing else was.
        assert len(acked) <= st["examples_trained"] <= len(acked) + 3 * lost
        assert st["examples_failed"] == 0 and rejected > 0
        print(f"\n{len(acked)} acknowledged, {rejected} rejected, {lost} cut off by kills; "
              f"{st['examples_trained']} trained in {st['applied_steps']} steps")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize("fault", ["nan-loss", "nan-grad"])
def test_injected_nan_never_reaches_the_live_weights(fault, tmp_path, default_model_dir,
                                                      owner_factory):
    """A real training-server process on weights another process owns (as vLLM does):
    a non-finite loss or gradient fails the example and leaves every weight bit-identical."""
    model_dir = _tiny_chat_model(tmp_path, default_model_dir)
    _, export_dir = owner_factory(model_dir)
    live = attach(export_dir, timeout=60).tensors
    before = {n: t.clone() for n, t in live.items()}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "--export-dir", str(export_dir), "--port", str(port),
         "--journal", "off", "--threads", "1"],
        env={**os.environ, "PYTHONPATH": str(ROOT), "VLLM_APOLLO_FAULT_INJECT": fault},
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(url, timeout=60, proc=proc)
        r = httpx.post(f"{url}/train", json={"prompt": "hi", "completion": "hello"})
        example = r.json()["ids"][0]
        for _ in range(600):
            state = httpx.get(f"{url}/examples/{example}").json()
            if state["state"] != "queued":
                break
            time.sleep(0.1)
        assert state["state"] == "failed" and "non-finite" in state["reason"]
        assert httpx.get(f"{url}/status").json()["applied_steps"] == 0
        assert all(torch.equal(live[n], before[n]) for n in live)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
