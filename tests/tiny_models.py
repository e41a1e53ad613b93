"""Tiny random models of each supported family, built offline from configs (head_dim 64,
which vLLM's CPU attention accepts)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

COMMON = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, head_dim=64,
              max_position_embeddings=512, vocab_size=512, tie_word_embeddings=False)

CONFIGS = {
    "llama": lambda **kw: LlamaConfig(architectures=["LlamaForCausalLM"], **{**COMMON, **kw}),
    "qwen2": lambda **kw: Qwen2Config(architectures=["Qwen2ForCausalLM"], **{**COMMON, **kw}),
    "qwen3": lambda **kw: Qwen3Config(architectures=["Qwen3ForCausalLM"], **{**COMMON, **kw}),
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
