"""Tiny random models of each supported family, built offline from configs (head_dim 64,
which vLLM's CPU attention accepts)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    Gemma2Config,
    Gemma3Config,
    Gemma3TextConfig,
    LlamaConfig,
    LlavaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
    SiglipVisionConfig,
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


VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
              image_size=28, patch_size=14)

# Multimodal wrappers: the text model under `language_model`, a tiny vision tower beside it.
WRAPPED = {
    "llava": lambda: LlavaConfig(
        architectures=["LlavaForConditionalGeneration"], image_token_index=511,
        text_config=CONFIGS["llama"]().to_dict(), vision_config=CLIPVisionConfig(**VISION)),
    "gemma3-mm": lambda: Gemma3Config(
        architectures=["Gemma3ForConditionalGeneration"], image_token_index=511,
        boi_token_index=509, eoi_token_index=510, mm_tokens_per_image=4,
        text_config=CONFIGS["gemma3"]().to_dict(), vision_config=SiglipVisionConfig(**VISION)),
}


def make_tiny_model(family: str, directory: Path, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    if family in WRAPPED:
        config = WRAPPED[family]()
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    else:
        config = CONFIGS[family](**overrides)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random biases/norms too, so a wrong slice cannot hide
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else torch.randn_like(p))
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def make_tiny_chat_model(directory: Path, tokenizer_dir: Path, **overrides) -> Path:
    """A tiny Llama with the default model's vocabulary and tokenizer: the training server
    and vLLM's chat API run on it as on a real chat model, in seconds."""
    model_dir = make_tiny_model("llama", directory, vocab_size=49152, tie_word_embeddings=True,
                                **overrides)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, model_dir / f.name)
    return model_dir
