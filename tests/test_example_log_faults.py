"""The example log under faults: short writes, failed fsyncs, a full file system, damage in
the file, a second server. No 2xx for an unwritten record; every acknowledged example is
trained exactly once; what cannot be masked turns the service unhealthy."""

from __future__ import annotations

import errno
import os
import subprocess
import time

import httpx
import pytest
import torch

from server.engine import example_log as example_log_module
from server.engine.example_log import ExampleLog
from server.engine.example_replay import ExampleLogCorrupt, replay
from server.engine.exclusive import AlreadyRunning
from server.engine.tokenization import Encoded
from tests.support.app import app_client, wait_idle
from tests.support.server_proc import kill, start_server
from tests.support.tiny_models import make_tiny_chat_model

CHAT = {"messages": [{"role": "user", "content": "What is your name?"},
                     {"role": "assistant", "content": "My name is Apollo."}]}
E = Encoded([1, 2, 3], [-100, 2, 3])


def _fail_log_writes(monkeypatch, fd: int, fail) -> None:
    """os.write on the example log's fd runs `fail(data, real_write)`; other fds are real."""
    real = os.write

    def write(f, data):
        return fail(data, real) if f == fd else real(f, data)

    monkeypatch.setattr(os, "write", write)


def test_a_short_write_is_undone_and_never_acknowledged(tokenizer, tmp_path, monkeypatch):
    path = tmp_path / "examples.jsonl"
    client, _ = app_client(tokenizer, journal=str(path), max_steps_per_batch=1)
    with client:
        first = client.post("/train", json=CHAT).json()["ids"][0]
        wait_idle(client, 1)
        before, status = path.read_bytes(), client.get("/status").json()
        calls = []

        def half_then_full(data, real):  # what a nearly full disk does
            calls.append(len(data))
            if len(calls) == 1:
                return real(client.app.state.engine.example_log._fd, bytes(data)[:len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        _fail_log_writes(monkeypatch, client.app.state.engine.example_log._fd, half_then_full)
        r = client.post("/train", json=CHAT)
        assert r.status_code == 507, r.text
        assert "nothing was logged" in r.json()["detail"]
        assert len(calls) == 2  # the short write was noticed and continued, then failed
        assert path.read_bytes() == before  # the half record was cut off again
        assert client.get("/status").json() == status
        monkeypatch.undo()
        second = client.post("/train", json=CHAT).json()["ids"][0]
        wait_idle(client, 2)
        assert client.get("/health").status_code == 200
    state = replay(path, applied_steps=2)
    assert list(state.accepted) == [first, second] and set(state.trained) == {first, second}


def test_a_failed_fsync_acknowledges_nothing_and_turns_the_service_unhealthy(
        tokenizer, tmp_path, monkeypatch):
    path = tmp_path / "examples.jsonl"
    client, _ = app_client(tokenizer, journal=str(path))
    with client:
        fd = client.app.state.engine.example_log._fd
        real_fsync = os.fsync

        def fsync(f):
            if f == fd:
                raise OSError(errno.EIO, "Input/output error")
            return real_fsync(f)

        monkeypatch.setattr(os, "fsync", fsync)
        r = client.post("/train", json=CHAT)
        assert r.status_code == 503 and "fsync" in r.json()["detail"], r.text
        monkeypatch.undo()  # a later fsync may succeed: after a failed one it proves nothing
        health = client.get("/health")
        assert health.status_code == 503 and "fsync" in health.json()["detail"]
        assert client.post("/train", json=CHAT).status_code == 503
        assert client.get("/status").json()["examples_queued"] == 0


def test_an_outcome_that_cannot_be_logged_turns_the_service_unhealthy(
        tokenizer, tmp_path, monkeypatch):
    """The trainer thread used to die here while /train kept answering 202 and /health 200."""
    path = tmp_path / "examples.jsonl"
    client, _ = app_client(tokenizer, journal=str(path), max_steps_per_batch=1)
    with client:
        def no_outcome(data, real):
            if b'"op":"done"' in bytes(data):
                raise OSError(errno.EIO, "Input/output error")
            return real(client.app.state.engine.example_log._fd, data)

        _fail_log_writes(monkeypatch, client.app.state.engine.example_log._fd, no_outcome)
        assert client.post("/train", json=CHAT).status_code == 202
        for _ in range(600):
            health = client.get("/health")
            if health.status_code != 200:
                break
            time.sleep(0.05)
        assert health.status_code == 503, "the service stayed healthy"
        assert "example log" in health.json()["detail"]
        r = client.post("/train", json=CHAT)
        assert r.status_code == 503 and "example log" in r.json()["detail"]


def test_damage_before_the_last_line_stops_the_start_and_names_the_line(tokenizer, tmp_path):
    path = tmp_path / "examples.jsonl"
    j = ExampleLog(path)
    j.accept([("a", E)])
    j.close()
    with open(path, "ab") as f:
        f.write(b'{"op":"acc\n')  # a torn append that a later one followed (old writers)
    j = ExampleLog(path)
    j.accept([("b", E)])  # acknowledged: it must not vanish
    j.close()
    before = path.read_bytes()
    with pytest.raises(ExampleLogCorrupt, match="line 2"):
        replay(path, applied_steps=0)
    client, _ = app_client(tokenizer, journal=str(path))
    with pytest.raises(ExampleLogCorrupt, match="line 2"), client:
        pass
    assert path.read_bytes() == before  # nothing compacted away


def test_a_torn_last_line_is_cut_off_even_when_compaction_cannot_be_written(
        tmp_path, monkeypatch):
    path = tmp_path / "examples.jsonl"
    j = ExampleLog(path)
    j.accept([("a", E)])
    j.close()
    with open(path, "ab") as f:
        f.write(b'{"op":"accept","items":[{"id":"torn"')  # never acknowledged

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(example_log_module, "atomic_replace", full)
    j = ExampleLog(path)
    assert j.restore(applied_steps=0).pending == ["a"]
    j.accept([("b", E)])
    j.close()
    assert replay(path, applied_steps=0).pending == ["a", "b"]


def test_one_process_per_example_log(tmp_path):
    j = ExampleLog(tmp_path / "examples.jsonl")
    with pytest.raises(AlreadyRunning, match="another training server"):
        ExampleLog(tmp_path / "examples.jsonl")
    j.close()
    ExampleLog(tmp_path / "examples.jsonl").close()  # released with its holder


def test_a_second_training_server_on_the_same_model_refuses_to_start(
        tmp_path, default_model_dir, owner_factory):
    model_dir = make_tiny_chat_model(tmp_path / "model", default_model_dir)
    _, export_dir = owner_factory(model_dir)
    first, url = start_server(export_dir)  # --journal auto: MODEL_DIR/.apollo/examples.jsonl
    try:
        r = httpx.post(f"{url}/train", json=CHAT)
        assert r.status_code == 202
        log_before = (model_dir / ".apollo/examples.jsonl").read_bytes()
        for extra in ((), ("--journal", str(tmp_path / "other.jsonl"))):
            second, _ = start_server(export_dir, *extra, wait=False, stderr=subprocess.PIPE)
            try:
                _, err = second.communicate(timeout=90)
            finally:
                kill(second)
            assert second.returncode == 2, err[-2000:]
            assert "another training server" in err and "Traceback" not in err
        assert httpx.get(f"{url}/health").status_code == 200
        assert (model_dir / ".apollo/examples.jsonl").read_bytes()[:len(log_before)] == \
            log_before
    finally:
        kill(first)


@pytest.fixture
def small_fs(tmp_path):
    """A 64 KiB tmpfs (root only) and a function that grows it."""
    d = tmp_path / "small"
    d.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)],
            capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a size-limited tmpfs")

    def grow():
        subprocess.run(["mount", "-o", "remount,size=4m", str(d)], check=True)

    yield d, grow
    subprocess.run(["umount", "-l", str(d)], check=False)


