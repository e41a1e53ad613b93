"""How each model family's Hugging Face parameters sit inside vLLM's (fused) parameters.

Adding a family is one entry in FAMILIES: which fused vLLM parameters it has and how to split
them. A fused parameter stacks its parts along dim 0 (rows of a weight, entries of a bias).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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

# Replicated parameters that act on each attention head separately: under tensor parallelism a
# rank applies them to its own heads only (weight_mapping/sharded.py sums their gradients).
HEAD_LOCAL = (".q_norm.", ".k_norm.")


# Multimodal checkpoints whose text model vLLM serves under a prefix. The trainer trains that
# text model alone; the vision tower and projector are never mapped, so never changed.
WRAPPERS: dict[str, str] = {
    "LlavaForConditionalGeneration": "language_model.",
    "Mistral3ForConditionalGeneration": "language_model.",
    "Gemma3ForConditionalGeneration": "language_model.",
}
# A wrapper's text_config names its family by model_type.
TEXT_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM",
}


def family_for(config: PretrainedConfig) -> Family:
    archs = getattr(config, "architectures", None) or []
    for arch in archs:
        if arch in FAMILIES:
            return FAMILIES[arch]
    raise NotImplementedError(
        f"architecture {archs or config.model_type!r} is not supported; supported: "
        f"{', '.join(sorted(FAMILIES))}, and their multimodal wrappers "
        f"{', '.join(sorted(WRAPPERS))} (add one in weight_mapping/families.py)")


def text_model_part(config: PretrainedConfig) -> tuple[str, PretrainedConfig]:
    """(prefix of the text model in vLLM's names, its config): ("", config) for a text model,
    ("language_model.", text_config) for a multimodal wrapper."""
    archs = getattr(config, "architectures", None) or []
    prefix = next((WRAPPERS[a] for a in archs if a in WRAPPERS), None)
    if prefix is None:
        return "", config
    text = config.get_text_config()
    text = text.__class__.from_dict(text.to_dict())
    if text.model_type not in TEXT_ARCHITECTURES:
        raise NotImplementedError(f"{archs[0]} with a {text.model_type!r} text model is not "
                                  f"supported; text models: {', '.join(TEXT_ARCHITECTURES)}")
    text.architectures = [TEXT_ARCHITECTURES[text.model_type]]
    return prefix, text


def hf_text_name(name: str) -> str | None:
    """A multimodal checkpoint's name for a text-model tensor, as the text model's own; None
    for vision tower / projector tensors. Both forms occur in checkpoints:
    `language_model.model.X` (the hub's, and what transformers 5 saves) and
    `model.language_model.X` (transformers' in-memory naming)."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("language_model."):
        return name[len("language_model."):]
    if name == "lm_head.weight":
        return name
    return None


def checkpoint_file_names(names: list[str], file_names: set[str]) -> dict[str, str]:
    """For text-model parameter names, the names a multimodal checkpoint file uses for them
    (where they differ and the file has them)."""
    out = {}
    for name in names:
        if name in file_names:
            continue
        for candidate in ("language_model." + name,
                          name.replace("model.", "model.language_model.", 1)):
            if candidate in file_names:
                out[name] = candidate
                break
    return out


def fuse_state_dict(state_dict: dict, config: PretrainedConfig) -> dict:
    """The inverse mapping: HF tensors stacked into vLLM's fused layout (for stand-in owners
    in tests and bench/gpu_check.sh, where no vLLM runs). A multimodal wrapper's text model
    goes under its prefix; its other tensors keep their names, less a leading `model.`."""
    prefix, text_config = text_model_part(config)
    if prefix:
        names = {k: hf_text_name(k) for k in state_dict}
        text = {names[k]: v for k, v in state_dict.items() if names[k]}
        rest = {k.removeprefix("model."): v for k, v in state_dict.items() if not names[k]}
        fused = fuse_state_dict(text, text_config)
        return {**rest, **{prefix + k: v for k, v in fused.items()}}
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
