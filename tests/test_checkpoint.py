"""checkpoint/: only changed bytes are written, in place, and a crash never leaves a mix."""

import errno
import json
import os
import random
import signal
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoint import Checkpointer, read_layout, recover
from checkpoint.__main__ import main as checkpoint_cli
from tests.support.states import one_value
from tests.support.zygote import Zygote


def _model_dir(tmp_path, tensors, dtype=torch.float32, shards=1):
    names = list(tensors)
    if shards == 1:
        save_file({k: v.to(dtype) for k, v in tensors.items()}, tmp_path / "model.safetensors")
        return tmp_path
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k].to(dtype) for k in part}, tmp_path / fname)
        weight_map.update({k: fname for k in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tmp_path


def _load_all(model_dir):
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("shards", [1, 3])
def test_only_changed_tensors_are_written(tmp_path, shards):
    torch.manual_seed(0)
    tensors = {f"model.layers.{i}.w": torch.randn(256, 512) for i in range(8)}
    model_dir = _model_dir(tmp_path, tensors, shards=shards)
    files_before = {f: f.stat().st_size for f in model_dir.glob("*.safetensors")}
    live = {k: v.clone() for k, v in tensors.items()}
    ck = Checkpointer(model_dir, live, chunk_bytes=64 * 1024)
    assert ck.sync().bytes_written == 0  # nothing changed yet

    with torch.no_grad():  # "train" two layers, leave the rest frozen
        live["model.layers.2.w"].add_(1e-3)
        live["model.layers.5.w"][7, 3] += 1.0
    result = ck.sync()
    changed_bytes = live["model.layers.2.w"].nbytes + 64 * 1024  # one whole tensor + 1 chunk
    assert result.tensors == 2
    assert result.bytes_written == changed_bytes
    assert changed_bytes < result.journal_bytes < changed_bytes + 4096  # data + small header
    assert {f: f.stat().st_size for f in model_dir.glob("*.safetensors")} == files_before
    on_disk = _load_all(model_dir)
    assert all(torch.equal(on_disk[k], live[k]) for k in live)
    assert checkpoint_cli(["verify", str(model_dir)]) == 0


def test_dtype_of_the_file_is_kept(tmp_path):
    tensors = {"w": torch.randn(64, 64)}
    model_dir = _model_dir(tmp_path, tensors, dtype=torch.bfloat16)
    live = {"w": tensors["w"].to(torch.bfloat16).float()}
    ck = Checkpointer(model_dir, live)
    live["w"].mul_(1.5)
    ck.sync()
    assert read_layout(model_dir)["w"].dtype == torch.bfloat16
    assert torch.equal(load_file(model_dir / "model.safetensors")["w"],
                       live["w"].to(torch.bfloat16))


def test_an_empty_tensor_in_the_files_is_no_obstacle(tmp_path):
    """A model file may hold a tensor with no elements: it has no chunks to compare or write."""
    tensors = {"empty": torch.zeros(0, 8), "w": torch.randn(64, 64)}
    model_dir = _model_dir(tmp_path, tensors)
    live = {k: v.clone() for k, v in tensors.items()}
    ck = Checkpointer(model_dir, live, chunk_bytes=4096)
    assert ck.sync().bytes_written == 0
    live["w"].add_(1.0)
    assert ck.sync().bytes_written == live["w"].nbytes
    assert torch.equal(load_file(model_dir / "model.safetensors")["w"], live["w"])


def test_verify_reports_damage(tmp_path, capsys):
    model_dir = _model_dir(tmp_path, {"w": torch.randn(64, 64)})
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    assert checkpoint_cli(["verify", str(model_dir)]) == 1
    assert "truncated" in capsys.readouterr().err
    assert checkpoint_cli(["verify", str(tmp_path / "nope")]) == 2


def test_kill_9_during_syncs_never_leaves_a_mix(tmp_path):
    """>= 100 MB model, 30 kills at random moments; after recovery the files hold the state
    before or after the interrupted sync, every tensor the same one."""
    n = 4
    tensors = {f"t{i}": torch.full((7_000_000,), float(i)) for i in range(n)}  # 112 MB
    model_dir = _model_dir(tmp_path, tensors)
    rng = random.Random(1234)
    outcomes = {"before": 0, "after": 0}
    # each child a fresh process, forked from one that imported it once (support/zygote.py)
    with Zygote("tests.support.crash_sync_child") as zygote:
        for _ in range(30):
            child = zygote.spawn(str(model_dir))
            assert child.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.0, 1.5))
            child.send_signal(signal.SIGKILL)
            lines = child.stdout.read().split()
            child.wait()
            begun = [int(v) for k, v in zip(lines[::2], lines[1::2], strict=True)
                     if k == "begin"]
            recover(model_dir)
            on_disk = load_file(model_dir / "model.safetensors")
            states = set()
            for i in range(n):
                states.add(int(one_value(on_disk[f"t{i}"], f"t{i}") - i) // 10)
            assert len(states) == 1, f"tensors from different syncs: {states}"
            state = states.pop()
            if begun:
                assert state in (begun[-1] - 1, begun[-1])
                outcomes["after" if state == begun[-1] else "before"] += 1
    print(f"\nkill -9 outcomes: {outcomes}")
    assert outcomes["before"] + outcomes["after"] >= 20  # most kills landed during work
    assert checkpoint_cli(["verify", str(model_dir)]) == 0


def _partial(real, most):
    """os.write / os.pwrite that write at most `most` bytes per call (as a signal may cause)."""
    return lambda fd, data, *pos: real(fd, memoryview(data).cast("B")[:most], *pos)


def _syncable(tmp_path, chunk_bytes=4096):
    torch.manual_seed(0)
    tensors = {"w": torch.randn(64, 64), "v": torch.randn(300)}
    model_dir = _model_dir(tmp_path, tensors)
    live = {k: v.clone() for k, v in tensors.items()}
    ck = Checkpointer(model_dir, live, chunk_bytes=chunk_bytes)
    live["w"].add_(1.0)
    live["v"][7] = 9.0
    return model_dir, live, ck


def test_short_pwrites_are_completed(tmp_path, monkeypatch):
    model_dir, live, ck = _syncable(tmp_path)
    monkeypatch.setattr(os, "pwrite", _partial(os.pwrite, 1000))
    ck.sync()
    monkeypatch.undo()
    on_disk = _load_all(model_dir)
    assert all(torch.equal(on_disk[k], live[k]) for k in live)


def test_short_writes_to_the_journal_are_completed(tmp_path, monkeypatch):
    """The journal is written in short writes, then the in-place writes fail: the committed
    journal alone must hold the whole sync."""
    model_dir, live, ck = _syncable(tmp_path)
    monkeypatch.setattr(os, "write", _partial(os.write, 1000))

    def failing_pwrite(*args):
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(os, "pwrite", failing_pwrite)
    with pytest.raises(OSError, match="injected"):
        ck.sync()
    monkeypatch.undo()
    assert recover(model_dir) == "rolled forward a committed sync"
    on_disk = _load_all(model_dir)
    assert all(torch.equal(on_disk[k], live[k]) for k in live)


def test_a_write_that_makes_no_progress_raises_and_the_next_sync_finishes_it(tmp_path,
                                                                              monkeypatch):
    model_dir, live, ck = _syncable(tmp_path)
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: 0)
    with pytest.raises(OSError, match="no progress"):
        ck.sync()
    monkeypatch.undo()
    assert (model_dir / ".apollo-sync.journal").exists()  # committed, not yet in the files
    ck.sync()
    assert not (model_dir / ".apollo-sync.journal").exists()
    on_disk = _load_all(model_dir)
    assert all(torch.equal(on_disk[k], live[k]) for k in live)


