"""checkpoint/ against hostile model directories: forged journals, unsafe index paths,
symbolic and hard links, files replaced behind its back, read-only directories.

Every attack is checked by its effect: a sentinel outside the model directory keeps its bytes
and mtime, no file appears outside, and the model's own files are unchanged when refused.

Over 300 lines on purpose: one subject (hostile model directories) with one short test per
attack, all checked by the same sentinel.
"""

import json
import os
import struct
import subprocess
import sys
import zlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoint import Checkpointer, read_layout
from checkpoint.__main__ import main as checkpoint_cli
from tests.support import ROOT

JOURNAL = ".apollo-sync.journal"
TENSORS = {"a": torch.arange(64 * 64, dtype=torch.float32).view(64, 64),
           "b": torch.arange(32, dtype=torch.float32)}


def _model_dir(root, name="model", tensors=TENSORS):
    d = root / name
    d.mkdir(parents=True)
    save_file(dict(tensors), d / "model.safetensors")
    (d / "config.json").write_text('{"architectures": ["Whatever"]}')
    return d


def _forge(path, entries, header=None):
    """A journal in the on-disk format with a valid CRC: entries (file, offset, bytes)."""
    if header is None:
        header = [{"file": f, "offset": o, "length": len(b)} for f, o, b in entries]
    head = json.dumps(header).encode()
    body = b"APOLLOJ2" + struct.pack("<Q", len(head)) + head + b"".join(b for *_, b in entries)
    path.write_bytes(body + struct.pack("<I", zlib.crc32(body)))


