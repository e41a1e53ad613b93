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

A sync that rewrote most of a file writes the new file whole beside it (``F.apollo-new``,
fsynced before the commit) and the journal (format 3) names it instead of its bytes: replay
renames it over ``F``. It may also carry the history store's new ``versions.json``
(checkpoint/history.py), written after a replay so the version a sync made is never lost.

``durable=False`` skips the fsyncs: still all-or-nothing when a *process* dies (the page
cache survives it), but an OS crash or power loss may then lose or tear the last sync — the
same guarantee as transformers' save_pretrained, which never fsyncs.

Over 300 lines on purpose: the journal's format, its replay checks and recovery are one
protocol.
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
from checkpoint.history import record_versions
from checkpoint.layout import LayoutError, TensorSlot, read_layout

MAGIC = b"APOLLOJ2"
MAGIC3 = b"APOLLOJ3"  # a header object: writes, whole-file replacements, versions
JOURNAL = ".apollo-sync.journal"
JOURNAL_TMP = JOURNAL + ".tmp"
NEW_SUFFIX = ".apollo-new"  # a weights file written whole, renamed over its name on commit


class JournalError(RuntimeError):
    """A journal that may not be replayed: damaged, forged, or the directory is read-only."""


@dataclass(frozen=True)
class Write:
    file: str  # file name inside the model directory
    offset: int
    data: Buffer


@dataclass
class Committed:
    """A committed journal: chunk writes, files replaced whole, and the versions document."""

    writes: list[Write]
    replace: list[str]
    versions: dict | None


def commit(model_dir: Path, writes: list[Write], durable: bool = True,
           replace: Iterable[str] = (), versions: dict | None = None) -> int:
    """Step 1 of the protocol; returns the journal's size in bytes. `replace`: files whose
    ``NEW_SUFFIX`` sibling (written and fsynced by the caller) replaces them on commit."""
    entries = [{"file": w.file, "offset": w.offset, "length": len(w.data)} for w in writes]
    replace = sorted(replace)
    magic = MAGIC3 if replace or versions is not None else MAGIC
    header = json.dumps(entries if magic == MAGIC else
                        {"writes": entries, "replace": replace, "versions": versions}).encode()

    def parts() -> Iterator[Buffer]:
        crc = 0
        for part in (magic, struct.pack("<Q", len(header)), header, *(w.data for w in writes)):
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
    return read_full(path).writes


def read_full(path: Path) -> Committed:
    """Everything a committed journal holds, checked for form (not yet against a layout)."""
    raw = _read_regular(path)
    body, crc = raw[:-4], raw[-4:]
    if len(raw) < 20 or not body.startswith((MAGIC, MAGIC3)) or \
            struct.pack("<I", zlib.crc32(body)) != crc:
        raise JournalError(f"{path}: journal is damaged (checksum mismatch)")
    (hlen,) = struct.unpack("<Q", body[8:16])
    malformed = JournalError(f"{path}: journal is malformed (a valid checksum over an invalid "
                             "body: not written by this program), refusing to replay it")
    try:
        header = json.loads(body[16:16 + hlen])
    except ValueError:
        raise malformed from None
    replace, versions = [], None
    if body.startswith(MAGIC3):
        if not (isinstance(header, dict) and set(header) == {"writes", "replace", "versions"}
                and isinstance(header["replace"], list)
                and all(isinstance(r, str) for r in header["replace"])
                and (header["versions"] is None or isinstance(header["versions"], dict))):
            raise malformed
        entries, replace, versions = header["writes"], header["replace"], header["versions"]
    else:
        entries = header
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
    return Committed(writes, replace, versions)


def check(writes: list[Write], slots: Mapping[str, TensorSlot],
          replace: Iterable[str] = ()) -> None:
    """Refuse (JournalError) unless every write lies inside one tensor's data in the layout
    and every file replaced whole is a weights file of the layout."""
    files = {s.file.name for s in slots.values()}
    written = {w.file for w in writes}
    for name in replace:
        if name not in files or name in written:
            raise JournalError(f"refusing to replay {JOURNAL}: it replaces {name!r}, which is "
                               "not a safetensors file of this model's layout (or it also "
                               "writes chunks of it); if no sync of "
                               "yours was interrupted here, the directory was tampered with: "
                               f"inspect it and delete {JOURNAL}")
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
    return pending_full(model_dir).writes


def pending_full(model_dir: Path) -> Committed:
    """The committed journal, checked against the current layout (empty if none)."""
    if not os.path.lexists(model_dir / JOURNAL):
        return Committed([], [], None)
    committed = read_full(model_dir / JOURNAL)
    try:
        slots = read_layout(model_dir)
    except LayoutError as exc:
        raise JournalError(f"refusing to replay {JOURNAL}: the model's layout is unusable "
                           f"({exc})") from None
    check(committed.writes, slots, committed.replace)
    return committed


def _replacement_problem(model_dir: Path, name: str) -> str | None:
    """Why ``name + NEW_SUFFIX`` may not replace ``name`` (None: it may, or it already did).
    It must be a regular file with one link, of the same size and header as the file: then
    the rename changes tensor bytes only, as a chunk write would."""
    new, old = model_dir / (name + NEW_SUFFIX), model_dir / name
    try:
        st_new, st_old = os.lstat(new), os.lstat(old)
    except FileNotFoundError:
        return None  # renamed already (or the weights file is missing: the layout says so)
    if not stat.S_ISREG(st_new.st_mode) or st_new.st_nlink != 1 or \
            st_new.st_size != st_old.st_size:
        return f"{new.name} is not a regular file of {name}'s size"
    with open(new, "rb") as a, open(old, "rb") as b:
        (n,) = struct.unpack("<Q", b.read(8))
        if a.read(8 + n) != struct.pack("<Q", n) + b.read(n):
            return f"{new.name} does not have {name}'s header"
    return None


def replace_files(model_dir: Path, names: Iterable[str], durable: bool = True) -> None:
    """Rename each ``NEW_SUFFIX`` file over its weights file (idempotent), checked first."""
    names = sorted(names)
    for name in names:
        if (problem := _replacement_problem(model_dir, name)) is not None:
            raise JournalError(f"refusing to replay {JOURNAL}: {problem}")
    for name in names:
        if os.path.lexists(model_dir / (name + NEW_SUFFIX)):
            os.replace(model_dir / (name + NEW_SUFFIX), model_dir / name)
    if names and durable:
        fsync_dir(model_dir)


def recover_locked(model_dir: Path) -> str:
    """recover() for a caller that holds the directory lock. Every check (the journal, the
    files it names) passes before anything in the directory changes."""
    committed = os.path.lexists(model_dir / JOURNAL)
    record = pending_full(model_dir) if committed else Committed([], [], None)
    writes = record.writes
    for name in record.replace:  # checked before anything changes
        if (problem := _replacement_problem(model_dir, name)) is not None:
            raise JournalError(f"refusing to replay {JOURNAL}: {problem}")
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
            replace_files(model_dir, record.replace)
            apply(fds, writes)
            if record.versions is not None:
                record_versions(model_dir, record.versions, durable=True)
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