def test_a_file_written_whole_is_flushed_as_it_goes(tmp_path, monkeypatch):
    """A sync that rewrites a whole file never leaves more than FLUSH_BYTES of it unflushed
    (an fsync elsewhere, the example log's, would wait for all of it); the file is right."""
    import checkpoint.durable as durable

    torch.manual_seed(0)
    tensors = {f"model.layers.{i}.w": torch.randn(128, 256) for i in range(8)}  # 1 MiB
    model_dir = _model_dir(tmp_path, tensors)
    live = {k: v.clone() for k, v in tensors.items()}
    ck = Checkpointer(model_dir, live, chunk_bytes=16 * 1024, history=None)
    with torch.no_grad():
        for k in list(live)[:6]:
            live[k].add_(1e-3)  # most of the file: written whole
    monkeypatch.setattr(durable, "FLUSH_BYTES", 64 * 1024)
    unflushed, worst = {}, [0]
    real = {f: getattr(os, f) for f in ("pwrite", "copy_file_range", "fdatasync", "fsync")}

    def count(fd, n):
        unflushed[fd] = unflushed.get(fd, 0) + n
        worst[0] = max(worst[0], unflushed[fd])
        return n

    monkeypatch.setattr(os, "pwrite", lambda fd, d, o: count(fd, real["pwrite"](fd, d, o)))
    monkeypatch.setattr(os, "copy_file_range", lambda src, dst, n, *a: count(
        dst, real["copy_file_range"](src, dst, n, *a)))
    monkeypatch.setattr(os, "fdatasync", lambda fd: (unflushed.pop(fd, 0),
                                                     real["fdatasync"](fd))[1])
    monkeypatch.setattr(os, "fsync", lambda fd: (unflushed.pop(fd, 0), real["fsync"](fd))[1])
    result = ck.sync()
    monkeypatch.undo()
    assert result.whole_files == 1 and result.bytes_written > 8 * 64 * 1024
    assert worst[0] <= 64 * 1024 + 16 * 1024  # the flush interval and one chunk
    on_disk = _load_all(model_dir)
    assert all(torch.equal(on_disk[k], live[k]) for k in live)


def test_durable_helpers(tmp_path, monkeypatch):
    from checkpoint.durable import atomic_replace, fsync_dir, pwrite_all, write_all

    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    monkeypatch.setattr(os, "write", _partial(os.write, 3))
    monkeypatch.setattr(os, "pwrite", _partial(os.pwrite, 3))
    assert write_all(fd, b"0123456789") == 10
    assert pwrite_all(fd, torch.arange(4, dtype=torch.int32).numpy(), 2) == 16  # not bytes
    monkeypatch.undo()
    os.close(fd)
    assert path.read_bytes() == b"01" + torch.arange(4, dtype=torch.int32).numpy().tobytes()

    outside = tmp_path / "outside"
    (tmp_path / "f.tmp").symlink_to(outside)  # planted: must not be written through
    assert atomic_replace(path, [b"new ", memoryview(b"content")]) == 11
    assert path.read_bytes() == b"new content" and not outside.exists()
    assert not os.path.lexists(tmp_path / "f.tmp")

    def failing():
        yield b"half"
        raise OSError(errno.ENOSPC, "injected")

    with pytest.raises(OSError, match="injected"):
        atomic_replace(path, failing(), durable=False)
    assert path.read_bytes() == b"new content" and not os.path.lexists(tmp_path / "f.tmp")
    fsync_dir(tmp_path)
