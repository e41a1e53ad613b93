"""Training in the gaps: the pacer against fake load records and a fake clock, the hook's
load record written by the hook's own step wrappers in another process, and /status and
/metrics showing what the trainer waited and saw, the trainer's threads and priority.

Over 300 lines on purpose: one subject (pacing) with many short cases sharing one fake clock
and one fake vLLM."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from hooks.consistency import StepLock
from hooks.load import LoadRecord, LoadSnapshot
from server.engine.coordination import Standalone
from server.engine.pacing import IDLE_AFTER, LoadMeter, Pacer
from tests.support import ROOT
from tests.support.app import app_client, wait_idle


class Clock:
    """A fake clock whose sleep advances it."""

    def __init__(self) -> None:
        self.t = 1000.0

    def now(self) -> float:
        return self.t

    def now_ns(self) -> int:
        return int(self.t * 1e9)

    def sleep(self, seconds: float) -> None:
        self.t += seconds


class Serving:
    """A fake vLLM: busy (an engine step every 50 ms, 2 requests, 10 tokens each) from
    `busy_from` until `busy_until` (fake-clock seconds), idle otherwise."""

    def __init__(self, clock: Clock, busy_from: float = 0.0, busy_until: float = 1e18,
                 requests: int = 2):
        self.clock, self.busy_from, self.busy_until = clock, busy_from, busy_until
        self.requests = requests

    def read(self) -> LoadSnapshot:
        start = max(self.busy_from, 0.0)
        end = min(self.clock.t, self.busy_until)
        steps = max(0, int((end - start) / 0.05 + 1e-6))
        last_end = start + steps * 0.05
        return LoadSnapshot(steps=steps, busy_ns=int(steps * 0.04e9),
                            last_start_ns=int((last_end - 0.05) * 1e9) if steps else 0,
                            last_end_ns=int(last_end * 1e9), tokens=10 * steps,
                            last_tokens=10, last_requests=self.requests, lock_wait_ns=0)


def pacer(clock: Clock, serving: Serving | None, share: float, max_wait: float = 100.0,
          share_above: int = 0):
    meter = LoadMeter(serving.read if serving else (lambda: None), now_ns=clock.now_ns)
    return Pacer(meter, share, max_wait, share_above=share_above, clock=clock.now,
                 sleep=clock.sleep)


def work(clock: Clock, p: Pacer, seconds: float, wait: bool = True) -> float:
    """One chunk of `seconds` of training work; the time waited before it."""
    waited = p.stats.waited_seconds
    with p.chunk(wait=wait):
        clock.t += seconds
    return p.stats.waited_seconds - waited


def test_the_meter_sees_busy_idle_and_rates():
    clock = Clock()
    serving = Serving(clock, busy_from=0.0, busy_until=1002.0)
    meter = LoadMeter(serving.read, now_ns=clock.now_ns)
    first = meter.sample()
    assert first.busy and first.requests == 2
    clock.t += 1.0
    load = meter.sample()
    assert load.busy
    assert load.engine_steps_per_second == pytest.approx(20, abs=1)
    assert load.tokens_per_second == pytest.approx(200, abs=10)
    assert load.busy_share == pytest.approx(0.8, abs=0.05)
    clock.t = 1002.0 + IDLE_AFTER / 2
    assert meter.sample().busy  # within the idle threshold of the last step
    clock.t = 1002.0 + IDLE_AFTER * 2
    idle = meter.sample()
    assert not idle.busy and idle.seconds_since_step == pytest.approx(2 * IDLE_AFTER, abs=0.01)
    clock.t += 5.0
    assert meter.sample().engine_steps_per_second == 0  # the window moved past the steps


def test_a_step_in_progress_is_busy_unless_stale():
    clock = Clock()
    snap = LoadSnapshot(steps=3, busy_ns=0, last_start_ns=clock.now_ns() - 10**9,
                        last_end_ns=clock.now_ns() - 2 * 10**9, tokens=0, last_tokens=5,
                        last_requests=1, lock_wait_ns=0)
    meter = LoadMeter(lambda: snap, now_ns=clock.now_ns)
    assert snap.in_step and meter.sample().busy  # a long prefill still counts
    clock.t += 60.0
    assert not meter.sample().busy  # a worker gone mid-step is no load


def test_share_one_never_waits_however_busy():
    clock = Clock()
    p = pacer(clock, Serving(clock), share=1.0)
    assert sum(work(clock, p, 1.0) for _ in range(10)) == 0
    assert p.stats.busy_chunks == 10 and p.stats.waits == 0


def test_a_share_waits_its_ratio_while_serving_is_busy():
    clock = Clock()
    p = pacer(clock, Serving(clock), share=0.25)
    assert work(clock, p, 1.0) == 0  # nothing owed yet
    assert work(clock, p, 2.0) == pytest.approx(3.0, abs=0.03)  # (1 - F) / F x 1 s
    assert work(clock, p, 0.5) == pytest.approx(6.0, abs=0.03)
    # over a long run, training takes its share of the time
    start, trained = clock.t, 0.0
    for _ in range(50):
        work(clock, p, 0.4)
        trained += 0.4
    assert trained / (clock.t - start) == pytest.approx(0.25, abs=0.01)


def test_a_light_load_owes_no_wait_and_a_heavier_one_its_share():
    """--train-share-above N: beside engine steps of at most N requests (on CPU one request
    leaves a core to the trainer) a chunk owes nothing; beyond N the share holds."""
    clock = Clock()
    light = pacer(clock, Serving(clock, requests=1), share=0.25, share_above=1)
    assert sum(work(clock, light, 1.0) for _ in range(10)) == 0
    assert light.stats.busy_chunks == 10 and light.stats.light_chunks == 10
    heavier = pacer(clock, Serving(clock, requests=2), share=0.25, share_above=1)
    assert work(clock, heavier, 1.0) == 0
    assert work(clock, heavier, 1.0) == pytest.approx(3.0, abs=0.03)
    assert heavier.stats.light_chunks == 0


def test_a_gap_in_serving_ends_the_wait_and_is_trained_in_full():
    clock = Clock()
    serving = Serving(clock, busy_until=clock.t + 1.5)
    p = pacer(clock, serving, share=0.1)
    work(clock, p, 1.0)  # owes 9 s
    waited = work(clock, p, 1.0)
    assert waited == pytest.approx(0.5 + IDLE_AFTER, abs=0.05)  # until serving went idle
    assert work(clock, p, 1.0) == 0  # idle: the debt was dropped, nothing new owed
    assert work(clock, p, 1.0) == 0


def test_a_chunk_while_serving_is_busy_runs_on_fewer_threads_and_a_gap_on_all():
    clock, before = Clock(), torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        meter = LoadMeter(Serving(clock, busy_until=1.0).read, now_ns=clock.now_ns)
        p = Pacer(meter, 1.0, busy_threads=1, clock=clock.now, sleep=clock.sleep)
        clock.t = 0.5
        with p.chunk():
            busy = torch.get_num_threads()
        clock.t = 5.0
        with p.chunk():
            idle = torch.get_num_threads()
        assert (busy, idle) == (1, 2)
    finally:
        torch.set_num_threads(before)


def test_no_load_record_never_waits():
    clock = Clock()
    p = pacer(clock, None, share=0.1)
    assert sum(work(clock, p, 1.0) for _ in range(5)) == 0
    assert p.stats.busy_chunks == 0 and p.last is None


def test_no_wait_inside_a_write_window():
    clock = Clock()
    p = pacer(clock, Serving(clock), share=0.1)
    work(clock, p, 1.0)
    assert work(clock, p, 1.0, wait=False) == 0  # --strict-drift holds vLLM off: never wait


def test_the_wait_per_optimizer_step_is_bounded_so_training_progresses():
    clock = Clock()
    p = pacer(clock, Serving(clock), share=0.01, max_wait=4.0)
    start, steps = clock.t, 0
    for _ in range(20):  # a step: a forward chunk, then backward and the write
        work(clock, p, 0.5)
        work(clock, p, 1.0)
        p.step_done()
        steps += 1
    per_step = (clock.t - start) / steps
    assert per_step <= 4.0 + 1.5 + 0.05  # the bound plus the step's own compute
    assert p.stats.capped_waits >= 19
    assert p.stats.waited_seconds == pytest.approx(4.0 * steps, abs=0.1)


WRITER = """
import sys, time, types
from hooks import vllm_worker
from hooks.consistency import StepLock, UpdateCounter
from hooks.load import LoadRecord

