"""Tiny random models of each supported family, built offline from configs (head_dim 64,
which vLLM's CPU attention accepts)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

COMMON = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, head_dim=64,
              max_position_embeddings=512, vocab_size=512, tie_word_embeddings=False)

CONFIGS = {
    "llama": lambda **kw: LlamaConfig(architectures=["LlamaForCausalLM"], **{**COMMON, **kw}),
    "qwen2": lambda **kw: Qwen2Config(architectures=["Qwen2ForCausalLM"], **{**COMMON, **kw}),
    "qwen3": lambda **kw: Qwen3Config(architectures=["Qwen3ForCausalLM"], **{**COMMON, **kw}),
    "mistral": lambda **kw: MistralConfig(architectures=["MistralForCausalLM"],
                                          **{**COMMON, **kw}),
    "phi3": lambda **kw: Phi3Config(architectures=["Phi3ForCausalLM"], pad_token_id=0,
                                    bos_token_id=1, eos_token_id=2, **{**COMMON, **kw}),
    "gemma2": lambda **kw: Gemma2Config(architectures=["Gemma2ForCausalLM"],
                                        **{**COMMON, "tie_word_embeddings": True, **kw}),
    "gemma3": lambda **kw: Gemma3TextConfig(architectures=["Gemma3ForCausalLM"],
                                            **{**COMMON, "tie_word_embeddings": True, **kw}),
}


def make_tiny_model(family: str, directory: Path, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    config = CONFIGS[family](**overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random biases/norms too, so a wrong slice cannot hide
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else torch.randn_like(p))
    model.save_pretrained(directory, safe_serialization=True)
    return directory
