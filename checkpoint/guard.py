"""What the checkpointer may write, and the directory lock.

A model directory may come from anyone (a download, a Hugging Face cache snapshot), so a write
goes only to a regular file of the model itself: never through a symbolic link (a cache
snapshot's files are links to blobs that other snapshots share), never into a file with other
hard links, and never into a file that changed since its layout was read (the offsets would be
stale). Each refusal says why and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from checkpoint.layout import MAX_HEADER

LOCK = ".apollo-sync.lock"
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


class CheckpointRefused(RuntimeError):
    """The checkpointer will not write here; the message says why and what to do."""


def dir_writable(model_dir: Path) -> bool:
    return os.access(model_dir, os.W_OK | os.X_OK)


def _copy_hint(model_dir: Path) -> str:
    return (f"to checkpoint, serve a private copy of the model instead "
            f"(cp -rL {model_dir} NEW_DIR)")


def write_problem(path: Path) -> str | None:
    """Why the checkpointer may not write the weights file `path`; None if it may."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return f"{path.name} is missing"
    if stat.S_ISLNK(st.st_mode):
        return (f"{path.name} is a symbolic link (to {os.readlink(path)}); the checkpointer "
                "never writes through links, whose target other models may share (a Hugging "
                f"Face cache snapshot's files are links to shared blobs); "
                f"{_copy_hint(path.parent)}")
    if not stat.S_ISREG(st.st_mode):
        return f"{path.name} is not a regular file"
    if st.st_nlink > 1:
        return (f"{path.name} has {st.st_nlink} hard links; writing it would change the other "
                f"names too; {_copy_hint(path.parent)}")
    if not os.access(path, os.W_OK):
        return f"{path.name} is not writable"
    return None


def file_problems(model_dir: Path, files: Iterable[Path]) -> list[str]:
    """Why the checkpointer may not write into `model_dir`'s `files` (empty: it may)."""
    if not dir_writable(model_dir):
        return [f"{model_dir} is read-only"]
    return [p for p in (write_problem(f) for f in sorted(set(files))) if p]


def open_for_write(path: Path) -> int:
    """An O_RDWR fd of the weights file `path`, refused unless write_problem() finds none."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):
            raise CheckpointRefused(write_problem(path) or f"{path.name}: {exc}") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise CheckpointRefused(write_problem(path) or f"{path.name} changed while opened")
    return fd


@dataclass(frozen=True)
class FileIdentity:
    """What says a weights file is the one whose layout was read: same inode, size, mtime and
    header bytes. A copy over it, a rename over it or an edit changes at least one."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    header: bytes

    @classmethod
    def of(cls, fd: int) -> FileIdentity:
        st = os.fstat(fd)
        head = os.pread(fd, 8, 0)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        header = head + os.pread(fd, min(n, MAX_HEADER), 8) if n else head
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, header)

    def changes(self, now: FileIdentity) -> list[str]:
        """What differs in `now` (empty: the same file, as far as can be told)."""
        out = [what for what, a, b in (("inode", (self.dev, self.ino), (now.dev, now.ino)),
                                       ("size", self.size, now.size),
                                       ("mtime", self.mtime_ns, now.mtime_ns),
                                       ("header", self.header, now.header)) if a != b]
        return out


@contextlib.contextmanager
def dir_lock(model_dir: Path) -> Iterator[None]:
    """One syncing process per model directory (recovery takes it too).

    The lock file is opened without following a link and without needing write access to it.
    """
    path = model_dir / LOCK
    flags = os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CheckpointRefused(f"{path} is a symbolic link; a lock file must be a regular "
                                    "file of the model directory: remove it") from None
        if exc.errno in _READ_ONLY:
            raise CheckpointRefused(f"{model_dir} is read-only ({exc.strerror})") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointRefused(f"{path} is not a regular file: remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{model_dir} is being synced by another process") from None
        yield
    finally:
        os.close(fd)
