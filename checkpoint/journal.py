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

A journal shipped inside a model directory may be forged (a CRC is no authentication), so a
replay first checks every entry: a file of the model's own safetensors layout, bytes inside one
tensor's data, written never through a link. Anything else refuses the whole replay.

``durable=False`` skips the fsyncs: still all-or-nothing when a *process* dies (the page
cache survives it), but an OS crash or power loss may then lose or tear the last sync — the
same guarantee as transformers' save_pretrained, which never fsyncs.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import stat
import struct
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from checkpoint.durable import Buffer, atomic_replace, fsync_dir, pwrite_all, unlink_if_present
from checkpoint.guard import dir_lock, dir_writable, open_for_write
from checkpoint.layout import LayoutError, TensorSlot, read_layout

MAGIC = b"APOLLOJ2"
JOURNAL = ".apollo-sync.journal"
JOURNAL_TMP = JOURNAL + ".tmp"


class JournalError(RuntimeError):
    """A journal that may not be replayed: damaged, forged, or the directory is read-only."""


@dataclass(frozen=True)
class Write:
    file: str  # file name inside the model directory
    offset: int
    data: Buffer


def commit(model_dir: Path, writes: list[Write], durable: bool = True) -> int:
    """Step 1 of the protocol; returns the journal's size in bytes."""
    header = json.dumps([{"file": w.file, "offset": w.offset, "length": len(w.data)}
                         for w in writes]).encode()

    def parts() -> Iterator[Buffer]:
        crc = 0
        for part in (MAGIC, struct.pack("<Q", len(header)), header, *(w.data for w in writes)):
            crc = zlib.crc32(part, crc)
            yield part
        yield struct.pack("<I", crc)

    return atomic_replace(model_dir / JOURNAL, parts(), durable, tmp=model_dir / JOURNAL_TMP)


@contextlib.contextmanager
def opened(model_dir: Path, names: Iterable[str]) -> Iterator[dict[str, int]]:
    """fds of the weights files `names`, each checked by guard.open_for_write, all or none."""
    fds: dict[str, int] = {}
    try:
        for name in sorted(set(names)):
            fds[name] = open_for_write(model_dir / name)
        yield fds
    finally:
        for fd in fds.values():
            os.close(fd)


def apply(fds: Mapping[str, int], writes: list[Write], durable: bool = True) -> None:
    """Step 2: the in-place writes (through fds from opened()), fsynced."""
    for w in writes:
        pwrite_all(fds[w.file], w.data, w.offset)
    if durable:
        for fd in fds.values():
            os.fsync(fd)


def finish(model_dir: Path, durable: bool = True) -> None:
    """Step 3."""
    unlink_if_present(model_dir / JOURNAL)
    if durable:
        fsync_dir(model_dir)


