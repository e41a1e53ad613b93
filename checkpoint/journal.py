"""A write-ahead (redo) journal that makes an in-place sync all-or-nothing.

Protocol of one sync:
1. write every changed chunk (file, offset, bytes) to ``.apollo-sync.journal.tmp`` with a
   CRC-32 of the whole (as PostgreSQL's WAL does), fsync, rename it to
   ``.apollo-sync.journal``, fsync the directory — from here the sync is committed;
2. write the chunks in place into the safetensors files, fsync them;
3. unlink the journal, fsync the directory.

Recovery (every start-up, before anything reads the files): a ``.tmp`` journal is an
uncommitted sync and is deleted (files still hold the state before it); a committed journal is
replayed (idempotent) and deleted (files then hold the state after it). A crash at any moment
therefore leaves the model equal to the state before or after a sync, never a mix.

``durable=False`` skips the fsyncs: still all-or-nothing when a *process* dies (the page
cache survives it), but an OS crash or power loss may then lose or tear the last sync — the
same guarantee as transformers' save_pretrained, which never fsyncs.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"APOLLOJ2"
JOURNAL = ".apollo-sync.journal"
JOURNAL_TMP = JOURNAL + ".tmp"


class JournalError(RuntimeError):
    """A committed journal that fails its checksum: the disk, not a crash, lost data."""


@dataclass(frozen=True)
class Write:
    file: str  # file name inside the model directory
    offset: int
    data: bytes | memoryview


def _fsync_dir(path: Path, durable: bool = True) -> None:
    if not durable:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(model_dir: Path, writes: list[Write], durable: bool = True) -> int:
    """Steps 1 of the protocol; returns the journal's size in bytes."""
    header = json.dumps([{"file": w.file, "offset": w.offset, "length": len(w.data)}
                         for w in writes]).encode()
    tmp = model_dir / JOURNAL_TMP
    crc = 0
    with open(tmp, "wb") as f:
        for part in (MAGIC, struct.pack("<Q", len(header)), header, *(w.data for w in writes)):
            f.write(part)
            crc = zlib.crc32(part, crc)
        f.write(struct.pack("<I", crc))
        f.flush()
        if durable:
            os.fsync(f.fileno())
        size = f.tell()
    os.replace(tmp, model_dir / JOURNAL)
    _fsync_dir(model_dir, durable)
    return size


def apply(model_dir: Path, writes: list[Write], durable: bool = True) -> None:
    """Step 2: the in-place writes, fsynced."""
    by_file: dict[str, list[Write]] = {}
    for w in writes:
        by_file.setdefault(w.file, []).append(w)
    for name, ws in by_file.items():
        fd = os.open(model_dir / name, os.O_WRONLY)
        try:
            for w in ws:
                os.pwrite(fd, w.data, w.offset)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)


def finish(model_dir: Path, durable: bool = True) -> None:
    """Step 3."""
    (model_dir / JOURNAL).unlink(missing_ok=True)
    _fsync_dir(model_dir, durable)


def read(path: Path) -> list[Write]:
    raw = path.read_bytes()
    body, crc = raw[:-4], raw[-4:]
    if len(raw) < 20 or not body.startswith(MAGIC) or struct.pack("<I", zlib.crc32(body)) != crc:
        raise JournalError(f"{path}: journal is damaged (checksum mismatch)")
    (hlen,) = struct.unpack("<Q", body[8:16])
    entries = json.loads(body[16:16 + hlen])
    pos, writes = 16 + hlen, []
    for e in entries:
        writes.append(Write(e["file"], e["offset"], body[pos:pos + e["length"]]))
        pos += e["length"]
    return writes


def recover(model_dir: str | os.PathLike) -> str:
    """Roll an interrupted sync forward or back; returns what was done ("clean" if nothing)."""
    model_dir = Path(model_dir)
    outcome = "clean"
    if (model_dir / JOURNAL_TMP).exists():
        (model_dir / JOURNAL_TMP).unlink()
        outcome = "rolled back an uncommitted sync"
    if (model_dir / JOURNAL).exists():
        apply(model_dir, read(model_dir / JOURNAL))
        finish(model_dir)
        outcome = "rolled forward a committed sync"
    return outcome
