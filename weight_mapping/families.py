"""How each model family's Hugging Face parameters sit inside vLLM's (fused) parameters.

Adding a family is one entry in FAMILIES: which fused vLLM parameters it has and how to split
them. A fused parameter stacks its parts along dim 0 (rows of a weight, entries of a bias).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

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

FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": LLAMA_LIKE,
    "MistralForCausalLM": LLAMA_LIKE,
    "Qwen2ForCausalLM": LLAMA_LIKE,
    "Qwen3ForCausalLM": LLAMA_LIKE,
}


def family_for(config: PretrainedConfig) -> Family:
    archs = getattr(config, "architectures", None) or []
    for arch in archs:
        if arch in FAMILIES:
            return FAMILIES[arch]
    raise NotImplementedError(
        f"architecture {archs or config.model_type!r} is not supported; supported: "
        f"{', '.join(sorted(FAMILIES))} (add one in weight_mapping/families.py)")
