"""Cross-process coordination between vLLM's engine steps and the trainer's in-place writes.

StepLock: vLLM's worker holds it (shared side) for each engine step, from ``execute_model``
through ``sample_tokens``; the trainer holds it (exclusive side) while an optimizer step
writes the weights. So no engine step computes with a partly applied update, and forward /
backward never wait on serving. Two ``flock`` files, turnstile first, make the writer win the
next gap between engine steps instead of starving under load (a few µs of syscalls per step).

UpdateCounter: an 8-byte shared counter the trainer bumps after an applied update; vLLM's
scheduler compares it at each schedule() and drops the prefix cache when it moved, so KV
computed under old weights is not reused. The trainer decides how often to bump it (policy).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
from collections.abc import Iterator

from hooks.contract import counter_path, lock_paths


class StepLock:
    def __init__(self, export_dir: str | os.PathLike, rank: int = 0):
        turnstile, lock = lock_paths(export_dir, rank)
        turnstile.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._turnstile = os.open(turnstile, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600)
        self._lock = os.open(lock, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600)

    # vLLM side: one engine step
    def acquire_step(self) -> None:
        fcntl.flock(self._turnstile, fcntl.LOCK_EX)  # blocks while a writer is waiting
        fcntl.flock(self._turnstile, fcntl.LOCK_UN)
        fcntl.flock(self._lock, fcntl.LOCK_EX)

    def release_step(self) -> None:
        fcntl.flock(self._lock, fcntl.LOCK_UN)

    # trainer side: one in-place update
    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        fcntl.flock(self._turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock, fcntl.LOCK_UN)
        finally:
            fcntl.flock(self._turnstile, fcntl.LOCK_UN)


class UpdateCounter:
    """An 8-byte counter in a file every process maps; it lives as long as the export does
    (the trainer also counts applied optimizer steps in one, "steps", to recover after a
    crash of its own)."""

    def __init__(self, export_dir: str | os.PathLike, name: str = "updates"):
        path = counter_path(export_dir, name)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600)
        try:
            if os.fstat(fd).st_size < 8:
                os.ftruncate(fd, 8)
            self._map = mmap.mmap(fd, 8)
        finally:
            os.close(fd)

    def read(self) -> int:
        return struct.unpack_from("<Q", self._map)[0]

    def bump(self) -> int:
        return self.add(1)

    def add(self, n: int) -> int:
        value = self.read() + n  # one writer per counter, so no compare-and-swap needed
        struct.pack_into("<Q", self._map, 0, value)
        return value
