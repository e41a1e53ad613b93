"""Cross-process coordination between vLLM's engine steps and the trainer's in-place writes.

StepLock: vLLM's worker holds it (shared side) for each engine step, from ``execute_model``
through ``sample_tokens``; the trainer holds it (exclusive side) while an optimizer step
writes the weights. So no engine step computes with a partly applied update, and forward /
backward never wait on serving. Two ``flock`` files, turnstile first, make the writer win the
next gap between engine steps instead of starving under load (a few µs of syscalls per step).

vLLM waits for the lock at most STEP_LOCK_TIMEOUT seconds (VLLM_APOLLO_STEP_LOCK_TIMEOUT,
default 10; a write takes milliseconds): a trainer stopped or hung while holding it must not
freeze serving. Past the bound the step runs without the lock, and so do the next ones (each
tries it once, without waiting) until the holder lets go. A writer stopped mid-write has left
the weights half-updated whether vLLM waits or not, and waiting cannot finish the write; what
proceeding risks is a step torn by a writer that resumes during it (docs/service.md).

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
import time
from collections.abc import Iterator

from hooks.contract import counter_path, lock_paths

STEP_LOCK_TIMEOUT = float(os.environ.get("VLLM_APOLLO_STEP_LOCK_TIMEOUT", "10"))


def _flock(fd: int, deadline: float | None) -> bool:
    """LOCK_EX on `fd`; False if not had by `deadline` (time.monotonic; None: no limit)."""
    if deadline is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return True
    pause = 20e-6
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(2 * pause, 1e-3)  # a wait costs at most 1 ms more than the write


class StepLock:
    def __init__(self, export_dir: str | os.PathLike, rank: int = 0):
        turnstile, lock = lock_paths(export_dir, rank)
        turnstile.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._turnstile = os.open(turnstile, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600)
        self._lock = os.open(lock, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600)
        self.bypassing = False  # the holder outlived the timeout: steps run without the lock

    # vLLM side: one engine step
    def acquire_step(self, timeout: float | None = None) -> bool:
        """Take the lock for one engine step: True. False when a writer held it for more than
        `timeout` s (None: wait as long as it takes), or, once that happened, is still
        holding it (then no wait at all): the step runs without the lock."""
        deadline = None if timeout is None else \
            time.monotonic() + (0.0 if self.bypassing else timeout)
        if not _flock(self._turnstile, deadline):  # blocks while a writer is waiting
            self.bypassing = True
            return False
        fcntl.flock(self._turnstile, fcntl.LOCK_UN)
        if not _flock(self._lock, deadline):
            self.bypassing = True
            return False
        self.bypassing = False
        return True

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
