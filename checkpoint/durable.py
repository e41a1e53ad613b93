"""Write-all loops and atomic, fsynced file replacement: the durability primitives.

`os.write`/`os.pwrite` may write fewer bytes than asked (a signal, a full disk, a network file
system); every caller here loops until all bytes are written or raises. A file is replaced
atomically by writing a temporary next to it, fsyncing it, renaming it over the target and
fsyncing the directory, so a crash leaves the old or the new file, never a torn one.
Standard library only: the training server's own journal uses it too.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path

Buffer = bytes | bytearray | memoryview


def _bytes_view(data: Buffer) -> memoryview:
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def write_all(fd: int, data: Buffer) -> int:
    """Write every byte of `data` at the fd's position; returns the byte count."""
    view = _bytes_view(data)
    done = 0
    while done < len(view):
        n = os.write(fd, view[done:])
        if n <= 0:
            raise OSError(errno.EIO, f"write made no progress after {done} of {len(view)} bytes")
        done += n
    return done


def pwrite_all(fd: int, data: Buffer, offset: int) -> int:
    """Write every byte of `data` at `offset` (the fd's position is unchanged)."""
    view = _bytes_view(data)
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, f"pwrite made no progress after {done} of {len(view)} "
                          f"bytes at offset {offset}")
        done += n
    return done


FLUSH_BYTES = 32 << 20


class Flusher:
    """Keeps at most `every` bytes of a file being written unflushed (fdatasync each time
    that much was written), as PostgreSQL's checkpoint_flush_after does: an fsync elsewhere
    on the file system (the example log's, acknowledging a lesson) then waits for at most
    that much of a checkpoint's writes, not for all of them. Off unless `durable`."""

    def __init__(self, fd: int, durable: bool, every: int | None = None):
        self.fd, self.durable, self.every = fd, durable, every or FLUSH_BYTES
        self.pending = 0

    def wrote(self, n: int) -> None:
        self.pending += n
        if self.durable and self.pending >= self.every:
            os.fdatasync(self.fd)
            self.pending = 0


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a directory's entries (a rename, an unlink) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_replace(path: str | os.PathLike, parts: Iterable[Buffer], durable: bool = True,
                   tmp: str | os.PathLike | None = None, mode: int = 0o644) -> int:
    """Replace `path` by the concatenation of `parts`, all or nothing; returns its size.

    The parts go to `tmp` (default: `path` + ".tmp", same directory), which is created afresh:
    a stale one, or a symbolic link planted there, is unlinked first and never written
    through, with permissions `mode`. `durable=False` skips the fsyncs (atomic against a
    process crash only).
    """
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else path.with_name(path.name + ".tmp")
    if tmp.parent != path.parent:
        raise ValueError(f"{tmp} must be in the directory of {path} for an atomic rename")
    unlink_if_present(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode)
    size = 0
    try:
        for part in parts:
            size += write_all(fd, part)
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        unlink_if_present(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)
    return size


def unlink_if_present(path: str | os.PathLike) -> bool:
    """Unlink `path` (a link itself, never its target); False if there was nothing."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
