"""Where each tensor's bytes sit in a model directory's safetensors files (header parsing)."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


class LayoutError(ValueError):
    """A model directory whose safetensors files are missing, truncated or inconsistent."""


@dataclass(frozen=True)
class TensorSlot:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the tensor's data in `file`
    nbytes: int


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the absolute offset where data starts."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise LayoutError(f"{path.name}: shorter than a safetensors header")
        (size,) = struct.unpack("<Q", raw)
        if size > 100 * 2**20:
            raise LayoutError(f"{path.name}: implausible header size {size}")
        try:
            header = json.loads(f.read(size))
        except ValueError as exc:
            raise LayoutError(f"{path.name}: header is not JSON ({exc})") from None
    return header, 8 + size


def model_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory, from its index when sharded."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise LayoutError(f"index names missing files: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise LayoutError(f"{model_dir}: no *.safetensors files")
    return files


def read_layout(model_dir: str | os.PathLike) -> dict[str, TensorSlot]:
    """Every tensor of the model directory, checked against the file sizes."""
    model_dir = Path(model_dir)
    slots: dict[str, TensorSlot] = {}
    for path in model_files(model_dir):
        header, data_start = read_header(path)
        size = path.stat().st_size
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            if info["dtype"] not in DTYPES:
                raise LayoutError(f"{path.name}: {name} has unsupported dtype {info['dtype']}")
            dtype = DTYPES[info["dtype"]]
            numel = 1
            for d in info["shape"]:
                numel *= d
            if end - begin != numel * dtype.itemsize or data_start + end > size:
                raise LayoutError(f"{path.name}: {name} has inconsistent offsets or the file "
                                  "is truncated")
            slots[name] = TensorSlot(name, path, dtype, tuple(info["shape"]),
                                     data_start + begin, end - begin)
    return slots
