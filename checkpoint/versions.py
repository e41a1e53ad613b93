"""Getting a version's bytes back: which chunks differ from the files and where their bytes
are kept, the offline revert, and the restore of live tensors (a rollback).

The head's bytes are the files. Version K's bytes of a chunk are the previous bytes kept by the
oldest undo record between K and the head that holds that chunk; a chunk no record holds is
the same in K as in the files. Every byte taken from the store is checked against its CRC-32
before anything is written (a damaged store changes nothing).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

import checkpoint.journal as journal
import checkpoint.retention as retention
from checkpoint.commit import Transaction
from checkpoint.guard import dir_lock
from checkpoint.history import Chunk, HistoryError, Regions, Store, Versions, identity, open_blob
from checkpoint.layout import read_layout
from checkpoint.recovery import recover_locked
from checkpoint.retention import Retention
from checkpoint.sync import WHOLE_MIN_CHUNKS, WHOLE_SHARE

log = logging.getLogger("vllm_apollo.checkpoint")

Plan = dict[tuple[str, int], tuple[str, Chunk]]  # (file, offset) -> (undo record, chunk)


def resolve(versions: Versions, to: str | int) -> int:
    """A version number from "original", "last-checkpoint" (the head) or a number."""
    if to == "last-checkpoint":
        return versions.head["n"]
    if to == "original":
        original = next((e for e in versions.entries if e.get("name") == "original"), None)
        if original is None:
            raise HistoryError("the history store has no original version")
        return original["n"]
    if isinstance(to, int) or (isinstance(to, str) and to.isdigit()):
        return int(to)
    raise HistoryError(f"unknown version {to!r}: give a number, 'original' or "
                       "'last-checkpoint'")


def plan(store: Store, versions: Versions, target: int, regions: Regions) -> Plan:
    """Every chunk whose bytes in version `target` differ from the head's, with its source."""
    out: Plan = {}
    for e in versions.chain(target):  # newest first: an older record's bytes win
        for c in store.read_index(e["undo"], regions).chunks:
            out[c.key] = (e["undo"], c)
    return out


class Blobs:
    """The store's blobs, mapped read-only on first use; every read is CRC-checked."""

    def __init__(self, store: Store):
        self.store = store
        self._maps: dict[tuple[str, str], mmap.mmap] = {}

    def view(self, segment: str, chunk: Chunk) -> memoryview:
        key = (segment, chunk.blob)
        if key not in self._maps:
            fd = open_blob(self.store.segment(segment) / chunk.blob)
            try:
                size = os.fstat(fd).st_size
                self._maps[key] = mmap.mmap(fd, size, prot=mmap.PROT_READ) if size else b""
            finally:
                os.close(fd)
        data = memoryview(self._maps[key])[chunk.blob_offset:chunk.blob_offset + chunk.length]
        if len(data) != chunk.length:
            raise HistoryError(f"the history store's copy of {chunk.length} bytes at offset "
                               f"{chunk.offset} of {chunk.file} is missing (a short blob); "
                               "nothing was changed")
        return data

    def check(self, segment: str, chunk: Chunk) -> memoryview:
        data = self.view(segment, chunk)
        if chunk.crc is not None and zlib.crc32(data) != chunk.crc:
            raise HistoryError(f"the history store's copy of {chunk.length} bytes at offset "
                               f"{chunk.offset} of {chunk.file} (undo record {segment}) is "
                               "damaged (CRC mismatch); nothing was changed")
        return data

    def close(self) -> None:
        for m in self._maps.values():
            with contextlib.suppress(BufferError, AttributeError):
                m.close()  # a view still alive keeps it open until it is collected
        self._maps.clear()


def check_head(versions: Versions, slots) -> None:
    if versions.files != identity(slots.values()):
        raise HistoryError("the weights files changed since the newest version was recorded "
                           "(not by a checkpoint): the history store no longer describes them; "
                           "nothing was changed")


def revert(model_dir: str | os.PathLike, to: str | int, durable: bool = True) -> dict:
    """Make the files version `to` (a number or "original"), all or nothing, as a new version
    (the revert can itself be reverted while history is kept). Returns its entry, or the
    head's when the files already hold `to`."""
    model_dir = Path(model_dir)
    store = Store(model_dir)
    with dir_lock(model_dir):
        recover_locked(model_dir)
        if not store.exists():
            raise HistoryError(f"{model_dir} has no history store (no checkpoint was written "
                               "there with versions kept)")
        versions = store.load()
        slots = read_layout(model_dir)
        regions = Regions(slots.values())
        check_head(versions, slots)
        target = resolve(versions, to)
        chunks = plan(store, versions, target, regions)
        if not chunks:
            return versions.head
        blobs = Blobs(store)
        try:  # every chunk verified before anything is written
            entry = _commit(model_dir, store, versions, slots,
                            [journal.Write(f, o, blobs.check(seg, c))
                             for (f, o), (seg, c) in sorted(chunks.items())], target, durable)
        finally:
            blobs.close()
    return entry