def test_a_full_disk_while_keeping_the_drift_reference_raises_os_error_and_leaves_nothing(
        small_fs):
    """The drift reference and the guard's bases are a cache beside the example log: on a
    full disk their save raises OSError, which the monitor logs and goes on from — not
    torch's own RuntimeError, which failed the batch that made them (an acknowledged example
    lost) — and leaves no partial file."""
    from server.engine import drift

    directory, _ = small_fs
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    ref = drift.Reference(prompts=[[1] * 8], answers=[[2] * 12],
                          top_ids=[torch.zeros(12, 16, dtype=torch.long)],
                          top_logp=[torch.zeros(12, 16)], digest="x")
    with pytest.raises(OSError):
        ref.save(directory / "probe-reference.pt")
    assert [p.name for p in directory.iterdir()] == ["filler"]


def test_a_full_file_system_loses_no_acknowledged_example(
        tmp_path, default_model_dir, owner_factory, small_fs):
    """Until the disk is full every 2xx is logged; then 507 or 503, never a 2xx; after a
    restart with space again every acknowledged example is trained exactly once."""
    directory, grow = small_fs
    model_dir = make_tiny_chat_model(tmp_path / "model", default_model_dir)
    _, export_dir = owner_factory(model_dir)
    args = ("--journal", str(directory / "examples.jsonl"), "--batch-size", "1",
            "--max-steps-per-batch", "1", "--learned-prob", "1")
    proc, url = start_server(export_dir, *args)
    acked: list[str] = []
    refused: list[int] = []
    try:
        for k in range(2000):
            body = {"prompt": f"question {k}", "completion": f"answer {k} " + "word " * 60}
            r = httpx.post(f"{url}/train", json=body, timeout=30)
            if r.status_code == 202:
                acked.extend(r.json()["ids"])
            else:
                assert r.status_code in (503, 507), r.text
                refused.append(r.status_code)
                if len(refused) >= 5:
                    break
        assert refused, "the file system never filled"
        assert acked
    finally:
        kill(proc)
    grow()
    proc, url = start_server(export_dir, *args)
    try:
        for _ in range(1200):
            st = httpx.get(f"{url}/status").json()
            if st["examples_queued"] == 0:
                break
            time.sleep(0.1)
        states = {i: httpx.get(f"{url}/examples/{i}").json().get("state") for i in acked}
        reasons = {i: httpx.get(f"{url}/examples/{i}").json().get("reason")
                   for i, state in states.items() if state != "trained"}
        assert set(states.values()) == {"trained"}, reasons
        assert st["examples_trained"] == len(acked)  # nothing refused was logged
        assert st["applied_steps"] == st["examples_trained"]  # once each (batch 1, 1 step)
        print(f"\n{len(acked)} acknowledged before the disk was full, refused: {refused}")
    finally:
        kill(proc)


