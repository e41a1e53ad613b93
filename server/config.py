"""Training-server settings, from the command line (python -m server --help)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass


@dataclass
class Settings:
    export_dir: str
    host: str = "127.0.0.1"
    port: int = 8001
    lr: float = 1e-4
    batch_size: int = 8
    steps_per_batch: int = 5
    max_tokens_per_example: int = 2048
    max_examples_per_request: int = 256
    max_queue: int = 4096
    train_embeddings: bool = False
    threads: int = 0
    attach_timeout: float = 600.0
    api_key: str | None = None
    checkpoint_every_steps: int = 0
    checkpoint_every_seconds: float = 0.0
    checkpoint_on_exit: bool = False
    journal: str = "auto"
    consistency: str = "step"
    prefix_cache_reset: str = "always"
    max_body_bytes: int = 4 << 20
    optimizer_mode: str = "standard"


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m server",
                                description="Training server attached to a live vLLM export.")
    p.add_argument("--export-dir", required=True, help="directory the vLLM hook exports into")
    p.add_argument("--host", default=os.environ.get("BIND_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("TRAIN_PORT", 8001)))
    p.add_argument("--lr", type=float, default=1e-4,
                   help="APOLLO-Mini learning rate (default 1e-4: learns a one-line lesson in "
                        "about 5 steps on the fp32 default model, DESIGN.md)")
    p.add_argument("--batch-size", type=int, default=8, help="max examples per optimizer step")
    p.add_argument("--steps-per-batch", type=int, default=5,
                   help="optimizer steps taken on each batch: a lesson is seen N times "
                        "(default 5: one POSTed correction is learned, DESIGN.md)")
    p.add_argument("--max-tokens-per-example", type=int, default=2048)
    p.add_argument("--max-examples-per-request", type=int, default=256)
    p.add_argument("--max-queue", type=int, default=4096)
    p.add_argument("--train-embeddings", action="store_true",
                   help="also train embeddings / LM head (AdamW: 2 extra copies of them)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--attach-timeout", type=float, default=600.0)
    p.add_argument("--api-key", default=os.environ.get("VLLM_APOLLO_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on endpoints that change the model "
                        "(env VLLM_APOLLO_API_KEY)")
    p.add_argument("--checkpoint-every-steps", type=int, default=0,
                   help="sync the live weights into the model files every N optimizer steps")
    p.add_argument("--checkpoint-every-seconds", type=float, default=0.0,
                   help="... or when T seconds passed since the last sync (checked per batch)")
    p.add_argument("--checkpoint-on-exit", action="store_true",
                   help="when the server stops (SIGTERM, the launcher's Ctrl-C), finish the "
                        "batch in progress and sync what vLLM's weights learned since the last "
                        "checkpoint into the model files first")
    p.add_argument("--journal", default="auto",
                   help="durable example journal: a path, 'auto' (MODEL_DIR/.apollo/"
                        "examples.jsonl) or 'off'")
    p.add_argument("--consistency", choices=["step", "none"], default="step",
                   help="step: no vLLM engine step sees a partly applied optimizer step (the "
                        "write excludes engine steps); none: no exclusion (unsafe; for tests)")
    p.add_argument("--prefix-cache-reset", default="always",
                   help="drop vLLM's prefix cache after updates: always, never, or SECONDS "
                        "(at most once per interval)")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20)
    p.add_argument("--optimizer-mode", choices=["standard", "layerwise"], default="standard",
                   help="standard: all gradients, then one step written atomically for vLLM; "
                        "layerwise: each parameter stepped during backward (lowest memory; an "
                        "engine step may see some layers updated and others not)")
    a = p.parse_args(argv)
    if a.prefix_cache_reset not in ("always", "never"):
        try:
            float(a.prefix_cache_reset)
        except ValueError:
            p.error("--prefix-cache-reset must be always, never or a number of seconds")
    return Settings(**vars(a))