def _tree(root, skip=()):
    """Every path under root (not following links) -> its bytes and mtime, or its link."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in map(str, skip)]
        for n in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if os.path.islink(p):
                out[p] = ("link", os.readlink(p))
            else:
                with open(p, "rb") as f:
                    out[p] = (f.read(), st.st_mtime_ns)
    return out


class Outside:
    """A directory next to the model's with sentinels; the test's end checks that nothing
    outside the model directory changed since seal() (called at the start, and again by a
    test after its own set-up outside)."""

    def __init__(self, tmp_path):
        self.root = tmp_path
        self.dir = tmp_path / "outside"
        self.dir.mkdir()
        (self.dir / "victim.bin").write_bytes(b"precious bytes, not a model\n" * 64)
        (self.dir / "victim.safetensors").write_bytes(b"x" * 4096)
        save_file({"a": torch.zeros(64, 64)}, self.dir / "evil.safetensors")
        self.seal()

    def tree(self):
        return _tree(self.root, skip=[self.root / "model"])

    def seal(self):
        self.before = self.tree()

    def __truediv__(self, name):
        return self.dir / name


@pytest.fixture
def outside(tmp_path):
    out = Outside(tmp_path)
    yield out
    assert out.tree() == out.before, "something outside the model directory changed"


def _recover(model_dir, capsys):
    code = checkpoint_cli(["recover", str(model_dir)])
    return code, capsys.readouterr()


# -- forged journals ------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["../outside/victim.bin", "ABS", "sub/../../outside/victim.bin",
                                    "../outside/victim.safetensors"])
def test_recover_refuses_journal_paths_outside_the_model_dir(tmp_path, outside, capsys, target):
    model_dir = _model_dir(tmp_path)
    (model_dir / "sub").mkdir()
    target = str(outside / "victim.bin") if target == "ABS" else target
    model = (model_dir / "model.safetensors").read_bytes()
    _forge(model_dir / JOURNAL, [(target, 0, b"pwned by a forged journal")])
    code, out = _recover(model_dir, capsys)
    assert code == 1
    assert "refusing to replay" in out.err and "not a safetensors file" in out.err
    assert (model_dir / "model.safetensors").read_bytes() == model
    assert (model_dir / JOURNAL).exists()  # left for the user to inspect


def test_recover_refuses_journal_naming_a_non_weights_file(tmp_path, outside, capsys):
    model_dir = _model_dir(tmp_path)
    config = (model_dir / "config.json").read_bytes()
    _forge(model_dir / JOURNAL, [("config.json", 0, b'{"trust_remote_code": true} ')])
    code, out = _recover(model_dir, capsys)
    assert code == 1 and "not a safetensors file" in out.err
    assert (model_dir / "config.json").read_bytes() == config


def _data_start(model_dir):
    return min(s.offset for s in read_layout(model_dir).values())


@pytest.mark.parametrize("where", ["header", "length-prefix", "past-end", "extends-file",
                                   "straddles-two-tensors", "negative"])
def test_recover_refuses_offsets_outside_tensor_data(tmp_path, outside, capsys, where):
    model_dir = _model_dir(tmp_path)
    path = model_dir / "model.safetensors"
    model, size = path.read_bytes(), path.stat().st_size
    slots = sorted(read_layout(model_dir).values(), key=lambda s: s.offset)
    offset, data = {
        "header": (_data_start(model_dir) - 4, b"}   "),
        "length-prefix": (0, b"\xff" * 8),
        "past-end": (size + 4096, b"\x00" * 8),
        "extends-file": (size - 4, b"\x00" * 64),
        "straddles-two-tensors": (slots[0].offset + slots[0].nbytes - 4, b"\x00" * 8),
        "negative": (-8, b"\x00" * 8),
    }[where]
    _forge(model_dir / JOURNAL, [("model.safetensors", offset, data)])
    code, out = _recover(model_dir, capsys)
    assert code == 1 and "refusing to replay" in out.err
    assert path.read_bytes() == model and path.stat().st_size == size


@pytest.mark.parametrize("header", [{"file": "model.safetensors"}, [{"file": 3, "offset": 0,
                                    "length": 0}], [{"file": "model.safetensors",
                                                     "offset": 200, "length": 8.5}],
                                    [{"file": "model.safetensors", "offset": 200,
                                      "length": 99}]])
def test_recover_refuses_a_malformed_journal_with_a_valid_checksum(tmp_path, outside, capsys,
                                                                   header):
    model_dir = _model_dir(tmp_path)
    model = (model_dir / "model.safetensors").read_bytes()
    _forge(model_dir / JOURNAL, [("model.safetensors", 200, b"\x00" * 8)], header=header)
    code, out = _recover(model_dir, capsys)
    assert code == 1 and "refusing to replay" in out.err
    assert (model_dir / "model.safetensors").read_bytes() == model


def test_recover_still_replays_a_genuine_journal(tmp_path, outside, capsys):
    model_dir = _model_dir(tmp_path)
    slot = read_layout(model_dir)["b"]
    _forge(model_dir / JOURNAL, [("model.safetensors", slot.offset,
                                  torch.full((32,), 7.0).numpy().tobytes())])
    code, out = _recover(model_dir, capsys)
    assert code == 0 and "rolled forward" in out.out
    assert torch.equal(load_file(model_dir / "model.safetensors")["b"], torch.full((32,), 7.0))
    assert not (model_dir / JOURNAL).exists()


def test_the_launchers_recover_command_exits_non_zero_on_a_forged_journal(tmp_path, outside):
    model_dir = _model_dir(tmp_path)
    _forge(model_dir / JOURNAL, [("../outside/victim.bin", 0, b"pwned")])
    r = subprocess.run([sys.executable, "-m", "checkpoint", "recover", str(model_dir)],
                       capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 1 and "refusing to replay" in r.stderr
    assert "Traceback" not in r.stderr


# -- links ----------------------------------------------------------------------------------

def _hf_snapshot(tmp_path):
    """A Hugging Face cache layout: the snapshot's file is a link to a shared blob."""
    blobs = tmp_path / "cache" / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    save_file(dict(TENSORS), blobs / "0123abcd")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.safetensors").symlink_to(os.path.relpath(blobs / "0123abcd", model_dir))
    (model_dir / "config.json").write_text("{}")
    return model_dir, blobs / "0123abcd"


def test_a_symlinked_weights_file_is_never_written_through(tmp_path, outside):
    model_dir, blob = _hf_snapshot(tmp_path)
    outside.seal()
    before = (blob.read_bytes(), blob.stat().st_mtime_ns)
    live = {k: v.clone() for k, v in TENSORS.items()}
    with pytest.raises(RuntimeError, match="symbolic link") as err:
        ck = Checkpointer(model_dir, live)
        live["a"].add_(1.0)
        ck.sync()
    assert "cp -rL" in str(err.value)  # what to do instead
    assert (blob.read_bytes(), blob.stat().st_mtime_ns) == before
    assert (model_dir / "model.safetensors").is_symlink()


def test_recover_refuses_a_journal_for_a_symlinked_weights_file(tmp_path, outside, capsys):
    model_dir, blob = _hf_snapshot(tmp_path)
    outside.seal()
    before = blob.read_bytes()
    slot = read_layout(model_dir)["b"]
    _forge(model_dir / JOURNAL, [("model.safetensors", slot.offset, b"\x00" * 16)])
    code, out = _recover(model_dir, capsys)
    assert code == 1 and "symbolic link" in out.err
    assert blob.read_bytes() == before


