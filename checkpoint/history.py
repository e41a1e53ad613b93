"""The history store: every checkpoint is a version, and the bytes each one overwrote are kept.

Beside the model, in ``MODEL_DIR/.apollo/history/``:

* ``versions.json``: every version (number, time, what it holds), the identity of the weights
  files at the newest one (the head), the chunk size and the retention policy. Replaced
  atomically; a version exists once it is listed here.
* ``vNNNNN/``: the undo record of version N: ``index.json`` (which chunks of which weights file
  it overwrote, where their previous bytes lie, their CRC-32) and the blobs holding those
  bytes: ``pre.bin`` (pre-images packed) or a whole previous weights file, hard-linked in when
  a sync rewrote most of a file (the old file is kept rather than copied). A record that maps
  N to an older base than N-1 (``vNNNNN-BBBBB``) is a merge made by retention.

The directory may come from anyone, like the model: nothing in it is trusted. Names must be
plain, every chunk must lie inside one tensor of the layout, blobs are regular files opened
without following links, and every byte read back is checked against its CRC.

Over 300 lines on purpose: the store's format, its untrusting reader and its retention are one
file format; split, a writer could drift from what the reader checks.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import stat
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from checkpoint.durable import atomic_replace, fsync_dir
from checkpoint.layout import TensorSlot, is_plain_name

HISTORY = Path(".apollo") / "history"
VERSIONS = "versions.json"
INDEX = "index.json"
PACK = "pre.bin"
FORMAT = 1
_SEGMENT = re.compile(r"v\d{5,}(-\d{5,})?")


class HistoryError(RuntimeError):
    """The history store is missing, damaged or unsafe, or cannot do what was asked; the
    message says why. Nothing was changed."""


def segment_name(version: int, base: int | None = None) -> str:
    return f"v{version:05d}" if base is None or base == version - 1 else \
        f"v{version:05d}-{base:05d}"


@dataclass(frozen=True)
class Chunk:
    """`length` bytes at `offset` of weights file `file` whose previous bytes are in blob
    `blob` of the record at `blob_offset`, with CRC-32 `crc` (None: not known yet)."""

    file: str
    offset: int
    length: int
    blob: str
    blob_offset: int
    crc: int | None

    @property
    def key(self) -> tuple[str, int]:
        return self.file, self.offset


@dataclass
class Index:
    version: int
    base: int
    chunks: list[Chunk]
    whole: list[str] = field(default_factory=list)  # files this sync replaced whole
    meta: dict = field(default_factory=dict)  # the version entry, for a sync's recovery

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": self.version, "base": self.base,
                "whole": self.whole, "meta": self.meta,
                "chunks": [[c.file, c.offset, c.length, c.blob, c.blob_offset, c.crc]
                           for c in self.chunks]}


def _crc_wrap(body: dict) -> bytes:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return json.dumps({"body": body, "crc32": zlib.crc32(text.encode())},
                      separators=(",", ":")).encode()


def _crc_unwrap(raw: bytes, what: str) -> dict:
    try:
        doc = json.loads(raw)
        body = doc["body"]
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
        ok = isinstance(body, dict) and doc["crc32"] == zlib.crc32(text.encode())
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise HistoryError(f"{what} is damaged (not valid JSON with a matching CRC-32)")
    return body


def _is_int(v: object, lo: int = 0) -> bool:
    return type(v) is int and v >= lo


def read_regular(path: Path, limit: int = 1 << 30) -> bytes:
    """A regular file's bytes, never through a link (HistoryError otherwise)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise HistoryError(f"{path}: cannot be opened as a regular file ({exc.strerror})") \
            from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise HistoryError(f"{path}: not a regular file")
        return f.read(limit)