def test_the_example_log_is_never_written_through_a_link(tmp_path):
    target = tmp_path / "victim"
    target.write_text("precious\n")
    (tmp_path / "log").mkdir()
    (tmp_path / "log/examples.jsonl").symlink_to(target)
    with pytest.raises(Exception, match="symbolic link"):
        ExampleLog(tmp_path / "log/examples.jsonl")
    assert target.read_text() == "precious\n"


def test_reads_do_not_wait_for_a_slow_example_log_fsync(tokenizer, tmp_path, monkeypatch):
    """A POST /train waits for its fsync (nothing is acknowledged before it is durable), but
    /status and /metrics do not: a disk busy with a checkpoint's writes stalled every read
    behind the accepting request's fsync."""
    import threading

    client, _ = app_client(tokenizer, journal=str(tmp_path / "examples.jsonl"),
                           max_steps_per_batch=1)
    with client:
        fd = client.app.state.engine.example_log._fd
        real, slow = os.fsync, threading.Event()

        def fsync(f):
            if f == fd:
                slow.set()
                time.sleep(3.0)
            return real(f)

        monkeypatch.setattr(os, "fsync", fsync)
        posted = {}
        poster = threading.Thread(target=lambda: posted.update(
            r=client.post("/train", json=CHAT)))
        poster.start()
        assert slow.wait(10)
        t0 = time.monotonic()
        for path in ("/status", "/metrics", "/health"):
            assert client.get(path).status_code == 200
        took = time.monotonic() - t0
        poster.join()
        assert posted["r"].status_code == 202
        assert took < 1.5, f"reads waited {took:.1f} s for the example log's fsync"
