"""One sync into the weights files, all or nothing, each changed byte written once.

Two ways to write a file's changes, chosen per file by the caller:

* **whole**: most of the file changed (training changes every element of what it trains), so
  the file is written anew beside itself (``F.apollo-new``: the changed bytes, the rest copied
  in the kernel with copy_file_range) and renamed over it. One write of the file.
* **chunks**: a few chunks changed; they are written in place.

And two ways to make the sync atomic:

* **history kept** (an undo log): the bytes the sync overwrites are needed anyway, as the
  version's undo record (checkpoint/history.py); they are made durable first — a whole file
  is kept by hard-linking the old file into the record (no copy), chunks' previous bytes are
  packed into ``pre.bin`` — and the sync commits when versions.json lists the new version.
  Recovery undoes a sync whose record exists but whose version is not listed.
* **no history** (a redo log, checkpoint/journal.py): the new chunks go to the journal, files
  written whole are named in it; it commits by its rename, and recovery replays it.

Over 300 lines on purpose: the write ways and the atomicity ways share one commit order, and
crash safety depends on reading that order whole.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import struct
import time
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import checkpoint.journal as journal
from checkpoint.durable import (
    Buffer,
    Flusher,
    fsync_dir,
    pwrite_all,
    unlink_if_present,
    write_all,
)
from checkpoint.history import (
    INDEX,
    PACK,
    Chunk,
    HistoryError,
    Index,
    Regions,
    Store,
    Versions,
    identity,
    open_blob,
    read_chunk,
    segment_name,
)
from checkpoint.layout import TensorSlot, read_layout

NEW = journal.NEW_SUFFIX


def copy_range(src: int, dst: int, offset: int, count: int,
               flush: Flusher | None = None) -> None:
    """`count` bytes at `offset` of `src` to the same offset of `dst`, in the kernel;
    `flush` is told of every piece (at most its `every` bytes each)."""
    done = 0
    while done < count:
        piece = min(count - done, flush.every) if flush is not None else count - done
        try:
            n = os.copy_file_range(src, dst, piece, offset + done, offset + done)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            n = 0
        if n == 0:  # not supported here: a plain copy
            data = os.pread(src, min(piece, 1 << 20), offset + done)
            if not data:
                raise OSError(errno.EIO, "the source file is shorter than its layout")
            n = pwrite_all(dst, data, offset + done)
        done += n
        if flush is not None:
            flush.wrote(n)


def start_versions(store: Store, slots: Mapping[str, TensorSlot], chunk_bytes: int) -> Versions:
    """The store's versions, or a new store whose version 0 ("original") is the files now.
    Files changed since the head was recorded (not by a checkpoint) are a version of their
    own with no undo record: nothing before it can be reached any more."""
    now = identity(slots.values())
    if not store.exists():
        return Versions([{"n": 0, "time": time.time(), "name": "original", "undo": None,
                          "base": None}], chunk_bytes, now)
    versions = store.load()
    if versions.chunk_bytes != chunk_bytes:
        raise HistoryError(f"the history store was kept with {versions.chunk_bytes}-byte "
                           f"chunks; this checkpointer uses {chunk_bytes}")
    if versions.files != now:
        versions.entries.append({"n": versions.head["n"] + 1, "time": time.time(),
                                 "undo": None, "base": None, "external": True,
                                 "note": "the weights files changed outside the checkpointer"})
        versions.files = now
    return versions


class Transaction:
    """One sync: stage (write_whole, add_writes), prepare, apply, commit; abort on failure.
    The caller holds the directory lock and gives fds of every file it changes."""

    def __init__(self, model_dir: Path, slots: Mapping[str, TensorSlot], fds: Mapping[str, int],
                 *, history: bool, durable: bool, chunk_bytes: int):
        self.model_dir, self.slots, self.fds = model_dir, slots, fds
        self.history, self.durable = history, durable
        self.store = Store(model_dir)
        self.versions = start_versions(self.store, slots, chunk_bytes)
        self.base = self.versions.head["n"]
        self.n = self.base + 1
        self.seg = segment_name(self.n)
        self.writes: list[journal.Write] = []
        self.whole: dict[str, int] = {}  # file -> fd of its new version (F.apollo-new)
        self.pack: list[Chunk] = []
        self.bytes_written = self.journal_bytes = 0
        self.applying = False

    # --- staging ---
    def write_whole(self, name: str, parts: Iterable[tuple[int, Buffer]]) -> None:
        """F.apollo-new: `parts` (offset, bytes), in offset order, over a copy of F."""
        old = self.fds[name]
        size = os.fstat(old).st_size
        new = self.model_dir / (name + NEW)
        unlink_if_present(new)
        fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     stat.S_IMODE(os.fstat(old).st_mode))
        self.whole[name] = fd
        flush = Flusher(fd, self.durable)  # prepare() fsyncs what is left
        pos = 0
        for offset, data in parts:
            copy_range(old, fd, pos, offset - pos, flush)
            pos = offset + pwrite_all(fd, data, offset)
            flush.wrote(len(data))
        copy_range(old, fd, pos, size - pos, flush)
        self.bytes_written += size

    def add_writes(self, writes: Iterable[journal.Write]) -> None:
        writes = list(writes)
        self.writes.extend(writes)
        self.bytes_written += sum(len(w.data) for w in writes)

    # --- the protocol ---
    def prepare(self, entry: dict) -> None:
        """Make the undo (or redo) record durable; nothing of the files has changed yet."""
        if self.durable:
            for fd in self.whole.values():
                os.fsync(fd)
        if not self.history:
            doc = Versions(self.versions.entries + [self._entry(entry)],
                           self.versions.chunk_bytes, {}, self.versions.policy).to_json()
            self.journal_bytes = journal.commit(self.model_dir, self.writes, self.durable,
                                                replace=self.whole, versions=doc)
            return
        self.store.make_dirs()
        seg = self.store.segment(self.seg)
        remove_segment(seg)
        seg.mkdir()
        if self.writes:
            fd = os.open(seg / PACK, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644)
            try:
                pos = 0
                for w in self.writes:
                    old = os.pread(self.fds[w.file], len(w.data), w.offset)
                    write_all(fd, old)
                    self.pack.append(Chunk(w.file, w.offset, len(old), PACK, pos,
                                           zlib.crc32(old)))
                    pos += len(old)
                if self.durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
        self.store.write_index(self.seg, Index(self.n, self.base, self.pack, sorted(self.whole)),
                               self.durable)
        self.store.fsync(self.durable)

    def apply(self) -> None:
        """Files written whole take their names (the old ones kept in the undo record, with
        history); chunks are written in place."""
        self.applying = True
        seg = self.store.segment(self.seg)
        for name in sorted(self.whole):
            if self.history:
                unlink_if_present(seg / name)
                os.link(self.model_dir / name, seg / name)
            os.replace(self.model_dir / (name + NEW), self.model_dir / name)
        if self.whole and self.durable:
            fsync_dir(self.model_dir)
            if self.history:
                fsync_dir(seg)
        journal.apply({f: self.fds[f] for f in {w.file for w in self.writes}}, self.writes,
                      self.durable)

    def commit(self, entry: dict, whole_chunks: Mapping[str, list[tuple[int, int]]]) -> dict:
        """List the new version: from here it is the head. `whole_chunks`: for each file
        written whole, the chunks that actually changed (offset, length); the CRC-32 of
        their previous bytes is read from the kept file."""
        entry = self._entry(entry)
        if self.history:
            chunks = list(self.pack)
            for name, spans in sorted(whole_chunks.items()):
                fd = open_blob(self.store.segment(self.seg) / name)
                try:
                    for offset, length in spans:
                        crc = zlib.crc32(os.pread(fd, length, offset))
                        chunks.append(Chunk(name, offset, length, name, offset, crc))
                finally:
                    os.close(fd)
            self.store.write_index(self.seg, Index(self.n, self.base, chunks,
                                                   sorted(self.whole)), self.durable)
            entry["history_bytes"] = self.store.segment_bytes(self.seg)
        self.versions.entries.append(entry)
        self.versions.files = identity(self.slots.values())
        self.store.save(self.versions, self.durable)
        if not self.history:
            journal.finish(self.model_dir, self.durable)
        self._close()
        return entry

    def abort(self) -> None:
        """After a failure: nothing of the sync stays (with history, undone now; without,
        a committed journal stays for the next sync or recovery to replay)."""
        self._close()
        if self.history and self.applying:
            recover_history(self.model_dir, self.durable)
            return
        for name in self.whole:
            unlink_if_present(self.model_dir / (name + NEW))
        if self.history:
            remove_segment(self.store.segment(self.seg))

    def _entry(self, entry: dict) -> dict:
        return {"n": self.n, "time": time.time(), **entry,
                "undo": self.seg if self.history else None,
                "base": self.base if self.history else None}

    def _close(self) -> None:
        for name, fd in self.whole.items():  # the names stay, for abort
            if fd >= 0:
                os.close(fd)
                self.whole[name] = -1


def remove_segment(path: Path) -> None:
    """Remove an undo record directory (a planted link is unlinked, never followed)."""
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def same_header(a: int, b: int) -> bool:
    (n,) = struct.unpack("<Q", os.pread(b, 8, 0))
    return os.fstat(a).st_size == os.fstat(b).st_size and \
        os.pread(a, 8 + n, 0) == os.pread(b, 8 + n, 0)


def undo_segment(model_dir: Path, store: Store, name: str, index: Index,
                 slots: Mapping[str, TensorSlot], durable: bool = True) -> None:
    """Put back what an uncommitted sync changed: every check passes before anything does."""
    seg = store.segment(name)
    relink, drop = [], []
    for f in index.whole:
        blob, target = seg / f, model_dir / f
        if not os.path.lexists(blob):
            continue  # never linked: the file is still the old one
        b, t = os.lstat(blob), os.lstat(target)
        if (b.st_dev, b.st_ino) == (t.st_dev, t.st_ino):
            drop.append(blob)  # linked, not yet replaced
            continue
        fd = open_blob(blob)
        try:
            tfd = open_blob(target)
            try:
                if not same_header(fd, tfd):
                    raise HistoryError(f"{blob} is not a previous version of {f} (size or "
                                       "header differ); refusing to restore it")
            finally:
                os.close(tfd)
        finally:
            os.close(fd)
        relink.append((blob, target))
    packed = [c for c in index.chunks if c.blob == PACK]
    pack = open_blob(seg / PACK) if packed else None
    try:
        buf = memoryview(bytearray(max((c.length for c in packed), default=0)))
        for c in packed:  # verified before anything is written
            read_chunk(pack, c, buf)
        for blob in drop:
            os.unlink(blob)
        for blob, target in relink:
            os.replace(blob, target)
        if relink and durable:
            fsync_dir(model_dir)
        with journal.opened(model_dir, {c.file for c in packed}) as fds:
            for c in packed:
                pwrite_all(fds[c.file], read_chunk(pack, c, buf), c.offset)
            if durable:
                for fd in fds.values():
                    os.fsync(fd)
    finally:
        if pack is not None:
            os.close(pack)


def leftovers(model_dir: Path) -> bool:
    """Whether an interrupted sync left anything the history recovery must clear (reads only)."""
    if any(n.endswith(NEW) for n in os.listdir(model_dir)):
        return True
    store = Store(model_dir)
    names = store.segments()
    if not names:
        return False
    referenced = set()
    if store.exists():
        referenced = {e["undo"] for e in store.load().entries if e.get("undo")}
    return any(n not in referenced for n in names)


def recover_history(model_dir: Path, durable: bool = True) -> str | None:
    """Undo a sync that kept history but did not commit, clear records no version names and
    files written whole but never committed. The caller holds the directory lock and has
    replayed the redo journal. What was done, or None."""
    store = Store(model_dir)
    store.check_dirs()
    versions = store.load() if store.exists() else None
    head = versions.head["n"] if versions else 0
    referenced = {e["undo"] for e in versions.entries if e.get("undo")} if versions else set()
    outcome = None
    stray = [n for n in store.segments() if n not in referenced]
    pending = segment_name(head + 1)
    if pending in stray and os.path.lexists(store.segment(pending) / INDEX):
        slots = read_layout(model_dir)
        index = store.read_index(pending, Regions(slots.values()))
        undo_segment(model_dir, store, pending, index, slots, durable)
        outcome = "rolled back an uncommitted checkpoint"
    for name in stray:
        remove_segment(store.segment(name))
    for n in os.listdir(model_dir):
        if n.endswith(NEW):
            unlink_if_present(model_dir / n)
            outcome = outcome or "removed a file written whole by an uncommitted sync"
    if outcome and versions is not None:
        versions.files = identity(read_layout(model_dir).values())
        store.save(versions, durable)
    return outcome