def open_blob(path: Path) -> int:
    """A read-only fd of a blob: a regular file, never through a link."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise HistoryError(f"{path}: missing or not a regular file ({exc.strerror})") \
            from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise HistoryError(f"{path}: not a regular file")
    return fd


class Regions:
    """Where tensor data lies in each weights file: a chunk must sit inside one tensor."""

    def __init__(self, slots: Iterable[TensorSlot]):
        spans: dict[str, list[TensorSlot]] = {}
        for s in slots:
            spans.setdefault(s.file.name, []).append(s)
        self._slots = {f: sorted(v, key=lambda s: s.offset) for f, v in spans.items()}
        self._starts = {f: [s.offset for s in v] for f, v in self._slots.items()}

    def slot(self, file: str, offset: int, length: int) -> TensorSlot | None:
        k = bisect.bisect_right(self._starts.get(file, []), offset) - 1
        if k < 0:
            return None
        s = self._slots[file][k]
        return s if offset + length <= s.offset + s.nbytes else None


def parse_index(body: dict, name: str, regions: Regions | None) -> Index:
    bad = HistoryError(f"undo record {name} is malformed, refusing to use it")
    chunks, whole = body.get("chunks"), body.get("whole")
    if not (body.get("format") == FORMAT and _is_int(body.get("version"), 1)
            and _is_int(body.get("base")) and body["base"] < body["version"]
            and isinstance(chunks, list) and isinstance(whole, list)
            and all(is_plain_name(w) for w in whole) and isinstance(body.get("meta"), dict)):
        raise bad
    out = []
    for c in chunks:
        if not (isinstance(c, list) and len(c) == 6 and is_plain_name(c[0])
                and _is_int(c[1]) and _is_int(c[2], 1) and is_plain_name(c[3])
                and _is_int(c[4]) and (c[5] is None or _is_int(c[5]))):
            raise bad
        if regions is not None and regions.slot(c[0], c[1], c[2]) is None:
            raise HistoryError(f"undo record {name}: a chunk of {c[2]} bytes at offset {c[1]} "
                               f"of {c[0]!r} lies outside every tensor of this model; the "
                               "history store does not belong to these files or was tampered "
                               "with")
        out.append(Chunk(*c))
    return Index(body["version"], body["base"], out, whole, body["meta"])


@dataclass
class Versions:
    """versions.json: `entries` oldest first; the last is the head (the files)."""

    entries: list[dict]
    chunk_bytes: int
    files: dict[str, list[int]]  # weights file -> [size, mtime_ns] at the head
    policy: dict = field(default_factory=dict)

    @property
    def head(self) -> dict:
        return self.entries[-1]

    def entry(self, n: int) -> dict | None:
        return next((e for e in self.entries if e["n"] == n), None)

    def chain(self, target: int) -> list[dict]:
        """The entries whose undo records, applied newest first, turn the head into version
        `target`; HistoryError if it is unknown or its bytes are no longer kept."""
        if self.entry(target) is None:
            known = ", ".join(str(e["n"]) for e in self.entries)
            raise HistoryError(f"no version {target} (versions: {known})")
        out, cur = [], self.head
        while cur["n"] != target:
            if cur.get("undo") is None or cur.get("base") is None or cur["base"] < target:
                raise HistoryError(f"version {target} is no longer reachable: the bytes it "
                                   "needs were dropped by retention (--history-keep, "
                                   "--history-budget) or never kept (--history-keep off)")
            out.append(cur)
            cur = self.entry(cur["base"])
            if cur is None:
                raise HistoryError("versions.json names a base version it does not list")
        return out

    def reachable(self, n: int) -> bool:
        try:
            self.chain(n)
        except HistoryError:
            return False
        return True

    def to_json(self) -> dict:
        return {"format": FORMAT, "chunk_bytes": self.chunk_bytes, "files": self.files,
                "policy": self.policy, "versions": self.entries}


def parse_versions(body: dict) -> Versions:
    bad = HistoryError("versions.json is malformed, refusing to use the history store")
    entries, files = body.get("versions"), body.get("files")
    if not (body.get("format") == FORMAT and _is_int(body.get("chunk_bytes"), 1)
            and isinstance(entries, list) and entries and isinstance(files, dict)
            and isinstance(body.get("policy", {}), dict)):
        raise bad
    last = -1
    for e in entries:
        if not (isinstance(e, dict) and _is_int(e.get("n")) and e["n"] > last
                and (e.get("undo") is None or (isinstance(e["undo"], str)
                                               and _SEGMENT.fullmatch(e["undo"])))
                and (e.get("base") is None or (_is_int(e["base"]) and e["base"] < e["n"]))):
            raise bad
        last = e["n"]
    for name, ident in files.items():
        if not (is_plain_name(name) and isinstance(ident, list) and len(ident) == 2
                and all(_is_int(v) for v in ident)):
            raise bad
    return Versions(entries, body["chunk_bytes"], files, body.get("policy", {}))


class Store:
    """The history store of one model directory (created on the first checkpoint)."""

    def __init__(self, model_dir: str | os.PathLike):
        self.model_dir = Path(model_dir)
        self.root = self.model_dir / HISTORY

    def exists(self) -> bool:
        return os.path.lexists(self.root / VERSIONS)

    def check_dirs(self) -> None:
        """`.apollo` and `.apollo/history` are real directories (never a planted link)."""
        for d in (self.model_dir / ".apollo", self.root):
            try:
                st = os.lstat(d)
            except FileNotFoundError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise HistoryError(f"{d} is not a directory (a link?): the history store "
                                   "must be a real directory of the model; remove it")

    def make_dirs(self) -> None:
        self.check_dirs()
        for d in (self.model_dir / ".apollo", self.root):
            if not d.exists():
                d.mkdir(mode=0o755)
        self.check_dirs()

    def load(self) -> Versions:
        self.check_dirs()
        return parse_versions(_crc_unwrap(read_regular(self.root / VERSIONS),
                                          f"{self.root / VERSIONS}"))

    def save(self, versions: Versions, durable: bool = True) -> None:
        self.make_dirs()
        atomic_replace(self.root / VERSIONS, [_crc_wrap(versions.to_json())], durable,
                       tmp=self.root / (VERSIONS + ".tmp"))

    def segment(self, name: str) -> Path:
        if not _SEGMENT.fullmatch(name):
            raise HistoryError(f"{name!r} is not an undo record name")
        return self.root / name

    def segments(self) -> list[str]:
        """Names of the undo records present (referenced or not)."""
        if not self.root.is_dir():
            return []
        return sorted(n for n in os.listdir(self.root) if _SEGMENT.fullmatch(n))

    def read_index(self, name: str, regions: Regions | None) -> Index:
        d = self.segment(name)
        try:
            st = os.lstat(d)
        except FileNotFoundError:
            raise HistoryError(f"undo record {name} is missing from {self.root}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise HistoryError(f"{d} is not a directory")
        return parse_index(_crc_unwrap(read_regular(d / INDEX), f"{d / INDEX}"), name, regions)

    def write_index(self, name: str, index: Index, durable: bool = True) -> None:
        d = self.segment(name)
        atomic_replace(d / INDEX, [_crc_wrap(index.to_json())], durable, tmp=d / (INDEX + ".tmp"))

    def disk_bytes(self) -> int:
        """Bytes the store occupies (hard-linked blobs counted once)."""
        seen, total = set(), 0
        for dirpath, _, filenames in os.walk(self.root):
            for n in filenames:
                st = os.lstat(os.path.join(dirpath, n))
                if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
        return total

    def segment_bytes(self, name: str) -> int:
        d, total = self.segment(name), 0
        if d.is_dir():
            for n in os.listdir(d):
                st = os.lstat(d / n)
                total += st.st_blocks * 512 if stat.S_ISREG(st.st_mode) else 0
        return total

    def fsync(self, durable: bool) -> None:
        if durable:
            fsync_dir(self.root)


def identity(slots: Iterable[TensorSlot]) -> dict[str, list[int]]:
    """[size, mtime_ns] of each weights file: what says the files are still the head's."""
    out = {}
    for path in sorted({s.file for s in slots}):
        st = os.lstat(path)
        out[path.name] = [st.st_size, st.st_mtime_ns]
    return out


