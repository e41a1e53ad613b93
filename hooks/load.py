"""Serving load, published by vLLM's worker for the trainer: how busy the engine is, read
without any HTTP.

Rank 0's worker updates ``rank0.load`` (hooks/contract.py) at the start and the end of every
engine step: a fixed record of 8-byte fields in a file both sides map. The trainer reads it
before each chunk of its own work (server/engine/pacing.py) and waits while serving is busy.
One writer; readers never block it: a sequence number, odd while a write is in progress,
lets a reader retry a torn read (a seqlock). Times are CLOCK_MONOTONIC nanoseconds
(``time.monotonic_ns``), one clock for every process on the machine.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import astuple, dataclass

from hooks.contract import load_path

_FIELDS = ("steps", "busy_ns", "last_start_ns", "last_end_ns", "tokens", "last_tokens",
           "last_requests", "lock_wait_ns")
_SEQ = struct.Struct("<Q")
_BODY = struct.Struct("<" + "Q" * len(_FIELDS))
_SIZE = 128  # room for later fields; a reader ignores what it does not know


@dataclass(frozen=True)
class LoadSnapshot:
    """The engine's totals since vLLM started, as one consistent read."""

    steps: int  # engine steps finished
    busy_ns: int  # time inside engine steps (from holding the step lock to sampled tokens)
    last_start_ns: int  # when the latest step started (0: none yet)
    last_end_ns: int  # when the latest finished step ended
    tokens: int  # tokens scheduled in finished steps (prompt and generated)
    last_tokens: int  # tokens scheduled in the latest step
    last_requests: int  # requests in the latest step
    lock_wait_ns: int  # time steps waited for the trainer's writes (the step lock)

    @property
    def in_step(self) -> bool:
        return self.last_start_ns > self.last_end_ns


class LoadRecord:
    """The record in `export_dir`: vLLM's worker writes it (step_started / step_ended), the
    trainer reads it (read)."""

    def __init__(self, export_dir: str | os.PathLike, rank: int = 0):
        path = load_path(export_dir, rank)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600)
        try:
            if os.fstat(fd).st_size < _SIZE:
                os.ftruncate(fd, _SIZE)
            self._map = mmap.mmap(fd, _SIZE)
        finally:
            os.close(fd)
        self._mine: list[int] | None = None  # the writer's copy of the fields

    # --- writer (vLLM's worker, one thread) ---
    def _publish(self) -> None:
        seq = _SEQ.unpack_from(self._map)[0] | 1
        _SEQ.pack_into(self._map, 0, seq)  # odd: a write in progress
        _BODY.pack_into(self._map, 8, *self._mine)
        _SEQ.pack_into(self._map, 0, seq + 1)

    def _fields(self) -> list[int]:
        if self._mine is None:  # carry on from what the file holds (a restarted worker)
            self._mine = list(astuple(self.read()))
        return self._mine

    def step_started(self, now_ns: int, *, tokens: int = 0, requests: int = 0,
                     lock_wait_ns: int = 0) -> None:
        f = self._fields()
        f[2], f[5], f[6] = now_ns, tokens, requests
        f[7] += lock_wait_ns
        self._publish()

    def step_ended(self, now_ns: int) -> None:
        f = self._fields()
        if f[2] <= f[3]:
            return  # no step open
        f[0] += 1
        f[1] += max(0, now_ns - f[2])
        f[3] = now_ns
        f[4] += f[5]
        self._publish()

    # --- reader (the trainer) ---
    def read(self, tries: int = 100) -> LoadSnapshot:
        """A consistent snapshot (a torn read is retried; after `tries` the last one is
        returned: the writer is then stuck mid-write, which a reader cannot fix)."""
        for _ in range(tries):
            before = _SEQ.unpack_from(self._map)[0]
            body = _BODY.unpack_from(self._map, 8)
            if not before & 1 and _SEQ.unpack_from(self._map)[0] == before:
                break
        return LoadSnapshot(*body)
