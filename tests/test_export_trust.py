"""Whoever can write the export directory controls the trainer: the reader accepts only a
private export of this user, reads it without following links, and unpickles the handles
without running code; the owner is identified by PID and start time."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import time

import httpx
import pytest
import torch

from hooks.contract import handles_path, manifest_path, process_start
from hooks.export import export_parameters
from tests.support.server_proc import kill, start_server
from tests.support.tiny_models import make_tiny_chat_model
from weight_mapping import attach
from weight_mapping.trust import UntrustedExport


@pytest.fixture
def export_dir(tmp_path):
    d = tmp_path / "export"
    owned = torch.arange(6.0).reshape(2, 3)  # the owner's tensor: alive while the test runs
    export_parameters({"w": owned}, d, model_path=str(tmp_path))
    assert torch.equal(attach(d).tensors["w"], owned)  # valid as it is
    yield d
    del owned


class _Run:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _forge(export_dir, payload) -> None:
    path = handles_path(export_dir, 0)
    path.write_bytes(pickle.dumps(payload))
    path.chmod(0o600)


@pytest.mark.parametrize("make", [
    lambda marker: _Run(os.system, f"touch {marker}"),
    lambda marker: {"w": _Run(subprocess.call, ["touch", str(marker)])},
    lambda marker: {"w": _Run(eval, f"open({str(marker)!r}, 'w')")},
    lambda marker: {"w": _Run(torch.load, str(marker))},
    lambda marker: {"w": _Run(torch.multiprocessing.reductions.rebuild_storage_fd, 0, 0, 0)},
])
def test_a_forged_handles_pickle_is_refused_and_runs_nothing(export_dir, tmp_path, make):
    marker = tmp_path / "pwned"
    _forge(export_dir, make(marker))
    with pytest.raises(UntrustedExport, match="no export of tensors contains"):
        attach(export_dir)
    assert not marker.exists()


def test_handles_that_are_not_tensors_are_refused(export_dir):
    _forge(export_dir, {"w": "not a tensor"})
    with pytest.raises(UntrustedExport, match="mapping of names to tensors"):
        attach(export_dir)


def test_an_export_others_can_write_or_own_is_refused(export_dir, tmp_path):
    mpath = manifest_path(export_dir, 0)
    for path, mode in ((export_dir, 0o777), (export_dir, 0o770), (mpath, 0o666),
                       (handles_path(export_dir, 0), 0o620)):
        old = path.stat().st_mode & 0o777
        path.chmod(mode)
        with pytest.raises(UntrustedExport, match="writable by its group or by others"):
            attach(export_dir)
        path.chmod(old)
    if os.geteuid() == 0:  # root can give a file away; others cannot test this
        os.chown(mpath, 12345, 12345)
        with pytest.raises(UntrustedExport, match="belongs to uid 12345"):
            attach(export_dir)
        os.chown(mpath, 0, 0)
    attach(export_dir)  # restored: accepted again


def test_links_in_the_export_are_refused(export_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere.json"
    mpath = manifest_path(export_dir, 0)
    elsewhere.write_bytes(mpath.read_bytes())
    elsewhere.chmod(0o600)
    mpath.unlink()
    mpath.symlink_to(elsewhere)
    with pytest.raises(UntrustedExport, match="symbolic link"):
        attach(export_dir)
    (tmp_path / "linked").symlink_to(export_dir)
    with pytest.raises(UntrustedExport, match="symbolic link"):
        attach(tmp_path / "linked")


def test_the_owner_check_does_not_trust_a_reused_pid(export_dir):
    """A PID now held by another process is not the owner: its start time differs."""
    mpath = manifest_path(export_dir, 0)
    other = subprocess.Popen(["sleep", "60"])
    try:
        manifest = json.loads(mpath.read_text())
        assert manifest["pid_start"] == process_start(os.getpid())
        assert attach(export_dir).owner_alive()
        manifest["pid"] = other.pid  # as if the owner died and `sleep` got its PID
        mpath.write_text(json.dumps(manifest))
        assert not attach(export_dir).owner_alive()
    finally:
        other.kill()
        other.wait()


def test_train_is_refused_once_the_owner_has_died(tmp_path, default_model_dir, owner_factory):
    model_dir = make_tiny_chat_model(tmp_path / "model", default_model_dir)
    owner, export_dir = owner_factory(model_dir)
    proc, url = start_server(export_dir, "--journal", "off")
    try:
        chat = {"prompt": "q", "completion": "a"}
        assert httpx.post(f"{url}/train", json=chat).status_code == 202
        owner.proc.send_signal(signal.SIGKILL)
        owner.proc.wait()
        time.sleep(0.5)
        assert httpx.get(f"{url}/health").status_code == 503
        r = httpx.post(f"{url}/train", json=chat)
        assert r.status_code == 503 and "owns the weights has exited" in r.json()["detail"]
    finally:
        kill(proc)


def test_the_allowlist_covers_what_a_cuda_export_pickles():
    """No GPU here: the same reduce tuple torch.multiprocessing.reductions.reduce_tensor
    returns for a CUDA tensor, pickled; every global it names must be allowed (the rebuild
    itself, which needs a GPU, is replaced once allowed)."""
    import io

    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    from weight_mapping.trust import HandlesUnpickler

    args = (torch.Tensor, torch.Size([2, 3]), (3, 1), 0, torch.storage.TypedStorage,
            torch.bfloat16, 0, b"cuda-ipc-handle", 12, 0, False, b"ref-counter", 0,
            b"event", True)
    data = pickle.dumps({"w": _Run(rebuild_cuda_tensor, *args)}, protocol=4)
    names = []

    class Recording(HandlesUnpickler):
        def find_class(self, module, name):
            found = super().find_class(module, name)  # raises UntrustedExport if not allowed
            names.append((module, name))
            return (lambda *a: torch.empty(0)) if name == "rebuild_cuda_tensor" else found

    assert isinstance(Recording(io.BytesIO(data)).load()["w"], torch.Tensor)
    assert {("torch.multiprocessing.reductions", "rebuild_cuda_tensor"), ("torch", "Size"),
            ("torch.storage", "TypedStorage"), ("torch", "bfloat16")} <= set(names)
