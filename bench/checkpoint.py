"""Checkpoint cost: our diff-based sync vs transformers' save_pretrained, side by side.

    .venv/bin/python -m bench.checkpoint [MODEL_DIR]   (default: the default model)

Touches 10% and then 100% of the tensors (as training would: every element moves), syncs,
and times save_pretrained of the same model; prints seconds, bytes and ratios.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from checkpoint import Checkpointer
from server.default_model import build


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else build()
    work = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    try:
        model_dir = work / "model"
        shutil.copytree(source, model_dir)
        os.sync()  # the copy's dirty pages must not be billed to the first sync's fsync
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        live = dict(model.named_parameters(remove_duplicate=False))
        ck = Checkpointer(model_dir, live)
        names = list(dict(model.named_parameters()))
        random.Random(0).shuffle(names)  # 10% of tensors, not the 10% that start the file
        rows = []
        for fraction in (0.10, 1.00):
            touched = names[: max(1, round(fraction * len(names)))]
            with torch.no_grad():
                for n in touched:
                    live[n].mul_(1.0001).add_(1e-6)
            ours = ck.sync(touched)  # the optimizer's record of what it stepped
            with torch.no_grad():  # the same change once more, synced without fsync
                for n in touched:
                    live[n].mul_(1.0001).add_(1e-6)
            ck.durable = False
            ours_nosync = ck.sync(touched)
            ck.durable = True
            out = work / f"save{fraction}"
            t0 = time.perf_counter()
            model.save_pretrained(out, safe_serialization=True)
            save_s = time.perf_counter() - t0
            for f in out.iterdir():  # durable, as our sync is
                fd = os.open(f, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            save_sync_s = time.perf_counter() - t0
            save_b = dir_bytes(out)
            shutil.rmtree(out)
            rows.append((fraction, len(touched), ours, ours_nosync, save_s, save_sync_s, save_b))
        print(f"model: {source} ({len(names)} tensors)")
        print("| touched | tensors | ours s | ours s, no fsync | ours bytes (files + journal) "
              "| save_pretrained s (no fsync) | save_pretrained + fsync s "
              "| save_pretrained bytes | ours/save, both without fsync "
              "| ours/save, both fsynced | bytes ratio |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for fraction, n, ours, nosync, save_s, save_sync_s, save_b in rows:
            written = ours.bytes_written + ours.journal_bytes
            print(f"| {fraction:.0%} | {n} | {ours.seconds:.2f} | {nosync.seconds:.2f} "
                  f"| {written / 2**20:.0f} MiB | {save_s:.2f} | {save_sync_s:.2f} "
                  f"| {save_b / 2**20:.0f} MiB | {nosync.seconds / save_s:.2f}x "
                  f"| {ours.seconds / save_sync_s:.2f}x | {written / save_b:.2f}x |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