def test_a_hard_linked_weights_file_is_never_written(tmp_path, outside):
    model_dir = _model_dir(tmp_path)
    twin = outside / "twin.safetensors"
    os.link(model_dir / "model.safetensors", twin)
    outside.seal()
    before = twin.read_bytes()
    live = {k: v.clone() for k, v in TENSORS.items()}
    with pytest.raises(RuntimeError, match="hard links"):
        ck = Checkpointer(model_dir, live)
        live["a"].add_(1.0)
        ck.sync()
    assert twin.read_bytes() == before


def test_a_planted_dangling_journal_tmp_link_is_not_written_through(tmp_path, outside):
    model_dir = _model_dir(tmp_path)
    (model_dir / f"{JOURNAL}.tmp").symlink_to(outside / "planted")
    live = {k: v.clone() for k, v in TENSORS.items()}
    ck = Checkpointer(model_dir, live)
    live["a"].add_(1.0)
    ck.sync()
    assert torch.equal(load_file(model_dir / "model.safetensors")["a"], live["a"])
    assert not os.path.lexists(outside / "planted")


def test_a_planted_lock_link_is_refused(tmp_path, outside, capsys):
    model_dir = _model_dir(tmp_path)
    (model_dir / ".apollo-sync.lock").symlink_to(outside / "lockfile")
    with pytest.raises(RuntimeError, match="symbolic link"):
        Checkpointer(model_dir, {k: v.clone() for k, v in TENSORS.items()})
    slot = read_layout(model_dir)["b"]
    _forge(model_dir / JOURNAL, [("model.safetensors", slot.offset, b"\x00" * 16)])
    model = (model_dir / "model.safetensors").read_bytes()
    code, out = _recover(model_dir, capsys)  # a journal to replay: recover needs the lock
    assert code == 1 and "symbolic link" in out.err
    assert (model_dir / "model.safetensors").read_bytes() == model
    assert not os.path.lexists(outside / "lockfile")


def test_a_journal_that_is_a_link_is_refused(tmp_path, outside, capsys):
    model_dir = _model_dir(tmp_path)
    model = (model_dir / "model.safetensors").read_bytes()
    slot = read_layout(model_dir)["b"]
    _forge(outside / "forged.journal", [("model.safetensors", slot.offset, b"\x00" * 16)])
    (model_dir / JOURNAL).symlink_to(outside / "forged.journal")
    outside.seal()
    code, out = _recover(model_dir, capsys)
    assert code == 1 and "refusing to replay" in out.err
    assert (model_dir / "model.safetensors").read_bytes() == model


# -- the index and the headers --------------------------------------------------------------

@pytest.mark.parametrize("target", ["../outside/evil.safetensors", "ABS"])
def test_an_index_naming_files_outside_is_refused(tmp_path, outside, capsys, target):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    save_file({"b": TENSORS["b"]}, model_dir / "model-00001-of-00002.safetensors")
    target = str(outside / "evil.safetensors") if target == "ABS" else target
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": target, "b": "model-00001-of-00002.safetensors"}}))
    live = {"a": torch.ones(64, 64), "b": TENSORS["b"].clone()}
    with pytest.raises(ValueError, match="not plain"):
        Checkpointer(model_dir, live).sync()
    assert checkpoint_cli(["verify", str(model_dir)]) == 1
    assert "not plain" in capsys.readouterr().err


def test_header_offsets_pointing_into_the_header_are_refused(tmp_path, outside, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    head = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [-8, 8]}}).encode()
    path = model_dir / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"\x00" * 8)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="inconsistent offsets"):
        Checkpointer(model_dir, {"w": torch.ones(4)}).sync()
    assert path.read_bytes() == before
    assert checkpoint_cli(["verify", str(model_dir)]) == 1
    assert "inconsistent offsets" in capsys.readouterr().err


# -- files replaced between syncs -----------------------------------------------------------

def _replace(path, how):
    other = {"a": torch.full((64, 64), 5.0), "b": torch.full((32,), 5.0),
             "aa_extra": torch.full((100,), 5.0)}  # sorts first: shifts every offset
    if how == "same-size":  # same size and mtime, other tensor names: only the header differs
        other = {"x": TENSORS["a"], "y": TENSORS["b"]}
    tmp = path.with_name("incoming")
    save_file(other, tmp)
    st = path.stat()
    if how == "rename":
        os.replace(tmp, path)
    else:  # a copy over it: same inode
        data = tmp.read_bytes()
        tmp.unlink()
        with open(path, "r+b") as f:
            f.truncate(0)
            f.write(data)
        if how == "same-size":
            assert len(data) == st.st_size
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return path.read_bytes()


