"""Tensor parallelism: one trainer rank per vLLM rank, its parameters DTensors over vLLM's shards.

vLLM's rank r holds, per sharded parameter, some ranges of the full tensor along one dim (the
manifest's "shard", hooks/sharding.py). A Hugging Face parameter is one part of such a tensor
(q_proj of the fused qkv_proj, say); rank r's share of it must be exactly DTensor's
``Shard(dim)`` chunk r, and then the DTensor's local tensor is a view of vLLM's memory: no rank
ever holds a full copy. The modules get torch's own tensor-parallel styles
(``ColwiseParallel`` for column-sharded linears, ``RowwiseParallel`` for row-sharded ones and
vocab-parallel embeddings, the LM head's logits gathered), so forward and backward run the
collectives Megatron-style TP needs, and nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module


@dataclass(frozen=True)
class ShardSpec:
    """Along `dim`, the local tensor holds these ranges of the full tensor, in this order
    (rows past them are padding); the full tensor has `full` entries along `dim`."""

    dim: int
    pieces: tuple[tuple[int, int], ...]
    full: int

    @classmethod
    def from_manifest(cls, entry: dict) -> ShardSpec:
        return cls(entry["dim"], tuple(tuple(p) for p in entry["pieces"]), entry["full"])


class ShardingError(NotImplementedError):
    """vLLM's shard of a parameter is not one DTensor can describe."""


def full_shape(local: torch.Size, spec: ShardSpec | None) -> torch.Size:
    if spec is None:
        return local
    shape = list(local)
    shape[spec.dim] = spec.full
    return torch.Size(shape)


def local_part(tensor: torch.Tensor, rows: tuple[int, int] | None, spec: ShardSpec,
               hf_shape: torch.Size, rank: int, world: int, name: str) -> torch.Tensor:
    """The view of vLLM's local `tensor` that is this rank's DTensor shard of HF parameter
    `name` (rows `rows` of the full fused tensor, or all of it)."""
    d = spec.dim
    if rows is not None and d != 0:  # a fused part sharded along its columns
        tensor, rows = tensor[rows[0]:rows[1]], None
    lo, hi = rows if rows is not None else (0, hf_shape[d])
    found, offset = [], 0
    for a, b in spec.pieces:
        start, stop = max(a, lo), min(b, hi)
        if start < stop:
            found.append((offset + start - a, offset + stop - a, start - lo, stop - lo))
        offset += b - a
    n = hi - lo
    size, offset = Shard.local_shard_size_and_offset(n, world, rank)  # DTensor's own rule
    want = (offset, offset + size)
    if len(found) != 1 or found[0][2:] != want:
        raise ShardingError(
            f"{name}: vLLM's rank {rank} holds {[f[2:] for f in found]} of its {n} entries "
            f"along dim {d}, not DTensor's shard {want} (e.g. KV heads replicated because "
            f"tensor_parallel_size exceeds num_key_value_heads, or an unpadded vocabulary)")
    start, stop = found[0][:2]
    return tensor.narrow(d, start, stop - start)


def as_dtensor(view: torch.Tensor, placement: Placement, shape: torch.Size,
               mesh: DeviceMesh) -> nn.Parameter:
    stride = torch.empty(shape, device="meta").stride()
    dt = DTensor.from_local(view, mesh, [placement], run_check=False, shape=shape,
                            stride=stride)
    return nn.Parameter(dt, requires_grad=True)


def parallelize(model: nn.Module, placements: dict[str, Placement], mesh: DeviceMesh) -> None:
    """Give each module with sharded parameters torch's TP style for its placement. Must run
    before the parameters are replaced by DTensors over vLLM's memory (it re-partitions)."""
    head = model.get_output_embeddings()
    columns: dict[str, int] = {}  # parent module -> its column-parallel linears
    for name, module in model.named_modules():
        p = placements.get(f"{name}.weight")
        if not isinstance(p, Shard):
            continue
        if module is head:
            style = ColwiseParallel(output_layouts=Replicate())  # full logits on every rank
        elif isinstance(module, nn.Embedding):
            style = RowwiseParallel(input_layouts=Replicate())  # vocab-parallel lookup
        elif p.dim == 0:
            style = ColwiseParallel()
            parent = name.rpartition(".")[0]
            columns[parent] = columns.get(parent, 0) + 1
        else:
            style = RowwiseParallel()
        style.src_data_rank = None  # meta parameters: nothing to scatter
        parallelize_module(module, mesh, style)
    for parent, count in columns.items():
        if count > 1:  # q/k/v, gate/up: one input
            model.get_submodule(parent).register_forward_pre_hook(
                _replicated_input(mesh), with_kwargs=True)


def _replicated_input(mesh: DeviceMesh):
    """Make a module's input one replicated DTensor before its column-parallel linears read
    it: their input gradients then add up as one partial sum and take one all-reduce in
    backward (Megatron's "f"), instead of one per linear."""

    def convert(x):
        if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) and x.is_floating_point():
            return DTensor.from_local(x, mesh, [Replicate()], run_check=False)
        return x

    def hook(module, args, kwargs):
        if args:
            args = (convert(args[0]), *args[1:])
        if "hidden_states" in kwargs:  # transformers passes the attention's input by name
            kwargs["hidden_states"] = convert(kwargs["hidden_states"])
        return args, kwargs

    return hook


def reduce_grad_across(params: list[nn.Parameter], mesh: DeviceMesh) -> None:
    """Replicated parameters applied to this rank's heads only (q_norm, k_norm) get a partial
    gradient per rank: sum it, as the unsharded model's gradient sums over all heads."""
    group = mesh.get_group()

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=group)
        return grad

    for p in params:
        p.register_hook(hook)
