"""What a launcher killed outright leaves behind (servers in sessions of their own, shared
memory, the run directory) is swept at the next start, and nothing of a live launcher or of a
process that merely reuses a recorded PID is touched (hooks/leftovers.py). The launcher
itself: tests/test_e2e_hardening.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil

from hooks.contract import manifest_path
from hooks.leftovers import record, state_dir, sweep
from tests.support import ROOT


def _sleeper(session: bool = False) -> subprocess.Popen:
    return subprocess.Popen(["sleep", "300"], start_new_session=session)


def test_a_dead_launchers_servers_exports_and_run_dir_are_swept(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    directory = state_dir()
    run_dir = tmp_path / "run"
    export_dir = run_dir / "export"
    export_dir.mkdir(parents=True)
    shm = f"/dev/shm/apollo-test-{os.getpid()}"
    open(shm, "wb").close()
    manifest_path(export_dir, 0).write_text(json.dumps({"shm_files": [shm]}))
    launcher, server = _sleeper(), _sleeper(session=True)
    live_launcher, live_server = _sleeper(), _sleeper(session=True)
    try:
        dead = directory / "launcher-1.json"
        record(dead, "launcher", launcher.pid, export_dir=str(export_dir),
               remove_run_dir=str(run_dir))
        record(dead, "vllm", server.pid)
        live = directory / "launcher-2.json"
        record(live, "launcher", live_launcher.pid)
        record(live, "train", live_server.pid)
        launcher.kill()
        launcher.wait()  # killed outright: no clean-up ran

        done = sweep(directory)
        assert len(done) == 1 and "stopped 1 server(s), removed 1 export(s)" in done[0]
        assert server.wait(5) is not None  # TERMed with its process group
        assert not os.path.exists(shm) and not run_dir.exists() and not dead.exists()
        assert live_server.poll() is None and live.exists()  # a live launcher's: untouched
    finally:
        for p in (launcher, server, live_launcher, live_server):
            p.kill()
            p.wait()
        if os.path.exists(shm):
            os.unlink(shm)


def test_a_reused_pid_is_not_stopped(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    directory = state_dir()
    bystander = _sleeper(session=True)
    try:
        path = directory / "launcher-1.json"
        record(path, "launcher", 2**22 + 7)  # no such process: the launcher is gone
        record(path, "vllm", bystander.pid)
        state = json.loads(path.read_text())
        state["processes"][1]["start"] += 1  # the recorded server started at another time
        path.write_text(json.dumps(state))
        sweep(directory)
        assert bystander.poll() is None and psutil.pid_exists(bystander.pid)
    finally:
        bystander.kill()
        bystander.wait()


def test_the_record_directory_must_be_private(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    (tmp_path / f"vllm-apollo-{os.geteuid()}").mkdir(mode=0o777)
    os.chmod(tmp_path / f"vllm-apollo-{os.geteuid()}", 0o777)
    r = subprocess.run([sys.executable, "-m", "hooks", "sweep"], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode != 0 and "not a private directory" in r.stderr


def test_help_is_help_not_a_directory_to_clean(tmp_path):
    """`cleanup --help` once cleaned a directory named "--help"."""
    r = subprocess.run([sys.executable, "-m", "hooks", "cleanup", "--help"], cwd=tmp_path,
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and "python -m hooks cleanup EXPORT_DIR" in r.stdout, r
    assert "removed" not in r.stderr


def test_the_files_a_stopped_vllm_left_are_removed_by_its_note_and_nothing_else(
        tmp_path, monkeypatch):
    """vLLM leaves its rendezvous file (TMPDIR/vllm_dist_ID) and, under tensor parallelism on
    CPU, shared memory (/dev/shm/vllm_dist_ID-...) behind at every stop; the worker's note
    in the export names them for `python -m hooks cleanup`, and only them."""
    from hooks import leftovers

    tmp, shm, export = tmp_path / "tmp", tmp_path / "shm", tmp_path / "export"
    for d in (tmp, shm, export):
        d.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(leftovers.tempfile, "tempdir", None)  # re-read TMPDIR
    monkeypatch.setattr(leftovers, "SHM_ROOT", str(shm))
    ours, other = "vllm_dist_" + "a" * 32, "vllm_dist_" + "b" * 32
    left = [tmp / ours, shm / f"{ours}-tp:0-[0-1]-cpushm_0", shm / f"{ours}-tp:0-[0-1]-cpushm_1"]
    kept = [tmp / other, shm / f"{other}-tp:0-[0-1]-cpushm_0", shm / "psm_1234"]
    for f in left + kept:
        f.write_bytes(b"x")
    leftovers.note_vllm_dist(export, f"file://{tmp / ours}")
    assert sorted(leftovers.remove_vllm_dist(export)) == sorted(left)
    assert not any(f.exists() for f in left) and all(f.exists() for f in kept)
    assert not (export / leftovers.VLLM_DIST).exists()
    # a note that names anything but vLLM's own pattern removes nothing
    for planted in ("../../etc/passwd", "vllm_dist_", "vllm_dist_" + "a" * 31 + "/x",
                    "psm_1234"):
        (export / leftovers.VLLM_DIST).write_text(planted)
        assert leftovers.remove_vllm_dist(export) == []
    assert all(f.exists() for f in kept)
    leftovers.note_vllm_dist(export, "tcp://127.0.0.1:1234")  # not a file: nothing noted
    assert not (export / leftovers.VLLM_DIST).exists()
