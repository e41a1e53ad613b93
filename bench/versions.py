"""Versions on the default model: disk per checkpoint in the history store, and live rollbacks.

    .venv/bin/python -m bench.versions [MODEL_DIR]   (default: the default model)

Three checkpoints after "training" that changes every element of every trainable tensor (as
APOLLO does; embeddings frozen, the default), then more training and rollbacks to the last
checkpoint, to version 1 and to the original, through the training engine (in this process,
the weights in CPU memory as vLLM's CPU worker holds them). Prints the history store's disk
per checkpoint against the bytes it changed, and each rollback's serving stall (the time
inside the write window), bytes read and seconds.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from checkpoint import Checkpointer
from checkpoint.history import Store
from server.default_model import build
from server.engine.wiring import assemble, retention
from server.settings import Settings


def _train(engine, step: int) -> None:
    """What a batch of APOLLO steps does to the weights: every trainable element moves."""
    model = engine.model
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1 + 1e-4 * step).add_(1e-6)
    engine.trainer.stepped.update(id(p) for p in model.parameters() if p.requires_grad)
    engine.trainer.stats.optimizer_steps += 5


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else build()
    work = Path(tempfile.mkdtemp(prefix="bench-versions-"))
    try:
        model_dir = work / "model"
        shutil.copytree(source, model_dir)
        os.sync()
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        settings = Settings(export_dir="unused", journal="off", drift_probes=0, guard="none")
        ck = Checkpointer(model_dir, dict(model.named_parameters(remove_duplicate=False)),
                          history=retention(settings))
        engine = assemble(settings, model, AutoTokenizer.from_pretrained(model_dir),
                          model_path=str(model_dir), checkpointer=ck)
        engine.checkpoints._full_scan = False  # the weights equal the files here
        engine.start()
        store = Store(model_dir)
        print(f"model: {source} ({sum(p.numel() for p in model.parameters()) * 4 / 2**20:.0f}"
              " MiB fp32)\n")
        print("| checkpoint | bytes changed | history store grew by | seconds | files written "
              "whole |")
        print("|---|---|---|---|---|")
        for k in (1, 2, 3):
            _train(engine, k)
            before = store.disk_bytes() if store.exists() else 0
            r = engine.checkpoints.sync()
            print(f"| v{r['version']} | {r['bytes_changed'] / 2**20:.0f} MiB | "
                  f"{(store.disk_bytes() - before) / 2**20:.0f} MiB | {r['seconds']:.2f} | "
                  f"{r['whole_files']} |")
        print(f"\nhistory store in all: {store.disk_bytes() / 2**20:.0f} MiB\n")
        _train(engine, 4)  # trained since v3, not checkpointed
        print("| rollback to | chunks | bytes read | serving stall s | seconds |")
        print("|---|---|---|---|---|")
        for to in ("last-checkpoint", 1, "original"):
            t0 = time.perf_counter()
            r = engine.versions.rollback(to)
            print(f"| {to} (v{r['version']}) | {r['chunks']} | {r['bytes_read'] / 2**20:.0f} MiB"
                  f" | {r['stall_seconds']:.2f} | {time.perf_counter() - t0:.2f} |")
        engine.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