class Worker:  # what the hook keeps on vLLM's rank-0 worker
    def __init__(self, d):
        self._apollo_lock = StepLock(d)
        self._apollo_waited = UpdateCounter(d, "rank0.stall_ns")
        self._apollo_unlocked = UpdateCounter(d, "rank0.unlocked_steps")
        self._apollo_load = LoadRecord(d)
        self._apollo_cuda = False

worker = Worker(sys.argv[1])
out = types.SimpleNamespace(total_num_scheduled_tokens=7, num_scheduled_tokens={"a": 4, "b": 3})
def compute(self, scheduler_output):
    time.sleep(0.002)
    return None  # sampled later, as with vLLM's async output: sample_tokens ends the step
execute = vllm_worker._locked_execute_model(compute)
sample = vllm_worker._locked_sample_tokens(lambda self, grammar: "tokens")
print("ready", flush=True)
for _ in range(int(sys.argv[2])):
    execute(worker, out)
    sample(worker, None)
empty = types.SimpleNamespace(total_num_scheduled_tokens=0, num_scheduled_tokens={})
execute(worker, empty)  # vLLM retiring finished requests: no load
sample(worker, None)
print("done", flush=True)
"""


def test_the_hooks_steps_publish_their_load_to_another_process(tmp_path):
    """The hook's own wrappers in a writer process; every read here is consistent (a torn
    read would pair one step's count with another's tokens), and a write the trainer holds
    shows up as the steps' lock wait."""
    steps = 400
    reader = LoadRecord(tmp_path)
    lock = StepLock(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(steps)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == "ready"
        reads, held = 0, False
        while proc.poll() is None:
            snap = reader.read()
            assert snap.tokens == 7 * snap.steps, snap
            assert snap.busy_ns >= snap.steps * 2_000_000 * 0.9, snap
            reads += 1
            if snap.steps > steps // 4 and not held:
                with lock.write():  # the trainer's write: the next step waits for it
                    time.sleep(0.2)
                held = True
        assert proc.stdout.readline().strip() == "done" and proc.wait() == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    final = reader.read()
    assert held and reads > 10
    assert final.steps == steps and final.tokens == 7 * steps
    assert final.last_tokens == 7 and final.last_requests == 2 and not final.in_step
    assert final.lock_wait_ns >= 0.15e9
    assert time.monotonic_ns() - final.last_end_ns < 5e9  # one clock for both processes


class _Busy(Standalone):
    """Nothing to write to, but a serving load: a record vLLM's worker would keep, with a
    step in progress (serving busy) the whole time."""

    def __init__(self, record: LoadRecord):
        super().__init__()
        self._record = record

    def serving_load(self):
        return self._record.read()


CHAT = {"messages": [{"role": "user", "content": "What is your name?"},
                     {"role": "assistant", "content": "My name is Apollo."}]}


def test_status_and_metrics_show_the_wait_and_the_load_seen(tokenizer, tmp_path):
    record = LoadRecord(tmp_path)
    record.step_started(time.monotonic_ns(), tokens=12, requests=3)
    client, _ = app_client(tokenizer, coordinator=_Busy(LoadRecord(tmp_path)),
                           max_steps_per_batch=1, train_share=0.5, train_max_wait=0.3,
                           guard="none", drift_probes=0)
    with client:
        client.post("/train", json=CHAT)
        st = wait_idle(client, 1)
        pacing, load = st["pacing"], st["serving_load"]
        assert pacing["train_share"] == 0.5 and pacing["max_wait_seconds"] == 0.3
        assert pacing["share_above"] == 1 and pacing["light_chunks"] == 0  # 3 requests > 1
        assert pacing["busy_chunks"] >= 2 and pacing["waits"] >= 1
        assert 0 < pacing["waited_seconds"] <= 0.3 * 2 + 0.1  # at most the bound per step
        assert pacing["last_seen"]["busy"] and pacing["last_seen"]["requests"] == 3
        assert load["busy"] and load["requests"] == 3
        text = client.get("/metrics").text
        values = dict(line.split(" ", 1) for line in text.splitlines()
                      if not line.startswith("#"))
        assert float(values["vllm_apollo_trainer_waited_seconds_total"]) == \
            pytest.approx(pacing["waited_seconds"])
        assert float(values["vllm_apollo_train_share"]) == 0.5
        assert float(values["vllm_apollo_serving_busy"]) == 1.0
        assert float(values["vllm_apollo_serving_requests"]) == 3.0


def test_without_vllm_status_says_no_serving_load(tokenizer):
    client, _ = app_client(tokenizer, max_steps_per_batch=1, guard="none", drift_probes=0)
    with client:
        client.post("/train", json=CHAT)
        st = wait_idle(client, 1)
        assert st["serving_load"] is None and st["pacing"]["waited_seconds"] == 0
        assert st["pacing"]["train_share"] == 0.5  # the default
        assert "vllm_apollo_serving_busy" not in client.get("/metrics").text


def test_train_nice_lowers_the_trainers_priority_not_the_apis(tokenizer):
    client, _ = app_client(tokenizer, max_steps_per_batch=1, guard="none", drift_probes=0,
                           train_nice=7)
    with client:
        client.post("/train", json=CHAT)
        wait_idle(client, 1)
        trainer = client.app.state.engine.trainer._thread
        assert os.getpriority(os.PRIO_PROCESS, trainer.native_id) == 7
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == 0


@pytest.mark.parametrize("flag", [["--train-share", "0"], ["--train-share", "1.5"],
                                  ["--train-max-wait", "-1"], ["--train-threads-busy", "-1"],
                                  ["--train-nice", "20"], ["--train-nice", "-1"],
                                  ["--train-share-above", "-2"]])
def test_bad_pacing_settings_are_refused(flag, capsys):
    from server.settings import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--export-dir", "x", *flag])
    assert flag[0] in capsys.readouterr().err
