"""checkpoint/: every checkpoint a version; the history store keeps what each overwrote, so the
files can be reverted to any kept version bit for bit; retention; a damaged or hostile store
changes nothing.

Over 300 lines on purpose: one subject (the history store) with one short test per behaviour or
attack."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from checkpoint import Checkpointer, CheckpointRefused, HistoryError, Retention, recover
from checkpoint.__main__ import main as cli
from checkpoint.history import Store
from checkpoint.versions import revert

CHUNK = 64 * 1024


def _model(tmp_path, shards=1, n=4):
    """n tensors of 1 MiB (16 chunks each); tensor i holds i everywhere."""
    d = tmp_path / "model"
    d.mkdir(parents=True)
    tensors = {f"t{i}": torch.full((262144,), float(i)) for i in range(n)}
    names = list(tensors)
    if shards == 1:
        save_file(tensors, d / "model.safetensors")
    else:
        weight_map = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: tensors[k] for k in names[s::shards]}, d / fname)
            weight_map.update({k: fname for k in names[s::shards]})
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return d, {k: v.clone() for k, v in tensors.items()}


def _files(d):
    return {f.name: f.read_bytes() for f in sorted(d.glob("*.safetensors"))}


def _history(d, live, policy=None, durable=False):
    return Checkpointer(d, live, chunk_bytes=CHUNK, durable=durable,
                        history=policy or Retention())


@pytest.mark.parametrize("shards", [1, 2])
def test_every_version_can_be_restored_bit_for_bit(tmp_path, shards, capsys):
    d, live = _model(tmp_path, shards)
    states = {0: _files(d)}
    ck = _history(d, live)
    live["t0"].add_(10)  # a quarter of the model: chunks written in place, pre-images packed
    assert ck.sync(["t0"], meta={"examples": 1}).version == 1
    states[1] = _files(d)
    for t in live.values():  # everything: each file written whole, the old one kept
        t.add_(10)
    r = ck.sync(list(live), meta={"examples": 2})
    assert r.version == 2 and r.whole_files == shards and r.bytes_changed == 4 << 20
    states[2] = _files(d)
    live["t3"][5] = -1.0  # one chunk
    r = ck.sync(["t3"])
    assert (r.version, r.chunks, r.bytes_changed) == (3, 1, CHUNK)
    states[3] = _files(d)
    assert cli(["verify", str(d)]) == 0
    for target in ["1", "original", "2", "3", "0"]:
        assert cli(["revert", str(d), target]) == 0
        assert _files(d) == states[int(target) if target.isdigit() else 0], target
        assert cli(["verify", str(d)]) == 0
    capsys.readouterr()
    assert cli(["log", str(d)]) == 0
    out = capsys.readouterr().out
    assert "original" in out and "the bytes of version 2" in out
    versions = Store(d).load()
    assert [e["n"] for e in versions.entries] == list(range(9))
    assert all(versions.reachable(n) for n in range(9))


def test_retention_keeps_the_newest_and_the_original(tmp_path):
    d, live = _model(tmp_path)
    original = _files(d)
    ck = _history(d, live, Retention(keep=1))
    states = {}
    for k in range(1, 6):
        live[f"t{k % 4}"].add_(100)  # a different quarter each time: records do not overlap
        r = ck.sync([f"t{k % 4}"])
        states[k] = _files(d)
    assert r.dropped_versions == (3,)
    versions = Store(d).load()
    assert [n for n in range(6) if versions.reachable(n)] == [0, 4, 5]
    with pytest.raises(HistoryError, match="no longer reachable"):
        revert(d, 2)
    revert(d, 4)
    assert _files(d) == states[4]
    revert(d, "original")
    assert _files(d) == original
    assert cli(["verify", str(d)]) == 0


def test_a_budget_drops_the_oldest_first_and_never_the_original_unless_asked(tmp_path):
    d, live = _model(tmp_path)
    original = _files(d)
    ck = _history(d, live, Retention(budget=9 << 20))
    for _ in range(4):  # every tensor each time: 4 MiB of undo per version
        for t in live.values():
            t.add_(1)
        ck.sync(list(live))
    store = Store(d)
    versions = store.load()
    assert store.disk_bytes() <= 9 << 20
    assert [n for n in range(5) if versions.reachable(n)] == [0, 3, 4]
    revert(d, "original")
    assert _files(d) == original

    # Disjoint versions: every record holds bytes only the original needs, so nothing can be
    # dropped without it; it is kept, over the budget, as asked.
    d2, live2 = _model(tmp_path / "b")
    ck2 = _history(d2, live2, Retention(budget=2 << 20))
    for k in range(4):
        live2[f"t{k}"].add_(1)
        ck2.sync([f"t{k}"])
    assert Store(d2).disk_bytes() > 2 << 20
    assert Store(d2).load().reachable(0)

    d3, live3 = _model(tmp_path / "c")
    ck3 = _history(d3, live3, Retention(budget=1 << 20, keep_original=False))
    for t in live3.values():
        t.add_(1)
    ck3.sync(list(live3))  # 4 MiB of undo > the budget: the original goes too
    assert not Store(d3).load().reachable(0) and Store(d3).disk_bytes() < 1 << 20


def test_history_off_numbers_versions_and_keeps_no_bytes(tmp_path):
    d, live = _model(tmp_path)
    ck = Checkpointer(d, live, chunk_bytes=CHUNK, durable=False)
    live["t1"].add_(1)
    assert ck.sync(["t1"]).version == 1
    live["t1"].add_(1)
    assert ck.sync(["t1"]).version == 2
    versions = Store(d).load()
    assert [e["undo"] for e in versions.entries] == [None, None, None]
    assert Store(d).segments() == []
    with pytest.raises(HistoryError, match="no longer reachable|never kept"):
        revert(d, 1)
    assert cli(["verify", str(d)]) == 0


def test_a_failed_sync_keeps_the_files_and_the_version(tmp_path, monkeypatch):
    """A failure after the files changed but before the version was listed: undone at once."""
    d, live = _model(tmp_path)
    ck = _history(d, live)
    live["t0"].add_(1)
    ck.sync(["t0"])
    before = _files(d)
    for t in live.values():
        t.add_(1)

    def failing_save(self, versions, durable=True):
        raise OSError(28, "injected: no space left")

    monkeypatch.setattr(Store, "save", failing_save)
    with pytest.raises(OSError, match="injected"):
        ck.sync(list(live))
    monkeypatch.undo()
    assert _files(d) == before
    assert Store(d).load().head["n"] == 1 and Store(d).segments() == ["v00001"]
    assert recover(d) == "clean"
    assert ck.sync(list(live)).version == 2  # the next sync writes it


def test_recover_undoes_a_sync_interrupted_after_its_undo_record(tmp_path):
    """What kill -9 between the record and the commit leaves: recover puts the files back."""
    from checkpoint.commit import Transaction
    from checkpoint.guard import dir_lock
    from checkpoint.journal import Write, opened
    from checkpoint.layout import read_layout

    d, live = _model(tmp_path)
    ck = _history(d, live)
    live["t0"].add_(1)
    ck.sync(["t0"])
    before = _files(d)
    slots = read_layout(d)
    with dir_lock(d), opened(d, ["model.safetensors"]) as fds:
        tx = Transaction(d, slots, fds, history=True, durable=False, chunk_bytes=CHUNK)
        tx.write_whole("model.safetensors", [(slots["t1"].offset, b"\x01" * (1 << 20))])
        tx.add_writes([])
        tx.prepare({})
        tx.apply()  # the file is replaced; no commit
    tx._close()
    assert _files(d) != before
    assert recover(d) == "rolled back an uncommitted checkpoint"
    assert _files(d) == before and Store(d).segments() == ["v00001"]
    assert cli(["verify", str(d)]) == 0
    slot = slots["t2"]
    with dir_lock(d), opened(d, ["model.safetensors"]) as fds:  # chunks written in place
        tx = Transaction(d, slots, fds, history=True, durable=False, chunk_bytes=CHUNK)
        tx.add_writes([Write("model.safetensors", slot.offset, b"\x02" * CHUNK)])
        tx.prepare({})
        tx.apply()
    assert recover(d) == "rolled back an uncommitted checkpoint"
    assert _files(d) == before


# -- a damaged or hostile history store: a clear error, nothing changed ---------------------

def _two_versions(tmp_path):
    d, live = _model(tmp_path)
    ck = _history(d, live)
    live["t0"].add_(1)
    ck.sync(["t0"])
    for t in live.values():
        t.add_(1)
    ck.sync(list(live))
    return d


def _tree(d):
    return {str(p): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()
            and not p.is_symlink() and p.name != ".apollo-sync.lock"}


def _damage(d, how):
    store = Store(d)
    if how == "blob-bit":
        blob = store.segment("v00001") / "pre.bin"
        data = bytearray(blob.read_bytes())
        data[100] ^= 1
        blob.write_bytes(data)
        return "CRC mismatch"
    if how == "blob-missing":
        (store.segment("v00002") / "model.safetensors").unlink()
        return "missing"
    if how == "versions-garbage":
        (store.root / "versions.json").write_text("{not json")
        return "damaged"
    if how == "index-outside":
        from checkpoint.history import Index, read_regular
        index = store.read_index("v00001", None)
        forged = [c.__class__(c.file, 4, c.length, c.blob, c.blob_offset, c.crc)
                  for c in index.chunks]  # into the header
        store.write_index("v00001", Index(index.version, index.base, forged), durable=False)
        assert read_regular(store.segment("v00001") / "index.json")
        return "outside every tensor"
    if how == "blob-link":
        blob = store.segment("v00001") / "pre.bin"
        shutil.copy(blob, d.parent / "elsewhere.bin")
        blob.unlink()
        blob.symlink_to(d.parent / "elsewhere.bin")
        return "not a regular file"
    if how == "history-link":
        shutil.move(store.root, d.parent / "moved-history")
        store.root.symlink_to(d.parent / "moved-history")
        return "not a directory"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["blob-bit", "blob-missing", "versions-garbage",
                                 "index-outside", "blob-link", "history-link"])
def test_a_damaged_history_store_changes_nothing(tmp_path, capsys, how):
    d = _two_versions(tmp_path)
    expected = _damage(d, how)
    before = _tree(d)
    capsys.readouterr()
    assert cli(["revert", str(d), "original"]) == 1
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert _tree(d) == before
    assert cli(["verify", str(d)]) == 1
    assert expected in capsys.readouterr().err
    if how in ("versions-garbage", "history-link"):  # the store itself is unusable
        with pytest.raises(CheckpointRefused, match="move .* aside"):
            _history(d, {f"t{i}": torch.zeros(262144) for i in range(4)})


def test_unknown_versions_are_refused(tmp_path, capsys):
    d = _two_versions(tmp_path)
    before = _tree(d)
    for bad in ["7", "latest", "-1"]:
        assert cli(["revert", str(d), bad]) == 1
        assert "version" in capsys.readouterr().err
    assert _tree(d) == before
    nohist = tmp_path / "plain"
    nohist.mkdir()
    save_file({"a": torch.zeros(4)}, nohist / "model.safetensors")
    assert cli(["revert", str(nohist), "original"]) == 1
    assert "no history store" in capsys.readouterr().err


def test_files_changed_outside_the_checkpointer_are_not_reverted(tmp_path, capsys):
    d = _two_versions(tmp_path)
    path = d / "model.safetensors"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # e.g. edited by hand
    before = _tree(d)
    assert cli(["revert", str(d), "1"]) == 1
    assert "changed since the newest version" in capsys.readouterr().err
    assert _tree(d) == before
    # a checkpointer continues: the change is a version of its own, the older ones unreachable
    live = {f"t{i}": torch.full((262144,), float(i + 1)) for i in range(4)}
    ck = _history(d, live)
    live["t0"].add_(5)
    assert ck.sync(["t0"]).version == 4
    versions = Store(d).load()
    assert versions.entry(3)["external"] and not versions.reachable(2)
    assert versions.reachable(3)
