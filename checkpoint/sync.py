"""Write only the changed chunks of the live weights back into the safetensors files.

Change detection keeps one 64-bit checksum pair per chunk (default 1 MiB), computed where the
tensor lives (GPU or CPU) with integer arithmetic, so it needs no second copy of the weights.
The baseline is computed from the files themselves when the checkpointer starts, so the first
sync writes exactly what differs from disk. Checksums detect change; they are not a MAC.
Each sync first checks that the files are still the ones whose layout it read (guard.py).
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

import checkpoint.journal as journal
from checkpoint.guard import (
    CheckpointRefused,
    FileIdentity,
    dir_lock,
    dir_writable,
    file_problems,
)
from checkpoint.layout import LayoutError, TensorSlot, read_layout

log = logging.getLogger("vllm_apollo.checkpoint")
CHUNK_BYTES = 1 << 20
_BLOCK_CHUNKS = 16  # chunks checksummed at once: bounds the int64 temporaries


@dataclass
class SyncResult:
    tensors: int
    chunks: int
    bytes_written: int  # into the safetensors files
    journal_bytes: int
    seconds: float


def _words(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().contiguous().view(-1)
    return flat.view(torch.int16) if flat.element_size() >= 2 else flat.view(torch.uint8)


def chunk_checksums(t: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Two 32/64-bit checksums per chunk of `t`'s bytes, shape (chunks, 2), on t's device.

    CPU: zlib's crc32 and adler32 over the bytes in place (GB/s, no copy). CUDA: two
    position-weighted integer sums computed on the GPU (only the sums cross to the host).
    """
    if t.device.type == "cpu":
        raw = memoryview(_words(t).numpy()).cast("B")
        sums = [(zlib.crc32(raw[i:i + chunk_bytes]), zlib.adler32(raw[i:i + chunk_bytes]))
                for i in range(0, len(raw), chunk_bytes)]
        return torch.tensor(sums, dtype=torch.int64)
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
                 gather: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """`file_names`: the file's name for a live name where they differ (a multimodal
        checkpoint nests the text model the trainer holds); `sync()` takes live names.
        `gather`: makes a live tensor whole before it is compared and written (tensor
        parallelism: the shards of a DTensor, gathered to this rank one tensor at a time)."""
        self.model_dir = Path(model_dir)
        self._file_name = dict(file_names or {})
        self._live_name = {self._file_name.get(n, n): n for n in live}
        self._gather = gather
        live = {self._file_name.get(name, name): t for name, t in live.items()}
        self.durable = durable  # fsync (survives OS crashes) or not (survives process crashes)
        self.chunk_bytes = chunk_bytes
        if not dir_writable(self.model_dir):
            raise CheckpointRefused(f"cannot checkpoint into {self.model_dir}: read-only")
        with dir_lock(self.model_dir):
            outcome = journal.recover_locked(self.model_dir)
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
        with open(slot.file, "rb") as f:
            f.seek(slot.offset)
            data = bytearray(f.read(slot.nbytes))
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

    def sync(self, candidates: Iterable[str] | None = None) -> SyncResult:
        """Write the changed chunks, all or nothing. The caller keeps the weights still.

        `candidates`: the names that may have changed (e.g. those the optimizer stepped);
        only they are checksummed. None checks every tensor.
        """
        start = time.perf_counter()
        writes: list[journal.Write] = []
        new_sums: dict[str, torch.Tensor] = {}
        for name in self._to_check(candidates):
            saved = self._as_saved(name)
            sums = chunk_checksums(saved, self.chunk_bytes)
            changed = (sums != self.baseline[name]).any(dim=1).nonzero().flatten().tolist()
            if not changed:
                continue
            new_sums[name] = sums
            # CPU: views of the live bytes (the caller holds the weights still); CUDA: a host
            # copy of the changed chunks only.
            raw = _words(saved).view(torch.uint8)
            host = memoryview(raw.numpy()) if raw.device.type == "cpu" else None
            slot = self.slots[name]
            for c in changed:
                lo, hi = c * self.chunk_bytes, min((c + 1) * self.chunk_bytes, slot.nbytes)
                data = host[lo:hi] if host is not None else memoryview(raw[lo:hi].cpu().numpy())
                writes.append(journal.Write(slot.file.name, slot.offset + lo, data))
        journal_bytes = 0
        if writes:  # checked only now: under tensor parallelism every gather above must run
            journal_bytes = self._write(writes)
            self.baseline.update(new_sums)
        self.last = SyncResult(tensors=len(new_sums), chunks=len(writes),
                               bytes_written=sum(len(w.data) for w in writes),
                               journal_bytes=journal_bytes,
                               seconds=time.perf_counter() - start)
        log.info("checkpoint: %d tensors, %d chunks, %d bytes in %.3f s", self.last.tensors,
                 self.last.chunks, self.last.bytes_written, self.last.seconds)
        return self.last

    def _write(self, writes: list[journal.Write]) -> int:
        """Journal, write and fsync `writes`, refusing any file that changed on disk since its
        layout was read (nothing is written then); returns the journal's size."""
        with dir_lock(self.model_dir):
            # A journal left by an earlier sync of this process that failed after its commit.
            leftover = journal.pending(self.model_dir)
            names = {w.file for w in writes} | {w.file for w in leftover}
            with journal.opened(self.model_dir, names) as fds:
                for name, fd in fds.items():
                    self._check_identity(name, fd)
                try:
                    if leftover:
                        journal.apply(fds, leftover, self.durable)
                        journal.finish(self.model_dir, self.durable)
                    size = journal.commit(self.model_dir, writes, self.durable)
                    journal.apply(fds, writes, self.durable)
                    journal.finish(self.model_dir, self.durable)
                finally:  # checked files: what happened to them since is this process's doing
                    for name, fd in fds.items():
                        self._identity[name] = FileIdentity.of(fd)
        return size

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
