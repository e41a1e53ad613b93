"""Write only the changed chunks of the live weights back into the safetensors files.

Change detection keeps two 64-bit checksums per chunk (default 1 MiB), computed where the
tensor lives (GPU: integer sums; CPU: a fast hash), so it needs no second copy of the weights.
The baseline is computed from the files themselves when the checkpointer starts, so the first
sync writes exactly what differs from disk. Checksums detect change; they are not a MAC.
Each sync first checks that the files are still the ones whose layout it read (guard.py).

When the tensors the optimizer stepped make up most of a file (`whole_share`), that file is
written whole without checksumming first (training changes every element of what it trains):
the checksums that become the next baseline are computed while the new file is fsynced.
Every sync is a version (checkpoint/commit.py); with `history` the bytes it overwrote are kept.

Over 300 lines on purpose: change detection and the per-file choice (whole or chunks) are one
decision made against the same checksums, which also become the next baseline.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

import checkpoint.journal as journal
import checkpoint.retention as retention
from checkpoint.commit import Transaction, leftovers
from checkpoint.durable import Buffer
from checkpoint.guard import (
    CheckpointRefused,
    FileIdentity,
    dir_lock,
    dir_writable,
    file_problems,
)
from checkpoint.history import HistoryError, Regions, Store
from checkpoint.layout import LayoutError, TensorSlot, read_layout
from checkpoint.recovery import recover_locked
from checkpoint.retention import Retention

log = logging.getLogger("vllm_apollo.checkpoint")
CHUNK_BYTES = 1 << 20
WHOLE_SHARE = 0.6  # a file this much of which changed is written whole (one write, not two)
WHOLE_MIN_CHUNKS = 16  # ... if it is this many chunks at least (below, two writes cost little)
_BLOCK_CHUNKS = 16  # chunks checksummed at once: bounds the int64 temporaries


@dataclass
class SyncResult:
    tensors: int
    chunks: int
    bytes_written: int  # into the safetensors files (a file written whole counts whole)
    journal_bytes: int
    seconds: float
    version: int | None = None  # the version this sync made (None: nothing changed)
    bytes_changed: int = 0  # of the chunks that changed
    history_bytes: int = 0  # the undo record kept for it
    whole_files: int = 0  # files written whole and renamed in
    dropped_versions: tuple[int, ...] = ()  # by retention, after it


def _words(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().contiguous().view(-1)
    return flat.view(torch.int16) if flat.element_size() >= 2 else flat.view(torch.uint8)


def chunk_checksums(t: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Two 64-bit checksums per chunk of `t`'s bytes, shape (chunks, 2), on t's device.

    CPU: XXH3-128 over the bytes in place, split into two int64 (~12 GB/s on one core, no
    copy; zlib's crc32 and adler32 together ran at ~0.9 GB/s and were most of a sync's time
    for a mostly-changed file). CUDA: two position-weighted integer sums computed on the GPU
    (only the sums cross to the host).
    """
    if t.device.type == "cpu":
        import xxhash  # only here: a GPU-only install checksums on the device
        raw = memoryview(_words(t).numpy()).cast("B")
        digests = b"".join(xxhash.xxh3_128_digest(raw[i:i + chunk_bytes])
                           for i in range(0, len(raw), chunk_bytes))
        if not digests:  # an empty tensor: no chunks
            return torch.empty((0, 2), dtype=torch.int64)
        return torch.frombuffer(bytearray(digests), dtype=torch.int64).view(-1, 2)
    words = _words(t)
    per_chunk = chunk_bytes // words.element_size()
    n_chunks = -(-words.numel() // per_chunk)
    idx = torch.arange(per_chunk, device=t.device, dtype=torch.int64)
    mults = torch.stack([2 * idx + 1, (idx * idx) % 65521 + 1])  # (2, per_chunk)
    out = torch.empty((n_chunks, 2), dtype=torch.int64, device=t.device)
    for first in range(0, n_chunks, _BLOCK_CHUNKS):
        last = min(first + _BLOCK_CHUNKS, n_chunks)
        block = words[first * per_chunk: last * per_chunk].to(torch.int64)
        pad = (last - first) * per_chunk - block.numel()
        if pad:
            block = torch.nn.functional.pad(block, (0, pad))
        block = block.view(last - first, per_chunk)
        out[first:last, 0] = (block * mults[0]).sum(1)  # no int64 matmul on CUDA
        out[first:last, 1] = (block * mults[1]).sum(1)
    return out


class Checkpointer:
    """Syncs `live` (HF name -> tensor, e.g. the mapped model's views) into `model_dir`."""

    def __init__(self, model_dir: str | os.PathLike, live: dict[str, torch.Tensor],
                 chunk_bytes: int = CHUNK_BYTES, durable: bool = True,
                 file_names: Mapping[str, str] | None = None,
                 gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 history: Retention | None = None, whole_share: float = WHOLE_SHARE):
        """`file_names`: the file's name for a live name where they differ (a multimodal
        checkpoint nests the text model the trainer holds); `sync()` takes live names.
        `gather`: makes a live tensor whole before it is compared and written (tensor
        parallelism: the shards of a DTensor, gathered to this rank one tensor at a time).
        `history`: keep every sync's previous bytes (checkpoint/history.py) under this
        retention; None keeps none (versions are still numbered)."""
        self.model_dir = Path(model_dir)
        self._file_name = dict(file_names or {})
        self._live_name = {self._file_name.get(n, n): n for n in live}
        self._gather = gather
        live = {self._file_name.get(name, name): t for name, t in live.items()}
        self.durable = durable  # fsync (survives OS crashes) or not (survives process crashes)
        self.chunk_bytes = chunk_bytes
        self.history = history
        self.whole_share = whole_share
        if not dir_writable(self.model_dir):
            raise CheckpointRefused(f"cannot checkpoint into {self.model_dir}: read-only")
        store = Store(self.model_dir)
        with dir_lock(self.model_dir):
            try:
                outcome = recover_locked(self.model_dir)
                if store.exists() and store.load().chunk_bytes != chunk_bytes:
                    raise HistoryError(f"its history store was kept with other chunk sizes "
                                       f"than {chunk_bytes} bytes")
            except HistoryError as exc:
                raise CheckpointRefused(f"cannot checkpoint into {self.model_dir}: {exc}; move "
                                        f"{store.root} aside to start a new history") from None
            if outcome != "clean":
                log.warning("checkpoint recovery: %s", outcome)
            self.slots = read_layout(self.model_dir)
            self.live = self._match(live)
            files = {self.slots[name].file for name in self.live}
            if problems := file_problems(self.model_dir, files):
                raise CheckpointRefused(f"cannot checkpoint into {self.model_dir}: "
                                        + "; ".join(problems))
            # What each file is now: a sync refuses a file that changed since (stale offsets).
            with journal.opened(self.model_dir, {f.name for f in files}) as fds:
                self._identity = {name: FileIdentity.of(fd) for name, fd in fds.items()}
                if read_layout(self.model_dir) != self.slots:
                    raise CheckpointRefused(f"{self.model_dir}: the safetensors files changed "
                                            "while the checkpointer read them")
        self.regions = Regions(self.slots.values())
        # Computed where the live tensor is: CPU and CUDA use different checksums.
        self.baseline = {name: chunk_checksums(self._file_tensor(self.slots[name]).to(t.device),
                                               chunk_bytes)
                         for name, t in self.live.items()}
        self.last: SyncResult | None = None

    def _match(self, live: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The live tensors that the layout holds (file names), checked against it."""
        out: dict[str, torch.Tensor] = {}
        for name, slot in self.slots.items():
            if name not in live:
                continue
            t = live[name]
            if tuple(t.shape) != slot.shape:
                raise LayoutError(f"{name}: live shape {tuple(t.shape)} but the file has "
                                  f"{slot.shape}")
            if t.dtype != slot.dtype:
                log.info("%s: live %s is saved as the file's %s", name, t.dtype, slot.dtype)
            out[name] = t
        return out

    def _file_tensor(self, slot: TensorSlot) -> torch.Tensor:
        if not slot.nbytes:  # torch.frombuffer refuses an empty buffer
            return torch.empty(slot.shape, dtype=slot.dtype)
        data = bytearray(slot.nbytes)  # read into once (f.read and a copy cost twice)
        view, done = memoryview(data), 0
        with open(slot.file, "rb", buffering=0) as f:
            f.seek(slot.offset)
            while done < slot.nbytes:  # one read returns at most ~2 GiB
                n = f.readinto(view[done:])
                if not n:
                    raise LayoutError(f"{slot.file.name}: shorter than its header says")
                done += n
        return torch.frombuffer(data, dtype=slot.dtype).view(slot.shape)

    def _as_saved(self, name: str) -> torch.Tensor:
        t = self.live[name].detach()
        if self._gather is not None:
            t = self._gather(t)
        return t.to(self.slots[name].dtype).contiguous()  # a save's conversion, if any

    def _to_check(self, candidates: Iterable[str] | None) -> list[str]:
        """File names of the tensors sync(candidates) reads, in order."""
        if candidates is None:
            return list(self.live)
        return [n for n in (self._file_name.get(c, c) for c in candidates) if n in self.live]

    def plan(self, candidates: Iterable[str] | None = None) -> list[str]:
        """The live names sync(candidates) reads, in the order it reads them."""
        return [self._live_name[n] for n in self._to_check(candidates)]

    def live_name(self, name: str) -> str:
        """The live name of a layout (file) name."""
        return self._live_name[name]

    def _chunks(self, name: str, idx: Iterable[int]) -> Iterator[tuple[int, int]]:
        """(offset in the file, length) of chunks `idx` of tensor `name`."""
        slot = self.slots[name]
        for c in idx:
            lo = c * self.chunk_bytes
            yield slot.offset + lo, min(self.chunk_bytes, slot.nbytes - lo)

    def changed(self, name: str, sums: torch.Tensor) -> list[int]:
        return (sums != self.baseline[name]).any(dim=1).nonzero().flatten().tolist()

    def dirty(self, candidates: Iterable[str] | None = None) -> list[tuple[str, int, int]]:
        """The chunks (file, offset, length) of the live tensors that differ from the files,
        among `candidates` (live names; None: all). Not under tensor parallelism."""
        out = []
        for name in self._to_check(candidates):
            idx = self.changed(name, chunk_checksums(self._as_saved(name), self.chunk_bytes))
            out += [(self.slots[name].file.name, o, n) for o, n in self._chunks(name, idx)]
        return out

    def _predicted_whole(self, names: list[str]) -> set[str]:
        """Files most of whose bytes belong to `names` (the tensors the optimizer stepped)."""
        per_file: dict[Path, int] = {}
        for n in names:
            per_file[self.slots[n].file] = per_file.get(self.slots[n].file, 0) + \
                self.slots[n].nbytes
        return {f.name for f, b in per_file.items() if self._whole(b, os.path.getsize(f))}

    def _whole(self, changed: int, size: int) -> bool:
        return changed >= self.whole_share * size and size >= WHOLE_MIN_CHUNKS * self.chunk_bytes

    def sync(self, candidates: Iterable[str] | None = None, meta: dict | None = None
             ) -> SyncResult:
        """Write the changed chunks, all or nothing. The caller keeps the weights still.

        `candidates`: the names that may have changed (e.g. those the optimizer stepped);
        only they are checksummed. None checks every tensor. `meta`: what the version holds
        (examples, optimizer steps, drift), kept in the history store.
        """
        start = time.perf_counter()
        names = self._to_check(candidates)
        # Under tensor parallelism every rank gathers each tensor once, in order: no
        # prediction there (it would gather twice).
        predicted = self._predicted_whole(names) if candidates is not None and \
            self._gather is None else set()
        writes: list[journal.Write] = []
        new_sums: dict[str, torch.Tensor] = {}
        changed: dict[str, list[int]] = {}
        for name in names:
            if self.slots[name].file.name in predicted:
                continue
            saved = self._as_saved(name)
            sums = chunk_checksums(saved, self.chunk_bytes)
            idx = self.changed(name, sums)
            if not idx:
                continue
            new_sums[name], changed[name] = sums, idx
            # CPU: views of the live bytes (the caller holds the weights still); CUDA: a host
            # copy of the changed chunks only.
            raw = _words(saved).view(torch.uint8)
            host = memoryview(raw.numpy()) if raw.device.type == "cpu" else None
            slot = self.slots[name]
            for offset, length in self._chunks(name, idx):
                lo = offset - slot.offset
                data = host[lo:lo + length] if host is not None else \
                    memoryview(raw[lo:lo + length].cpu().numpy())
                writes.append(journal.Write(slot.file.name, offset, data))
        per_file: dict[str, int] = {}
        for w in writes:
            per_file[w.file] = per_file.get(w.file, 0) + len(w.data)
        whole = predicted | {f for f, b in per_file.items()
                             if self._whole(b, os.path.getsize(self.model_dir / f))}
        if writes or predicted:  # checked only now: under tensor parallelism every gather
            # above must run
            self.last = self._write(writes, whole, [n for n in names if
                                                    self.slots[n].file.name in predicted],
                                    new_sums, changed, meta or {}, start)
        else:
            self.last = SyncResult(0, 0, 0, 0, time.perf_counter() - start)
        log.info("checkpoint: version %s, %d tensors, %d chunks, %d bytes (%d files whole) in "
                 "%.3f s", self.last.version, self.last.tensors, self.last.chunks,
                 self.last.bytes_written, self.last.whole_files, self.last.seconds)
        return self.last

    def _live_parts(self, names: list[str]) -> Iterator[tuple[int, Buffer]]:
        """The saved bytes of `names` in file order (CUDA: one host chunk at a time)."""
        for name in sorted(names, key=lambda n: self.slots[n].offset):
            raw = _words(self._as_saved(name)).view(torch.uint8)
            offset = self.slots[name].offset
            if raw.device.type == "cpu":
                yield offset, memoryview(raw.numpy())
                continue
            for lo in range(0, raw.numel(), self.chunk_bytes):
                yield offset + lo, memoryview(raw[lo:lo + self.chunk_bytes].cpu().numpy())

    def _write(self, writes: list[journal.Write], whole: set[str], in_predicted: list[str],
               new_sums: dict[str, torch.Tensor], changed: dict[str, list[int]], meta: dict,
               start: float) -> SyncResult:
        """Write `writes` in place and the files `whole` anew (those of `in_predicted`, the
        stepped tensors of files predicted to be written whole, from the live tensors), as one
        version, refusing any file that changed on disk since its layout was read (nothing is
        written then)."""
        predicted = {self.slots[n].file.name for n in in_predicted}
        names = {w.file for w in writes} | whole
        with dir_lock(self.model_dir):
            self._own_leftovers()
            with journal.opened(self.model_dir, names) as fds:
                for name, fd in fds.items():
                    self._check_identity(name, fd)
                tx = Transaction(self.model_dir, self.slots, fds, durable=self.durable,
                                 history=self.history is not None, chunk_bytes=self.chunk_bytes)
                if self.history is not None:
                    tx.versions.policy = self.history.to_json()
                try:
                    for f in sorted(whole):
                        tx.write_whole(f, self._live_parts([n for n in in_predicted if
                                                            self.slots[n].file.name == f])
                                       if f in predicted else
                                       sorted(((w.offset, w.data) for w in writes
                                               if w.file == f), key=lambda t: t[0]))
                    tx.add_writes(w for w in writes if w.file not in whole)
                    sums = _Background(lambda: {n: chunk_checksums(self._as_saved(n),
                                                                   self.chunk_bytes)
                                                for n in in_predicted})
                    tx.prepare({**meta, "tensors": len(changed), "chunks": len(writes)})
                    tx.apply()
                    new_sums.update(sums.result())
                    for n in in_predicted:
                        if idx := self.changed(n, new_sums[n]):
                            changed[n] = idx
                    whole_chunks = self._whole_chunks(whole, changed)
                    stats = {"tensors": len(changed), "chunks": sum(map(len, changed.values())),
                             "bytes_changed": sum(length for n, idx in changed.items()
                                                  for _, length in self._chunks(n, idx))}
                    entry = tx.commit({**meta, **stats}, whole_chunks)
                except BaseException:
                    tx.abort()
                    raise
                finally:
                    self._refresh_identity(names)
            dropped = self._retain(tx)
        self.baseline.update(new_sums)
        return SyncResult(tensors=stats["tensors"], chunks=stats["chunks"],
                          bytes_written=tx.bytes_written, journal_bytes=tx.journal_bytes,
                          seconds=time.perf_counter() - start, version=entry["n"],
                          bytes_changed=stats["bytes_changed"],
                          history_bytes=entry.get("history_bytes", 0), whole_files=len(whole),
                          dropped_versions=tuple(dropped))

    def _whole_chunks(self, whole: set[str], changed: dict[str, list[int]]
                      ) -> dict[str, list[tuple[int, int]]]:
        """Per file written whole: the (offset, length) of its changed chunks."""
        out: dict[str, list[tuple[int, int]]] = {f: [] for f in whole}
        for n, idx in changed.items():
            f = self.slots[n].file.name
            if f in whole:
                out[f].extend(self._chunks(n, idx))
        return out

    def _retain(self, tx: Transaction) -> list[int]:
        if self.history is None:
            return []
        try:
            return retention.apply(tx.store, tx.versions, self.history, self.regions,
                                   self.durable)
        except (HistoryError, OSError) as exc:  # the version is committed either way
            log.warning("history retention failed (the store keeps more than asked): %s", exc)
            return []

    def _own_leftovers(self) -> None:
        """A sync of this process that failed after its commit (a journal to replay) or in
        the middle (an undo record to apply): finished before the next one."""
        if os.path.lexists(self.model_dir / journal.JOURNAL) or leftovers(self.model_dir):
            names = {s.file.name for s in self.slots.values()}
            with journal.opened(self.model_dir, names & set(self._identity)) as fds:
                for name, fd in fds.items():
                    self._check_identity(name, fd)
            recover_locked(self.model_dir)
            self._refresh_identity(names & set(self._identity))

    def _refresh_identity(self, names: Iterable[str]) -> None:
        """After this process's own writes: what the files are now."""
        for name in names:
            try:
                with journal.opened(self.model_dir, [name]) as fds:
                    self._identity[name] = FileIdentity.of(fds[name])
            except (OSError, CheckpointRefused):
                log.warning("%s could not be reopened after a sync", name)

    def check_files(self) -> None:
        """Refuse (CheckpointRefused) if a weights file changed since the checkpointer read
        it: what the history store says of the files would not hold."""
        with journal.opened(self.model_dir, set(self._identity)) as fds:
            for name, fd in fds.items():
                self._check_identity(name, fd)

    def _check_identity(self, name: str, fd: int) -> None:
        known = self._identity.get(name)
        if known is None:
            raise CheckpointRefused(f"{name} is not a file this checkpointer read; nothing was "
                                    "written")
        changes = known.changes(FileIdentity.of(fd))
        if changes:
            raise CheckpointRefused(
                f"{self.model_dir / name} changed on disk since the checkpointer read its "
                f"layout ({', '.join(changes)} differ): its tensors may sit at other offsets "
                "now, so this sync was refused and nothing was written; restart the training "
                "server to checkpoint into the new files")


class _Background:
    """fn() on a thread (checksums overlap the fsync of the new files); result() joins."""

    def __init__(self, fn: Callable[[], dict]):
        self._out: dict = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], dict]) -> None:
        try:
            self._out = fn()
        except BaseException as exc:
            self._error = exc

    def result(self) -> dict:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._out
