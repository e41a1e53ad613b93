"""Build a transformers model whose parameters are views into vLLM's live tensors."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from weight_mapping.families import HEAD_LOCAL, Family, family_for, text_model_part
from weight_mapping.sharded import (
    ShardSpec,
    as_dtensor,
    full_shape,
    local_part,
    parallelize,
    reduce_grad_across,
)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create modules' parameters on the meta device (no memory), buffers for real (rotary
    frequencies must exist). Like accelerate's init_empty_weights, without the dependency."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class UnmappedParameterError(ValueError):
    """Raised when HF parameters have no counterpart in the export."""


@dataclass(frozen=True)
class Source:
    """Where one HF parameter lives: rows [start, stop) of dim 0 of vLLM parameter `name`."""

    name: str
    start: int | None = None
    stop: int | None = None


def locate(hf_name: str, shape: torch.Size, config: PretrainedConfig, family: Family,
           exported: dict[str, torch.Size]) -> Source | None:
    """Find the exported tensor (and row range) that holds HF parameter `hf_name`."""
    name = hf_name
    if name in exported:
        if exported[name][0] != shape[0]:  # vLLM pads vocabularies to a multiple of 64
            return Source(name, 0, shape[0])
        return Source(name)
    for fusion in family.fusions:
        for i, part in enumerate(fusion.parts):
            token = f".{part}."
            if token in name:
                rows = fusion.rows(config)
                start = sum(rows[:i])
                return Source(name.replace(token, f".{fusion.fused}."), start, start + rows[i])
    if name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
        return locate("model.embed_tokens.weight", shape, config, family, exported)
    return None


def _view(tensor: torch.Tensor, src: Source) -> torch.Tensor:
    """The rows of `src` in `tensor`, on its memory but with their own autograd version
    counter: a slice would share the fused tensor's, and layer-wise mode's in-place write of
    `up` during backward would then fail the backward still pending for `gate`."""
    if src.start is None:
        return tensor
    rows = tensor[src.start:src.stop]
    return torch.empty(0, dtype=rows.dtype, device=rows.device).set_(
        rows.untyped_storage(), rows.storage_offset(), rows.shape, rows.stride())


def build_model(tensors: dict[str, torch.Tensor], config: PretrainedConfig, *,
                shards: dict[str, ShardSpec] | None = None,
                mesh: DeviceMesh | None = None) -> nn.Module:
    """A transformers model of `config` whose every parameter aliases one of `tensors`. For a
    multimodal wrapper, the text model alone (from its text_config, on the tensors under the
    wrapper's prefix): vision weights are not part of it and so are never trained.

    Tensor parallelism (`shards`, from one rank's manifest, and a 1-D `mesh`): parameters of
    sharded vLLM tensors become DTensors whose local shards are views of `tensors`
    (weight_mapping/sharded.py); replicated ones stay plain tensors."""
    prefix, config = text_model_part(config)
    shards = shards or {}
    if prefix:
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        shards = {k[len(prefix):]: v for k, v in shards.items() if k.startswith(prefix)}
    family = family_for(config)
    config = config.__class__.from_dict(config.to_dict())
    dtype = next(iter(tensors.values())).dtype
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    exported = {name: full_shape(t.shape, shards.get(name)) for name, t in tensors.items()}
    device = next(iter(tensors.values())).device

    views: dict[str, tuple[Source, torch.Tensor, Placement | None]] = {}
    unmapped: list[str] = []
    for full_name, param in model.named_parameters(remove_duplicate=False):
        src = locate(full_name, param.shape, config, family, exported)
        if src is None:
            unmapped.append(full_name)
            continue
        spec = shards.get(src.name)
        if spec is None:
            view, placement = _view(tensors[src.name], src), None
        else:
            rows = None if src.start is None else (src.start, src.stop)
            view = local_part(tensors[src.name], rows, spec, param.shape, mesh.get_local_rank(),
                              mesh.size(), full_name)
            placement = Shard(spec.dim)
        expected = list(param.shape)
        if spec is not None:  # local_part checked the sharded dim against DTensor's chunk
            expected[spec.dim] = view.shape[spec.dim]
        if list(view.shape) != expected:
            raise UnmappedParameterError(
                f"{full_name}: shape {tuple(param.shape)} but vLLM's {src.name} gives "
                f"{tuple(view.shape)} (rows {src.start}:{src.stop})")
        views[full_name] = (src, view, placement)
    if unmapped:
        raise UnmappedParameterError(
            f"{len(unmapped)} parameter(s) of {type(model).__name__} have no counterpart in "
            f"vLLM's export: {', '.join(unmapped[:10])}{' ...' if len(unmapped) > 10 else ''}")

    if mesh is not None:
        parallelize(model, {n: p for n, (_, _, p) in views.items()}, mesh)
    made: dict[Source, nn.Parameter] = {}
    head_local = []
    for full_name, (src, view, placement) in views.items():
        module_name, _, leaf = full_name.rpartition(".")
        module = model.get_submodule(module_name)
        if src not in made:
            current = module._parameters[leaf]
            if placement is not None:
                made[src] = as_dtensor(view, placement, current.shape, mesh)
            elif isinstance(current, DTensor):  # e.g. a row-parallel linear's bias
                made[src] = as_dtensor(view, Replicate(), current.shape, mesh)
            else:
                made[src] = nn.Parameter(view, requires_grad=True)
                if mesh is not None and any(h in full_name for h in HEAD_LOCAL):
                    head_local.append(made[src])
        module._parameters[leaf] = made[src]
    if head_local:
        reduce_grad_across(head_local, mesh)
    for module in model.modules():
        for key, buf in module._buffers.items():
            if buf is not None and buf.device != device:
                module._buffers[key] = buf.to(device)
    model.train(False)  # no dropout; gradients still flow
    return model


def load_config(model_path: str) -> PretrainedConfig:
    return AutoConfig.from_pretrained(model_path)


def shares_storage(param: torch.Tensor, tensors: dict[str, torch.Tensor]) -> bool:
    """True if `param`'s memory lies inside one of `tensors`' storages (proof of no copy)."""
    ptr = param.data_ptr()
    for t in tensors.values():
        base = t.untyped_storage().data_ptr()
        if base <= ptr < base + t.untyped_storage().nbytes():
            return True
    return False
