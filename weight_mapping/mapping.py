"""Build a transformers model whose parameters are views into vLLM's live tensors."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from weight_mapping.families import Family, family_for, text_model_part


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
    for hf_prefix, vllm_prefix in family.renames:
        if name.startswith(hf_prefix):
            name = vllm_prefix + name[len(hf_prefix):]
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
    return tensor if src.start is None else tensor[src.start:src.stop]


def build_model(tensors: dict[str, torch.Tensor], config: PretrainedConfig) -> nn.Module:
    """A transformers model of `config` whose every parameter aliases one of `tensors`. For a
    multimodal wrapper, the text model alone (from its text_config, on the tensors under the
    wrapper's prefix): vision weights are not part of it and so are never trained."""
    prefix, config = text_model_part(config)
    if prefix:
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    family = family_for(config)
    config = config.__class__.from_dict(config.to_dict())
    dtype = next(iter(tensors.values())).dtype
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    exported = {name: t.shape for name, t in tensors.items()}
    device = next(iter(tensors.values())).device

    made: dict[Source, nn.Parameter] = {}
    unmapped: list[str] = []
    for full_name, param in list(model.named_parameters(remove_duplicate=False)):
        src = locate(full_name, param.shape, config, family, exported)
        if src is None:
            unmapped.append(full_name)
            continue
        view = _view(tensors[src.name], src)
        if view.shape != param.shape:
            raise UnmappedParameterError(
                f"{full_name}: shape {tuple(param.shape)} but vLLM's {src.name} gives "
                f"{tuple(view.shape)} (rows {src.start}:{src.stop})")
        if src not in made:
            made[src] = nn.Parameter(view, requires_grad=True)
        module_name, _, leaf = full_name.rpartition(".")
        model.get_submodule(module_name)._parameters[leaf] = made[src]
    if unmapped:
        raise UnmappedParameterError(
            f"{len(unmapped)} parameter(s) of {type(model).__name__} have no counterpart in "
            f"vLLM's export: {', '.join(unmapped[:10])}{' ...' if len(unmapped) > 10 else ''}")
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