def _commit(model_dir: Path, store: Store, versions: Versions, slots, writes, target: int,
            durable: bool) -> dict:
    policy = Retention.from_json(versions.policy) if versions.policy else None
    per_file: dict[str, list[journal.Write]] = {}
    for w in writes:
        per_file.setdefault(w.file, []).append(w)
    chunk_bytes = versions.chunk_bytes
    whole = {f for f, ws in per_file.items()
             if sum(len(w.data) for w in ws) >= WHOLE_SHARE * os.path.getsize(model_dir / f)
             and os.path.getsize(model_dir / f) >= WHOLE_MIN_CHUNKS * chunk_bytes}
    with journal.opened(model_dir, per_file) as fds:
        tx = Transaction(model_dir, slots, fds, history=policy is not None, durable=durable,
                         chunk_bytes=chunk_bytes)
        tx.versions.policy = versions.policy
        meta = {"reverted_to": target, "parent": target, "tensors": 0,
                "chunks": len(writes), "bytes_changed": sum(len(w.data) for w in writes),
                "note": f"python -m checkpoint revert: the bytes of version {target}"}
        try:
            for f in sorted(whole):
                tx.write_whole(f, [(w.offset, w.data) for w in per_file[f]])
            tx.add_writes(w for w in writes if w.file not in whole)
            tx.prepare(meta)
            tx.apply()
            entry = tx.commit(meta, {f: [(w.offset, len(w.data)) for w in per_file[f]]
                                     for f in whole})
        except BaseException:
            tx.abort()
            raise
    if policy is not None:
        try:
            retention.apply(store, tx.versions, policy, Regions(slots.values()), durable)
        except (HistoryError, OSError) as exc:  # the revert is committed either way
            log.warning("history retention failed (the store keeps more than asked): %s", exc)
    return entry


def restore_live(sources: Iterable[tuple[str, int, int, str | None, Chunk | None]],
                 tensor_at: Callable[[str, int, int], tuple[torch.Tensor, object]],
                 model_dir: Path, store: Store, window: contextlib.AbstractContextManager,
                 chunk_bytes: int) -> dict:
    """Write each source's bytes into the live tensor holding them, inside `window` (the
    write window that keeps serving off). A source is (file, offset, length, undo record or
    None for the weights file, chunk). `tensor_at(file, offset, length)` gives the live
    tensor and the layout slot. One host buffer of a chunk; nothing else is allocated."""
    buf = memoryview(bytearray(chunk_bytes))
    fds: dict[tuple[str | None, str], int] = {}
    read = 0
    t0 = time.perf_counter()

    def fd_of(segment: str | None, name: str) -> int:
        key = (segment, name)
        if key not in fds:
            path = model_dir / name if segment is None else store.segment(segment) / name
            fds[key] = open_blob(path)
        return fds[key]

    try:
        with window:
            t_in = time.perf_counter()
            for file, offset, length, segment, chunk in sources:
                fd = fd_of(segment, file if chunk is None else chunk.blob)
                at = offset if chunk is None else chunk.blob_offset
                view = buf[:length]
                if os.preadv(fd, [view], at) != length:
                    raise HistoryError(f"{length} bytes at {at} could not be read back")
                live, slot = tensor_at(file, offset, length)
                size = slot.dtype.itemsize
                first = (offset - slot.offset) // size
                values = torch.frombuffer(view, dtype=slot.dtype)
                flat = live.detach().view(-1)
                flat[first:first + length // size].copy_(values.to(live.dtype))
                read += length
            stall = time.perf_counter() - t_in
    finally:
        for fd in fds.values():
            os.close(fd)
    return {"bytes_read": read, "stall_seconds": stall, "seconds": time.perf_counter() - t0}


def sources(chunks: Plan, dirty: Iterable[tuple[str, int, int]]
            ) -> Iterator[tuple[str, int, int, str | None, Chunk | None]]:
    """What a rollback reads: each planned chunk from its record, and each chunk that changed
    since the head (and is not planned) from the weights file."""
    for (f, o), (seg, c) in sorted(chunks.items()):
        yield f, o, c.length, seg, c
    for f, o, n in sorted(set(dirty)):
        if (f, o) not in chunks:
            yield f, o, n, None, None
