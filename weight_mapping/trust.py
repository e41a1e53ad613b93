"""Reading an export without trusting more than its owner: whoever can write the export
directory decides what the trainer maps and writes (handles, `model_path`), so the directory
and its files must be the current user's own, writable by nobody else, and never links. The
handles pickle is read by an Unpickler that resolves only what a ForkingPickler of tensors
contains (torch's rebuild functions, tensor / storage / size / device types and dtypes):
a forged pickle cannot name os.system or any other callable, so loading it runs no code.

The names were listed from real handles files with pickletools (CPU, file_system strategy:
rebuild_tensor, rebuild_typed_storage, rebuild_storage_filename, UntypedStorage, Tensor,
Size, dtypes; CUDA: rebuild_cuda_tensor, TypedStorage, device).
"""

from __future__ import annotations

import errno
import os
import pickle
import stat
from pathlib import Path

import torch

_REBUILDS = {"rebuild_tensor", "rebuild_typed_storage", "rebuild_storage_filename",
             "rebuild_storage_empty", "rebuild_cuda_tensor", "rebuild_meta_tensor"}
_TYPES = {("torch", "Tensor"), ("torch", "Size"), ("torch", "device"),
          ("torch.storage", "UntypedStorage"), ("torch.storage", "TypedStorage"),
          ("torch.nn.parameter", "Parameter")}


class UntrustedExport(RuntimeError):
    """The export cannot be trusted; the message says why."""


def check_private(path: Path, st: os.stat_result, kind: str) -> None:
    """`path` (whose lstat/fstat is `st`) must be this user's and writable by nobody else."""
    if stat.S_ISLNK(st.st_mode):
        raise UntrustedExport(f"{path} is a symbolic link")
    if st.st_uid != os.geteuid():
        raise UntrustedExport(f"{path} belongs to uid {st.st_uid}, not to this user "
                              f"({os.geteuid()}): another user could control the trainer")
    if st.st_mode & 0o022:
        raise UntrustedExport(f"{path} is writable by its group or by others "
                              f"(mode {stat.S_IMODE(st.st_mode):o}): chmod go-w it")
    if kind == "dir" and not stat.S_ISDIR(st.st_mode) or kind == "file" and not \
            stat.S_ISREG(st.st_mode):
        raise UntrustedExport(f"{path} is not a {'directory' if kind == 'dir' else 'file'}")


def check_dir(export_dir: Path) -> None:
    check_private(export_dir, os.lstat(export_dir), "dir")


def read_private(path: Path) -> bytes:
    """The bytes of `path`, a private regular file of this user, opened without following a
    link."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UntrustedExport(f"{path} is a symbolic link") from None
        raise
    with os.fdopen(fd, "rb") as f:
        check_private(path, os.fstat(fd), "file")
        return f.read()


class HandlesUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "torch.multiprocessing.reductions" and name in _REBUILDS \
                or (module, name) in _TYPES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UntrustedExport(f"the handles pickle names {module}.{name}, which no export of "
                              "tensors contains: refused, nothing of it was run")


def load_handles(data: bytes) -> dict[str, torch.Tensor]:
    import io

    tensors = HandlesUnpickler(io.BytesIO(data)).load()
    if not isinstance(tensors, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
        raise UntrustedExport("the handles pickle is not a mapping of names to tensors")
    return tensors
