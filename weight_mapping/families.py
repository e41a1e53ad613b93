"""How each model family's Hugging Face parameters sit inside vLLM's (fused) parameters.

Adding a family is one entry in FAMILIES: which fused vLLM parameters it has and how to split
them. A fused parameter stacks its parts along dim 0 (rows of a weight, entries of a bias).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PretrainedConfig


@dataclass(frozen=True)
class Fusion:
    """vLLM's `fused` module stacks HF modules `parts`; `rows(config)` gives each part's rows."""

    fused: str
    parts: tuple[str, ...]
    rows: Callable[[PretrainedConfig], tuple[int, ...]]


@dataclass(frozen=True)
class Family:
    fusions: tuple[Fusion, ...] = ()
    # HF name prefixes vLLM drops or renames (e.g. multimodal wrappers), as (hf, vllm) pairs.
    renames: tuple[tuple[str, str], ...] = field(default_factory=tuple)


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def qkv_rows(config: PretrainedConfig) -> tuple[int, int, int]:
    d = head_dim(config)
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_attention_heads * d, kv * d, kv * d


def gate_up_rows(config: PretrainedConfig) -> tuple[int, int]:
    return config.intermediate_size, config.intermediate_size


QKV = Fusion("qkv_proj", ("q_proj", "k_proj", "v_proj"), qkv_rows)
GATE_UP = Fusion("gate_up_proj", ("gate_proj", "up_proj"), gate_up_rows)
LLAMA_LIKE = Family(fusions=(QKV, GATE_UP))

ALREADY_FUSED = Family()  # Phi-3 stores qkv_proj / gate_up_proj fused in HF form too

FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": LLAMA_LIKE,
    "MistralForCausalLM": LLAMA_LIKE,
    "Qwen2ForCausalLM": LLAMA_LIKE,
    "Qwen3ForCausalLM": LLAMA_LIKE,
    "Gemma2ForCausalLM": LLAMA_LIKE,
    "Gemma3ForCausalLM": LLAMA_LIKE,
    "Phi3ForCausalLM": ALREADY_FUSED,
}


def family_for(config: PretrainedConfig) -> Family:
    archs = getattr(config, "architectures", None) or []
    for arch in archs:
        if arch in FAMILIES:
            return FAMILIES[arch]
    raise NotImplementedError(
        f"architecture {archs or config.model_type!r} is not supported; supported: "
        f"{', '.join(sorted(FAMILIES))} (add one in weight_mapping/families.py)")


def fuse_state_dict(state_dict: dict, config: PretrainedConfig) -> dict:
    """The inverse mapping: HF tensors stacked into vLLM's fused layout (for stand-in owners
    in tests and bench/gpu_check.sh, where no vLLM runs)."""
    family = family_for(config)
    out: dict = {}
    pending: dict[str, list] = {}
    for name, tensor in state_dict.items():
        if name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue
        for fusion in family.fusions:
            part = next((p for p in fusion.parts if f".{p}." in name), None)
            if part is not None:
                fused = name.replace(f".{part}.", f".{fusion.fused}.")
                slots = pending.setdefault(fused, [None] * len(fusion.parts))
                slots[fusion.parts.index(part)] = tensor
                break
        else:
            out[name] = tensor
    for fused, parts in pending.items():
        if any(p is None for p in parts):
            raise ValueError(f"{fused}: missing parts of the fused tensor")
        out[fused] = torch.cat(parts, dim=0)
    return out
