"""Where each tensor's bytes sit in a model directory's safetensors files (header parsing).

The model directory may come from anyone, so nothing in it is trusted: the index may only name
plain ``*.safetensors`` files inside the directory, every header entry must be well-formed and
point into its file's data region, and only regular files are opened (a FIFO would block).
"""

from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
INDEX = "model.safetensors.index.json"
MAX_HEADER = 100 * 2**20


class LayoutError(ValueError):
    """A model directory whose safetensors files are missing, truncated, inconsistent or unsafe."""


@dataclass(frozen=True)
class TensorSlot:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the tensor's data in `file`
    nbytes: int


def is_plain_name(name: object) -> bool:
    """A file name directly inside the model directory: no separator, no `..`, not absolute."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name
            and "\0" not in name and os.path.basename(name) == name)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the absolute offset where data starts."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise LayoutError(f"{path.name}: missing") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LayoutError(f"{path.name}: not a regular file")
    with os.fdopen(fd, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise LayoutError(f"{path.name}: shorter than a safetensors header")
        (size,) = struct.unpack("<Q", raw)
        if size > MAX_HEADER:
            raise LayoutError(f"{path.name}: implausible header size {size}")
        text = f.read(size)
        if len(text) != size:
            raise LayoutError(f"{path.name}: header is truncated")
        try:
            header = json.loads(text)
        except ValueError as exc:
            raise LayoutError(f"{path.name}: header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise LayoutError(f"{path.name}: header is not a JSON object")
    return header, 8 + size


def model_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory, from its index when sharded."""
    index = model_dir / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
        except (ValueError, AttributeError) as exc:
            raise LayoutError(f"{INDEX}: not a JSON object with a weight_map ({exc})") from None
        if not isinstance(weight_map, dict):
            raise LayoutError(f"{INDEX}: weight_map is not a JSON object")
        unsafe = sorted({repr(f) for f in weight_map.values()
                         if not (is_plain_name(f) and f.endswith(".safetensors"))})
        if unsafe:
            raise LayoutError(f"{INDEX} names files that are not plain *.safetensors names in "
                              f"the model directory (refused): {', '.join(unsafe)}")
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise LayoutError(f"index names missing files: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise LayoutError(f"{model_dir}: no *.safetensors files")
    return files


def _slot(path: Path, name: str, info: object, data_start: int, size: int) -> TensorSlot:
    bad = LayoutError(f"{path.name}: {name} has a malformed header entry")
    if not isinstance(info, dict):
        raise bad
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)
            and isinstance(offsets, list) and len(offsets) == 2
            and all(_is_int(o) for o in offsets) and isinstance(dtype, str)):
        raise bad
    if dtype not in DTYPES:
        raise LayoutError(f"{path.name}: {name} has unsupported dtype {dtype}")
    begin, end = offsets
    numel = 1
    for d in shape:
        numel *= d
    if not 0 <= begin <= end or end - begin != numel * DTYPES[dtype].itemsize \
            or data_start + end > size:
        raise LayoutError(f"{path.name}: {name} has inconsistent offsets or the file "
                          "is truncated")
    return TensorSlot(name, path, DTYPES[dtype], tuple(shape), data_start + begin, end - begin)


def read_layout(model_dir: str | os.PathLike) -> dict[str, TensorSlot]:
    """Every tensor of the model directory, checked against the file sizes."""
    model_dir = Path(model_dir)
    slots: dict[str, TensorSlot] = {}
    for path in model_files(model_dir):
        header, data_start = read_header(path)
        size = path.stat().st_size
        for name, info in header.items():
            if name != "__metadata__":
                slots[name] = _slot(path, name, info, data_start, size)
    return slots
