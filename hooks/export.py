"""Publish a live model's parameters to other processes, without copying them.

The export directory holds, per tensor-parallel rank r:

* ``rank{r}.handles`` — a ``ForkingPickler`` pickle of ``{vllm_name: tensor}``. For CUDA
  tensors it carries CUDA IPC handles; for CPU tensors (moved to shared memory under the
  ``file_system`` sharing strategy) the shared-memory file names. Plain ``pickle`` would copy
  the bytes instead, and the reader's writes would never reach the owner.
* ``rank{r}.json`` — the manifest, written last and atomically (temp file + rename), so a
  reader that sees it also sees complete handles.

The reader side lives in ``weight_mapping.export_reader``; file names and format version are
in ``hooks.contract``, which both sides import. This module is also used by stand-in owners (tests,
bench/gpu_check.sh), so it depends on torch only.
"""

from __future__ import annotations

import atexit
import io
import json
import os
from collections.abc import Iterable
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import torch
import torch.multiprocessing  # registers the tensor reductions ForkingPickler uses
from torch import nn

from hooks.contract import (
    FORMAT_VERSION,
    SHM_ROOT,
    atomic_write,
    handles_path,
    manifest_path,
    process_start,
)


def share_cpu_tensors(params: Iterable[torch.Tensor]) -> list[str]:
    """Move CPU tensors' storages into shared memory, in place (the module keeps using them).

    Returns the shared-memory file paths. torch never unlinks them itself (measured: they
    outlive every process), so the manifest lists them for remove_export / the launcher.
    """
    torch.multiprocessing.set_sharing_strategy("file_system")
    files = []
    for p in params:
        if p.device.type != "cpu":
            continue
        if not p.is_shared():
            p.data.share_memory_()
        name = p.untyped_storage()._share_filename_cpu_()[1].decode()
        files.append(SHM_ROOT + name)
    return sorted(set(files))


def export_parameters(
    named_params: dict[str, torch.Tensor],
    export_dir: str | os.PathLike,
    *,
    model_path: str,
    rank: int = 0,
    world_size: int = 1,
    shards: dict[str, dict] | None = None,
    extra: dict | None = None,
) -> Path:
    """Write handles and manifest for `named_params`; returns the manifest's path.

    `shards`: for a tensor-parallel rank, which slice of the full tensor each sharded
    parameter holds (hooks/sharding.py); parameters not in it are replicated.
    CPU tensors are moved to shared memory first. The files are removed at interpreter exit.
    """
    export_dir = Path(export_dir)
    export_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # the reader refuses others'
    shm_files = share_cpu_tensors(named_params.values())

    buf = io.BytesIO()
    ForkingPickler(buf).dump({name: t.data for name, t in named_params.items()})
    hpath, mpath = handles_path(export_dir, rank), manifest_path(export_dir, rank)
    atomic_write(hpath, buf.getvalue())
    manifest = {
        "format": FORMAT_VERSION,
        "model_path": str(model_path),
        "rank": rank,
        "world_size": world_size,
        "pid": os.getpid(),
        "pid_start": process_start(os.getpid()),  # with pid: this process, not a reused PID
        "handles": hpath.name,
        "shm_files": shm_files,
        "params": [
            {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
             "device": str(t.device),
             **({"shard": shards[name]} if shards and name in shards else {})}
            for name, t in named_params.items()
        ],
        **(extra or {}),
    }
    atomic_write(mpath, json.dumps(manifest, indent=1).encode())
    atexit.register(remove_export, export_dir, rank)
    return mpath


def remove_export(export_dir: str | os.PathLike, rank: int) -> None:
    """Remove one rank's export and unlink its shared memory (mappings stay valid)."""
    mpath = manifest_path(export_dir, rank)
    try:
        shm_files = json.loads(mpath.read_text()).get("shm_files", [])
    except (OSError, ValueError):
        shm_files = []
    for path in [*map(Path, shm_files), mpath, handles_path(export_dir, rank)]:
        if path.parent == Path(SHM_ROOT) or path.parent == Path(export_dir):
            path.unlink(missing_ok=True)


def remove_all_exports(export_dir: str | os.PathLike) -> int:
    """Clean up every rank's export in `export_dir` (after the owner exited, even by kill -9)."""
    ranks = [int(p.stem.removeprefix("rank")) for p in Path(export_dir).glob("rank*.json")]
    for rank in ranks:
        remove_export(export_dir, rank)
    return len(ranks)


def export_module(model: nn.Module, export_dir: str | os.PathLike, *, model_path: str,
                  rank: int = 0, world_size: int = 1,
                  shards: dict[str, dict] | None = None) -> Path:
    """Export every parameter of `model` (tied parameters once, under their first name)."""
    return export_parameters(dict(model.named_parameters()), export_dir, model_path=model_path,
                             rank=rank, world_size=world_size, shards=shards)