def _read_regular(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise JournalError(f"{path}: cannot be opened as a regular file, refusing to replay "
                           f"it ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise JournalError(f"{path}: not a regular file, refusing to replay it")
    with os.fdopen(fd, "rb") as f:
        return f.read()


def read(path: Path) -> list[Write]:
    """The entries of a committed journal, checked for form (not yet against a layout)."""
    raw = _read_regular(path)
    body, crc = raw[:-4], raw[-4:]
    if len(raw) < 20 or not body.startswith(MAGIC) or struct.pack("<I", zlib.crc32(body)) != crc:
        raise JournalError(f"{path}: journal is damaged (checksum mismatch)")
    (hlen,) = struct.unpack("<Q", body[8:16])
    malformed = JournalError(f"{path}: journal is malformed (a valid checksum over an invalid "
                             "body: not written by this program), refusing to replay it")
    try:
        entries = json.loads(body[16:16 + hlen])
    except ValueError:
        raise malformed from None
    pos, writes = 16 + hlen, []
    if not isinstance(entries, list):
        raise malformed
    for e in entries:
        if not (isinstance(e, dict) and set(e) == {"file", "offset", "length"}
                and isinstance(e["file"], str)
                and all(isinstance(e[k], int) and not isinstance(e[k], bool) and e[k] >= 0
                        for k in ("offset", "length"))):
            raise malformed
        writes.append(Write(e["file"], e["offset"], body[pos:pos + e["length"]]))
        pos += e["length"]
    if pos != len(body):
        raise malformed
    return writes


def check(writes: list[Write], slots: Mapping[str, TensorSlot]) -> None:
    """Refuse (JournalError) unless every write lies inside one tensor's data in the layout."""
    regions: dict[str, list[tuple[int, int]]] = {}
    for s in slots.values():
        regions.setdefault(s.file.name, []).append((s.offset, s.offset + s.nbytes))
    starts = {f: sorted(r) for f, r in regions.items()}
    for i, w in enumerate(writes):
        spans = starts.get(w.file)
        if spans is None:
            raise JournalError(f"refusing to replay {JOURNAL}: entry {i} names {w.file!r}, "
                               "which is not a safetensors file of this model's layout; if "
                               "no sync of yours was interrupted here, the directory was "
                               f"tampered with: inspect it and delete {JOURNAL}")
        k = bisect.bisect_right(spans, (w.offset, float("inf"))) - 1
        if k < 0 or w.offset + len(w.data) > spans[k][1]:
            raise JournalError(f"refusing to replay {JOURNAL}: entry {i} writes "
                               f"{len(w.data)} bytes at offset {w.offset} of {w.file}, outside "
                               "every tensor's data; if no sync of yours was interrupted "
                               f"here, the directory was tampered with: inspect it and delete "
                               f"{JOURNAL}")


def pending(model_dir: Path) -> list[Write]:
    """The committed journal's writes, checked against the current layout; [] if none."""
    if not os.path.lexists(model_dir / JOURNAL):
        return []
    writes = read(model_dir / JOURNAL)
    try:
        slots = read_layout(model_dir)
    except LayoutError as exc:
        raise JournalError(f"refusing to replay {JOURNAL}: the model's layout is unusable "
                           f"({exc})") from None
    check(writes, slots)
    return writes


def recover_locked(model_dir: Path) -> str:
    """recover() for a caller that holds the directory lock. Every check (the journal, the
    files it names) passes before anything in the directory changes."""
    committed = os.path.lexists(model_dir / JOURNAL)
    writes = pending(model_dir) if committed else []
    with opened(model_dir, {w.file for w in writes}) as fds:
        outcome = "clean"
        if os.path.lexists(model_dir / JOURNAL_TMP):
            try:
                os.unlink(model_dir / JOURNAL_TMP)
            except IsADirectoryError:
                raise JournalError(f"{model_dir / JOURNAL_TMP} is a directory: remove it") \
                    from None
            outcome = "rolled back an uncommitted sync"
        if committed:
            apply(fds, writes)
            finish(model_dir)
            outcome = "rolled forward a committed sync"
    return outcome


def recover(model_dir: str | os.PathLike) -> str:
    """Roll an interrupted sync forward or back; returns what was done ("clean" if nothing).

    Writes nothing when there is nothing to do. A read-only directory is left untouched: fine
    when there is nothing to replay, an error when a committed sync still has to reach the
    files.
    """
    model_dir = Path(model_dir)
    committed = os.path.lexists(model_dir / JOURNAL)
    uncommitted = os.path.lexists(model_dir / JOURNAL_TMP)
    if not dir_writable(model_dir):
        if committed:
            pending(model_dir)  # a journal that would be refused anyway says so first
            raise JournalError(f"{model_dir} is read-only but holds a committed sync "
                               f"({JOURNAL}) that must reach the weights before they are "
                               "loaded: make the directory writable and run `python -m "
                               "checkpoint recover` again")
        if uncommitted:
            return (f"nothing to recover (read-only directory; the files hold the state before "
                    f"the interrupted sync that left {JOURNAL_TMP})")
        return "nothing to recover (read-only directory)"
    if not committed and not uncommitted:
        return "clean"  # and nothing written, not even the lock file
    with dir_lock(model_dir):
        return recover_locked(model_dir)