@pytest.mark.parametrize("how", ["rename", "copy", "same-size"])
def test_a_file_replaced_between_syncs_is_not_written(tmp_path, outside, how):
    model_dir = _model_dir(tmp_path)
    path = model_dir / "model.safetensors"
    live = {k: v.clone() for k, v in TENSORS.items()}
    ck = Checkpointer(model_dir, live)
    live["a"].add_(1.0)
    ck.sync()  # a sync of its own: not "a change on disk"
    new = _replace(path, how)
    live["a"].add_(1.0)
    live["b"].add_(1.0)
    with pytest.raises(RuntimeError, match="changed on disk"):
        ck.sync()
    assert path.read_bytes() == new
    assert not os.path.lexists(model_dir / JOURNAL)
    assert not os.path.lexists(model_dir / f"{JOURNAL}.tmp")


# -- read-only directories ------------------------------------------------------------------

@pytest.fixture
def make_read_only():
    """Make a directory read-only for this process (root ignores modes: chattr +i then)."""
    done = []

    def make(d):
        if os.geteuid() != 0:
            os.chmod(d, 0o555)
        elif subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode != 0:
            pytest.skip("running as root where chattr +i is not available")
        done.append(d)

    yield make
    for d in done:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(d)], check=True)
        os.chmod(d, 0o755)


def test_recover_with_nothing_to_do_writes_nothing(tmp_path, outside, capsys):
    """The launcher's recover on a Hugging Face snapshot leaves the cache as it was."""
    model_dir, _ = _hf_snapshot(tmp_path)
    outside.seal()
    before = _tree(model_dir)
    code, out = _recover(model_dir, capsys)
    assert code == 0 and "clean" in out.out
    assert _tree(model_dir) == before  # not even a lock file


def test_recover_on_a_read_only_dir_with_nothing_to_do_writes_nothing(tmp_path, capsys,
                                                                      make_read_only):
    model_dir = _model_dir(tmp_path)
    before = _tree(model_dir)
    make_read_only(model_dir)
    code, out = _recover(model_dir, capsys)
    assert code == 0, out.err
    assert "nothing to recover (read-only directory)" in out.out
    assert _tree(model_dir) == before


def test_recover_on_a_read_only_dir_with_a_journal_fails_clearly(tmp_path, capsys,
                                                                 make_read_only):
    model_dir = _model_dir(tmp_path)
    slot = read_layout(model_dir)["b"]
    _forge(model_dir / JOURNAL, [("model.safetensors", slot.offset, b"\x00" * 16)])
    before = _tree(model_dir)
    make_read_only(model_dir)
    code, out = _recover(model_dir, capsys)
    assert code == 1 and "read-only" in out.err and "Traceback" not in out.err
    assert _tree(model_dir) == before


def test_the_server_can_ask_whether_it_may_checkpoint(tmp_path, make_read_only):
    from checkpoint import CheckpointRefused, checkpoint_blockers

    ok = _model_dir(tmp_path, "ok")
    assert checkpoint_blockers(ok) == []
    snapshot, _ = _hf_snapshot(tmp_path)
    assert any("symbolic link" in p for p in checkpoint_blockers(snapshot))
    forged = _model_dir(tmp_path, "forged")
    _forge(forged / JOURNAL, [("../ok/model.safetensors", 0, b"x")])
    assert any("refusing to replay" in p for p in checkpoint_blockers(forged))
    read_only = _model_dir(tmp_path, "ro")
    make_read_only(read_only)
    assert checkpoint_blockers(read_only) == [f"{read_only} is read-only"]
    with pytest.raises(CheckpointRefused, match="read-only"):
        Checkpointer(read_only, {k: v.clone() for k, v in TENSORS.items()})
    assert not os.path.lexists(read_only / ".apollo-sync.lock")


# -- verify ---------------------------------------------------------------------------------

@pytest.mark.parametrize("attack", ["forged-journal", "offset-in-header", "symlinked-weights",
                                    "index-outside", "lock-link"])
def test_verify_reports_unsafe_directories(tmp_path, outside, capsys, attack):
    if attack == "symlinked-weights":
        model_dir, _ = _hf_snapshot(tmp_path)
        outside.seal()
        expected = "symbolic link"
    else:
        model_dir = _model_dir(tmp_path)
        expected = "refusing to replay"
    if attack == "forged-journal":
        _forge(model_dir / JOURNAL, [("../outside/victim.bin", 0, b"pwned")])
    elif attack == "offset-in-header":
        _forge(model_dir / JOURNAL, [("model.safetensors", 8, b"pwned")])
    elif attack == "index-outside":
        (model_dir / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"a": "../outside/evil.safetensors", "b": "model.safetensors"}}))
        expected = "not plain"
    elif attack == "lock-link":
        (model_dir / ".apollo-sync.lock").symlink_to(outside / "lockfile")
        expected = "not a regular file"
    assert checkpoint_cli(["verify", str(model_dir)]) == 1
    assert expected in capsys.readouterr().err
