"""One process at a time: an exclusive `flock` on a file, held for the process's life.

Two training servers on one example log would interleave and compact each other's records
(the second's compaction renames a new file over the one the first still appends to); two on
one export would both step vLLM's weights. The lock is released by the kernel when the process
ends however it ends (kill -9 included), so a stale lock file never blocks a restart.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path


class AlreadyRunning(RuntimeError):
    """Another process holds the lock; the message names it."""


def hold_exclusive(path: str | os.PathLike, what: str) -> int:
    """The fd of `path` (created 0600, never through a symbolic link) under an exclusive
    flock; keep it open as long as the lock must hold. `what` names the resource."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise AlreadyRunning(f"{path} is a symbolic link; a lock file must be a regular "
                                 "file: remove it") from None
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise AlreadyRunning(f"another training server (pid {holder}) already uses {what} "
                             f"(lock {path}); one training server per model directory, "
                             "example log and vLLM export") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