def record_versions(model_dir: Path, doc: dict, durable: bool = True) -> None:
    """After a redo journal's replay: its versions document (unless the store already has
    that head: the sync reached versions.json before the crash), with the files' identity."""
    from checkpoint.layout import read_layout

    store, versions = Store(model_dir), parse_versions(doc)
    if store.exists() and (current := store.load()).head["n"] >= versions.head["n"]:
        versions = current  # listed already; the replay rewrote the files (their mtime)
    versions.files = identity(read_layout(model_dir).values())
    store.save(versions, durable)


def read_chunk(fd: int, chunk: Chunk, into: memoryview | None = None) -> memoryview:
    """The previous bytes of `chunk` from its blob's fd, checked against the CRC."""
    buf = into[:chunk.length] if into is not None else memoryview(bytearray(chunk.length))
    n = os.preadv(fd, [buf], chunk.blob_offset)
    if n != chunk.length or (chunk.crc is not None and zlib.crc32(buf) != chunk.crc):
        raise HistoryError(f"the history store's copy of {chunk.length} bytes at offset "
                           f"{chunk.offset} of {chunk.file} is damaged (short or CRC "
                           "mismatch); nothing was changed")
    return buf


def entry_summary(e: dict) -> dict:
    """A version entry without its (possibly long) list of example ids."""
    return {k: v for k, v in e.items() if k != "example_ids"}


__all__ = ["Chunk", "HistoryError", "Index", "Regions", "Store", "Versions", "entry_summary",
           "identity", "open_blob", "read_chunk", "record_versions", "segment_name"]
