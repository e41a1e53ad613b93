"""End to end, through the launcher and real vLLM: a read-only model directory is served and
trained with checkpointing disabled; a writer stopped (SIGSTOP) while holding the step lock
does not freeze serving; what a launcher killed outright left behind is swept at the next
start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support import ROOT
from tests.support.stack import Stack
from tests.support.tiny_models import make_tiny_chat_model

pytestmark = pytest.mark.e2e
LOCK_TIMEOUT = 2.0
CHAT = {"messages": [{"role": "user", "content": "What is your name?"},
                     {"role": "assistant", "content": "My name is Apollo."}]}
HOLDER = """
import os, signal, sys
from hooks.consistency import StepLock
with StepLock(sys.argv[1]).write():
    print("holding", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
    sys.stdin.readline()
"""


def _tree(d: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in d.iterdir()}


@pytest.fixture(scope="module")
def read_only_model(tmp_path_factory, default_model_dir):
    model_dir = make_tiny_chat_model(tmp_path_factory.mktemp("ro") / "model", default_model_dir,
                                     max_position_embeddings=1024)
    if subprocess.run(["chattr", "+i", str(model_dir)], capture_output=True).returncode != 0:
        if os.geteuid() == 0:
            pytest.skip("running as root where chattr +i is not available")
        model_dir.chmod(0o555)
    yield model_dir
    subprocess.run(["chattr", "-i", str(model_dir)], capture_output=True)
    model_dir.chmod(0o755)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {"VLLM_APOLLO_STEP_LOCK_TIMEOUT": str(LOCK_TIMEOUT),
            "XDG_RUNTIME_DIR": str(tmp_path_factory.mktemp("xdg"))}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, read_only_model, env):
    s = Stack(tmp_path_factory.mktemp("stack"), read_only_model, journal=False, env=env)
    yield s
    s.stop()


def test_a_read_only_model_directory_is_served_and_trained_without_checkpoints(
        stack, read_only_model):
    before = _tree(read_only_model)
    log = (stack.run_dir / "launcher.log").read_text()
    assert "is read-only: serving and training with checkpointing disabled" in log
    st = httpx.get(f"{stack.train}/status").json()
    assert "read-only" in st["checkpointing_disabled"]
    ids = httpx.post(f"{stack.train}/train", json=CHAT).json()["ids"]
    assert stack.wait_trained(ids)["applied_steps"] >= 1
    r = httpx.post(f"{stack.train}/checkpoint")
    assert r.status_code == 409 and "read-only" in r.json()["detail"]
    assert ids[0] in (stack.run_dir / "export/examples.jsonl").read_text()  # the log's home
    assert _tree(read_only_model) == before  # nothing written there
    assert stack.ask("Hello") is not None


def test_a_stopped_writer_does_not_freeze_serving(stack):
    t0 = time.monotonic()
    stack.ask("Say something.")
    normal = time.monotonic() - t0
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(stack.run_dir / "export")],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "holding"
        while psutil.Process(holder.pid).status() != psutil.STATUS_STOPPED:
            time.sleep(0.01)
        t0 = time.monotonic()
        answer = stack.ask("Say something else.")
        stalled = time.monotonic() - t0
        print(f"\nan answer takes {normal:.1f} s; with the lock held by a stopped process "
              f"{stalled:.1f} s (bound {LOCK_TIMEOUT} s)")
        assert answer is not None and stalled < normal + LOCK_TIMEOUT + 5
        unlocked = httpx.get(f"{stack.train}/status").json()["vllm_unlocked_steps"]
        assert unlocked > 0
        holder.send_signal(signal.SIGCONT)
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(10) == 0
        stack.ask("And again.")
        assert httpx.get(f"{stack.train}/status").json()["vllm_unlocked_steps"] == unlocked
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_launchers_leftovers_are_swept_at_the_next_start(
        stack, tmp_path_factory, read_only_model, env):
    servers = stack.descendants()
    shm = [Path(f) for f in stack.manifest()["shm_files"]]
    assert servers and shm and all(f.exists() for f in shm)
    os.kill(stack.proc.pid, signal.SIGKILL)  # no clean-up runs
    stack.proc.wait()
    time.sleep(1)
    assert all(psutil.pid_exists(p) for p in servers)  # in sessions of their own: left over
    again = Stack(tmp_path_factory.mktemp("again"), read_only_model, env=env)
    try:
        assert "swept after launcher" in (again.run_dir / "launcher.log").read_text()
        assert not any(psutil.pid_exists(p) and psutil.Process(p).status() !=
                       psutil.STATUS_ZOMBIE for p in servers)
        assert not any(f.exists() for f in shm)
        assert not (stack.run_dir / "export/rank0.json").exists()
        assert again.ask("Hello") is not None
    finally:
        again.stop()
