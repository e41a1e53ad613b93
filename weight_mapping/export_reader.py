"""Attach to the live tensors that hooks/ exported (the reader side of hooks/export.py).

The export directory is trusted only as far as it is this user's own (weight_mapping/trust.py):
its files are read without following links and the handles without running any code."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.multiprocessing  # noqa: F401  (registers the rebuild functions handles refer to)

from hooks.consistency import StepLock, UpdateCounter
from hooks.contract import (
    FORMAT_VERSION,
    handles_path,
    manifest_path,
    process_start,
    trainer_lock_path,
)
from hooks.load import LoadRecord
from weight_mapping.sharded import ShardSpec
from weight_mapping.trust import check_dir, load_handles, read_private


@dataclass
class Export:
    """One rank's exported parameters: vLLM names to tensors that alias vLLM's memory."""

    manifest: dict
    tensors: dict[str, torch.Tensor]

    @property
    def model_path(self) -> str:
        return self.manifest["model_path"]

    @property
    def rank(self) -> int:
        return int(self.manifest.get("rank", 0))

    @property
    def world_size(self) -> int:
        return int(self.manifest.get("world_size", 1))

    @property
    def shards(self) -> dict[str, ShardSpec]:
        """Tensor parallelism: which slice of the full tensor each sharded parameter holds."""
        return {p["name"]: ShardSpec.from_manifest(p["shard"])
                for p in self.manifest["params"] if "shard" in p}

    @property
    def owner_pid(self) -> int:
        return int(self.manifest["pid"])

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    @property
    def export_dir(self) -> Path:
        return Path(self.manifest["_dir"])

    @property
    def trainer_lock_path(self) -> Path:
        """The file the one training server attached to this export holds locked."""
        return trainer_lock_path(self.export_dir)

    def step_lock(self) -> StepLock:
        """The lock vLLM's worker holds per engine step; write weights under .write()."""
        return StepLock(self.export_dir, int(self.manifest["rank"]))

    def serving_load(self) -> LoadRecord:
        """The load record rank 0's worker updates every engine step (hooks/load.py)."""
        return LoadRecord(self.export_dir, 0)

    def update_counter(self, name: str = "updates") -> UpdateCounter:
        """"updates": bump it after applied updates and vLLM drops KV computed with old
        weights. Other names are the trainer's own counters, kept for the export's life."""
        return UpdateCounter(self.export_dir, name)

    def owner_alive(self) -> bool:
        """The process that exported is alive: same PID and same start time (a reused PID
        is another process); exports without a start time fall back to the PID alone."""
        start = self.manifest.get("pid_start")
        if start is not None:
            return process_start(self.owner_pid) == start
        try:
            os.kill(self.owner_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def wait_for_manifest(export_dir: str | os.PathLike, rank: int = 0, timeout: float = 600.0,
                      poll: float = 0.2) -> Path:
    path = manifest_path(export_dir, rank)
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no export manifest at {path} after {timeout:.0f} s")
        time.sleep(poll)
    return path


def attach(export_dir: str | os.PathLike, rank: int = 0, timeout: float = 0.0) -> Export:
    """Map rank `rank`'s exported tensors into this process (no copy)."""
    mpath = wait_for_manifest(export_dir, rank, timeout) if timeout else \
        manifest_path(export_dir, rank)
    if not mpath.exists():
        raise FileNotFoundError(f"no export manifest at {mpath}: is vLLM running with the hook?")
    check_dir(mpath.parent)
    manifest = json.loads(read_private(mpath))
    manifest["_dir"] = str(mpath.parent)
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"export format {manifest.get('format')} is not {FORMAT_VERSION}")
    torch.multiprocessing.set_sharing_strategy("file_system")
    # by the contract's name, never a path the manifest gives; no code runs while loading
    tensors = load_handles(read_private(handles_path(mpath.parent, rank)))
    missing = {p["name"] for p in manifest["params"]} - tensors.keys()
    if missing:
        raise ValueError(f"export handles lack parameters: {sorted(missing)[:5]}")
    return Export(manifest=manifest, tensors=tensors)
