"""The export contract between vLLM's side (hooks/) and the trainer (weight_mapping/): file
names in the export directory, the format version, and the durable way each file is written.
Both sides import it, so the contract is written once.

Per tensor-parallel rank r: ``rank{r}.handles`` (tensor handles), ``rank{r}.json`` (the
manifest, written last), ``rank{r}.turnstile`` / ``rank{r}.lock`` (the step lock),
``rank{r}.load`` (the serving load record, hooks/load.py); shared by
all ranks: ``{name}.counter`` (8-byte counters; ``weights.counter`` is the live weight version,
packed as below). docs/architecture.md describes each.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

FORMAT_VERSION = 1
SHM_ROOT = "/dev/shm"
# The live weight version, an 8-byte counter ("weights.counter") the trainer writes and vLLM's
# response header reads (hooks/version_header.py): the low 40 bits count every change of the
# live weights, the high 24 bits hold 1 + the checkpoint version they equal (0: none).
WEIGHT_VERSION = "weights"
_VERSION_BITS = 40


def pack_weight_version(version: int, checkpoint: int | None) -> int:
    return (version & ((1 << _VERSION_BITS) - 1)) | \
        ((0 if checkpoint is None else checkpoint + 1) << _VERSION_BITS)


def unpack_weight_version(raw: int) -> tuple[int, int | None]:
    """(live weight version, the checkpoint they equal or None)."""
    named = raw >> _VERSION_BITS
    return raw & ((1 << _VERSION_BITS) - 1), (named - 1 if named else None)


def manifest_path(export_dir: str | os.PathLike, rank: int) -> Path:
    return Path(export_dir) / f"rank{rank}.json"


def handles_path(export_dir: str | os.PathLike, rank: int) -> Path:
    return Path(export_dir) / f"rank{rank}.handles"


def lock_paths(export_dir: str | os.PathLike, rank: int) -> tuple[Path, Path]:
    d = Path(export_dir)
    return d / f"rank{rank}.turnstile", d / f"rank{rank}.lock"


def load_path(export_dir: str | os.PathLike, rank: int) -> Path:
    """The serving load record rank r's worker keeps (hooks/load.py)."""
    return Path(export_dir) / f"rank{rank}.load"


def trainer_lock_path(export_dir: str | os.PathLike) -> Path:
    """Held (flock) by the one training server attached to this export."""
    return Path(export_dir) / "trainer.lock"


def counter_path(export_dir: str | os.PathLike, name: str = "updates") -> Path:
    return Path(export_dir) / f"{name}.counter"


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat field 22); None if
    there is no such process (or only its zombie). A PID and its start time name one process,
    even after the PID is reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == b"Z" else int(fields[19])


def atomic_write(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all: an unpredictable temp file beside it, fsynced, then
    renamed over it (a reader sees the old file or the new one, never a part)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
