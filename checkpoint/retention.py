"""Which versions the history store keeps reachable: `--history-keep N|all` and a disk budget.

Dropped first: the oldest version that is neither the head nor the original. Dropping version
K merges the undo record above it (K+1 -> K) with K's own (K -> K-1) into one record
K+1 -> K-1: K's previous bytes win where both hold a chunk, so every version still reachable
stays exact, and the disk of the chunks K+1 overwrote again is freed. Blobs move into the
merged record by hard link (no copy) unless less than half of one is still needed; then the
needed chunks are copied into a new pack. The original (version 0) is dropped only when asked
(`keep_original=False`) and only after every other version, to meet the budget.

Crash-safe like a sync: the merged record is written and fsynced under a new name, then
versions.json switches to it atomically; records no version names are removed by recovery.
"""

from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass

from checkpoint.commit import remove_segment
from checkpoint.durable import fsync_dir, write_all
from checkpoint.history import (
    Chunk,
    HistoryError,
    Index,
    Regions,
    Store,
    Versions,
    open_blob,
    read_chunk,
    segment_name,
)

log = logging.getLogger("vllm_apollo.checkpoint")


@dataclass(frozen=True)
class Retention:
    keep: int | None = None  # versions below the head kept reachable (None: all)
    budget: int = 0  # bytes the store may use (0: no budget)
    keep_original: bool = True

    def to_json(self) -> dict:
        return {"keep": self.keep, "budget": self.budget, "keep_original": self.keep_original}

    @classmethod
    def from_json(cls, doc: dict) -> Retention:
        keep, budget = doc.get("keep"), doc.get("budget", 0)
        ok_keep = keep is None or (type(keep) is int and keep >= 0)
        return cls(keep if ok_keep else None, budget if type(budget) is int else 0,
                   doc.get("keep_original", True) is not False)


def parse_size(text: str) -> int:
    """'0', '512M', '20G', '1T' or a byte count."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(text[-1:], 1)
    value = float(text[:-1] if scale > 1 else text)
    if value < 0:
        raise ValueError("a size cannot be negative")
    return int(value * scale)


def _merge(store: Store, upper: dict, lower: dict, regions: Regions, durable: bool) -> str:
    """A record mapping `upper` to `lower`'s base: lower's previous bytes win."""
    a = store.read_index(lower["undo"], regions)
    b = store.read_index(upper["undo"], regions)
    chunks: dict[tuple[str, int], tuple[str, Chunk]] = {c.key: (upper["undo"], c)
                                                        for c in b.chunks}
    chunks.update({c.key: (lower["undo"], c) for c in a.chunks})
    name = segment_name(upper["n"], lower["base"])
    target = store.segment(name)
    remove_segment(target)
    target.mkdir()
    used: dict[tuple[str, str], int] = {}
    for src, c in chunks.values():
        used[(src, c.blob)] = used.get((src, c.blob), 0) + c.length
    moved: dict[tuple[str, str], str] = {}
    for src, blob in used:
        path = store.segment(src) / blob
        fd = open_blob(path)
        size = os.fstat(fd).st_size
        os.close(fd)
        if 2 * used[(src, blob)] >= size:
            moved[(src, blob)] = f"b{len(moved):05d}"
            os.link(path, target / moved[(src, blob)])
    out: list[Chunk] = []
    pack = None
    try:
        pos = 0
        for src, c in sorted(chunks.values(), key=lambda t: t[1].key):
            if (src, c.blob) in moved:
                out.append(Chunk(c.file, c.offset, c.length, moved[(src, c.blob)],
                                 c.blob_offset, c.crc))
                continue
            if pack is None:
                pack = os.open(target / "pre.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL
                               | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            fd = open_blob(store.segment(src) / c.blob)
            try:
                data = read_chunk(fd, c)
            finally:
                os.close(fd)
            write_all(pack, data)
            out.append(Chunk(c.file, c.offset, c.length, "pre.bin", pos, zlib.crc32(data)))
            pos += c.length
        if pack is not None and durable:
            os.fsync(pack)
    finally:
        if pack is not None:
            os.close(pack)
    store.write_index(name, Index(upper["n"], lower["base"], out), durable)
    if durable:
        fsync_dir(target)
    return name


def drop(store: Store, versions: Versions, n: int, regions: Regions, durable: bool = True
         ) -> None:
    """Make version `n` unreachable (neither the head nor unreachable already)."""
    upper = next((e for e in versions.entries if e.get("base") == n and e.get("undo")), None)
    lower = versions.entry(n)
    if upper is None or lower is None or n == versions.head["n"]:
        raise HistoryError(f"version {n} cannot be dropped (the head, or not reachable)")
    old = [upper["undo"]]
    if lower.get("undo") and lower.get("base") is not None:
        old.append(lower["undo"])
        upper["undo"], upper["base"] = _merge(store, upper, lower, regions, durable), \
            lower["base"]
    else:
        upper["undo"], upper["base"] = None, None
    lower.update(undo=None, base=None, dropped=True)
    store.save(versions, durable)
    for name in old:
        remove_segment(store.segment(name))
    store.fsync(durable)


def apply(store: Store, versions: Versions, policy: Retention, regions: Regions,
          durable: bool = True) -> list[int]:
    """Drop versions until `policy` holds; returns the versions dropped, in order."""
    dropped = []
    head = versions.head["n"]

    def below() -> list[int]:  # reachable versions under the head, newest first
        return [e["n"] for e in reversed(versions.entries[:-1]) if versions.reachable(e["n"])]

    def is_original(n: int) -> bool:
        return (versions.entry(n) or {}).get("name") == "original"

    if policy.keep is not None:
        for n in below()[policy.keep:][::-1]:
            if not (is_original(n) and policy.keep_original):
                drop(store, versions, n, regions, durable)
                dropped.append(n)
    while policy.budget and store.disk_bytes() > policy.budget:
        order = [n for n in below()[::-1] if not is_original(n)]
        if not order and not policy.keep_original:
            order = [n for n in below()[::-1] if n != head]
        if not order:  # what is left holds bytes only the original needs: kept, as asked
            log.warning("the history store uses %d bytes, over its budget of %d: what is left "
                        "is needed to restore the original (--history-drop-original allows "
                        "dropping it)", store.disk_bytes(), policy.budget)
            break
        drop(store, versions, order[0], regions, durable)
        dropped.append(order[0])
    return dropped
