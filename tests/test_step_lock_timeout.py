"""A writer stopped (SIGSTOP) while it holds the step lock does not freeze vLLM's engine steps
beyond the hook's bound: the hook's own execute_model wrapper, a real stopped process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psutil

from hooks import vllm_worker
from hooks.consistency import StepLock, UpdateCounter
from tests.support import ROOT

HOLDER = """
import os, signal, sys
from hooks.consistency import StepLock
with StepLock(sys.argv[1]).write():
    print("holding", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)  # stopped mid-write, as by ^Z or a debugger
    print("resumed", flush=True)
    sys.stdin.readline()  # holds on until told
"""
BOUND = 1.0  # VLLM_APOLLO_STEP_LOCK_TIMEOUT for this test


class Worker:
    """What the hook keeps on vLLM's worker (hooks/vllm_worker.py, rank 0)."""

    def __init__(self, export_dir):
        self._apollo_lock = StepLock(export_dir)
        self._apollo_waited = UpdateCounter(export_dir, "rank0.stall_ns")
        self._apollo_unlocked = UpdateCounter(export_dir, "rank0.unlocked_steps")
        self._apollo_cuda = False


def _step(worker) -> float:
    """One engine step through the hook's wrapper, in a thread: seconds it took (inf if it
    did not return within 5 s)."""
    execute = vllm_worker._locked_execute_model(lambda self: "sampled tokens")
    done = threading.Event()
    t0 = time.monotonic()
    threading.Thread(target=lambda: (execute(worker), done.set()), daemon=True).start()
    return time.monotonic() - t0 if done.wait(5.0) else float("inf")


def test_a_stopped_writer_does_not_freeze_serving(tmp_path, monkeypatch):
    monkeypatch.setattr(vllm_worker, "STEP_LOCK_TIMEOUT", BOUND)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "holding"
        while psutil.Process(holder.pid).status() != psutil.STATUS_STOPPED:
            time.sleep(0.01)
        worker = Worker(tmp_path)
        first = _step(worker)
        assert BOUND <= first < BOUND + 0.5, first  # waited the bound, then went on
        later = [_step(worker) for _ in range(20)]
        assert max(later) < 0.1, later  # no wait at all while the holder still holds it
        assert worker._apollo_unlocked.read() == 21
        assert worker._apollo_waited.read() / 1e9 >= BOUND

        holder.send_signal(signal.SIGCONT)  # it resumes, finishes its write, lets go
        assert holder.stdout.readline().strip() == "resumed"
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(10) == 0
        assert _step(worker) < 0.1
        assert worker._apollo_unlocked.read() == 21 and not worker._apollo_lock.bypassing
        # and the lock excludes writers again: a writer waits for a step that holds it
        assert worker._apollo_lock.acquire_step(BOUND)
        writer = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=ROOT,
                                  stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
        time.sleep(0.5)
        assert writer.poll() is None and psutil.Process(writer.pid).status() != \
            psutil.STATUS_STOPPED  # blocked on the lock, not yet holding it
        worker._apollo_lock.release_step()
        assert writer.stdout.readline().strip() == "holding"
        writer.kill()
        writer.wait()
    finally:
        holder.kill()
        holder.wait()
