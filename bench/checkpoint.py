"""Checkpoint cost: our diff-based sync vs transformers' save_pretrained, side by side.

    .venv/bin/python -m bench.checkpoint [MODEL_DIR]   (default: the default model)

Touches 10% of the tensors, then the tensors training with the server's defaults changes
(the feed-forward matrices), then every tensor but the embeddings (`--train-matrices all`
without the guard, which freezes norms), then 100% (as training would: every element
moves), syncs, and times
save_pretrained of the same model; with the history store off (the redo journal for a few
chunks, a mostly-changed file written whole and renamed) and on (the bytes a sync overwrites
kept as its undo record). Prints seconds, bytes and ratios.
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from checkpoint import Checkpointer, Retention
from checkpoint.history import Store
from server.default_model import build
from server.engine.wiring import make_optimizer
from server.settings import Settings


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def save_seconds(model, out: Path) -> tuple[float, float, int]:
    """save_pretrained's seconds without and with fsync of its files, and its bytes."""
    os.sync()  # our sync's writeback is not billed to it
    t0 = time.perf_counter()
    model.save_pretrained(out, safe_serialization=True)
    save_s = time.perf_counter() - t0
    for f in out.iterdir():  # durable, as our sync is
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    save_sync_s = time.perf_counter() - t0
    size = dir_bytes(out)
    shutil.rmtree(out)
    return save_s, save_sync_s, size


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else build()
    repeats = int(os.environ.get("BENCH_REPEATS", "3"))
    work = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    rows = []
    try:
        for history in (None, Retention()):
            model_dir = work / "model"
            shutil.rmtree(model_dir, ignore_errors=True)
            shutil.copytree(source, model_dir)
            os.sync()  # the copy's dirty pages must not be billed to the first sync's fsync
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            live = dict(model.named_parameters(remove_duplicate=False))
            ck = Checkpointer(model_dir, live, history=history)
            store = Store(model_dir)
            names = list(dict(model.named_parameters()))
            random.Random(0).shuffle(names)  # 10% of tensors, not the 10% that start the file
            embeddings = {n for n in names if "embed" in n or "lm_head" in n}
            make_optimizer(model, Settings(export_dir="unused"))  # freezes what they don't train
            default = [n for n in names if live[n].requires_grad]
            for label, touched in (("10%", names[: max(1, round(0.1 * len(names)))]),
                                   ("trained (defaults)", default),
                                   ("all but embeddings", [n for n in names
                                                           if n not in embeddings]),
                                   ("100%", names)):
                ours, saves = [], []
                for _ in range(repeats):  # medians: this machine is shared
                    with torch.no_grad():
                        for n in touched:
                            live[n].mul_(1.0001).add_(1e-6)
                    disk = store.disk_bytes() if store.exists() else 0
                    os.sync()  # nor save_pretrained's (deleted files') writeback to ours
                    r = ck.sync(touched)  # the optimizer's record of what it stepped
                    grew = (store.disk_bytes() if store.exists() else 0) - disk
                    ours.append((r, grew))
                    saves.append(save_seconds(model, work / "save"))
                r, grew = sorted(ours, key=lambda o: o[0].seconds)[len(ours) // 2]
                save_s = statistics.median(s[0] for s in saves)
                save_sync = statistics.median(s[1] for s in saves)
                changed = sum(live[n].numel() * live[n].element_size() for n in touched)
                rows.append((history is not None, label, len(touched), changed, r, grew,
                             save_s, save_sync, saves[0][2]))
            del ck, model, live
        print(f"model: {source}; median of {repeats} runs each")
        print("| history | touched | tensors | bytes changed | ours s | written (files + "
              "journal) | history store grew | save_pretrained s (no fsync) | save_pretrained "
              "+ fsync s | ours/save, both fsynced | written/save bytes |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for hist, label, n, changed, r, grew, save_s, save_sync, save_b in rows:
            written = r.bytes_written + r.journal_bytes
            print(f"| {'on' if hist else 'off'} | {label} | {n} | {changed / 2**20:.0f} MiB "
                  f"| {r.seconds:.2f} | {written / 2**20:.0f} MiB ({r.whole_files} file(s) "
                  f"whole) | {grew / 2**20:.0f} MiB | {save_s:.2f} | {save_sync:.2f} "
                  f"| {r.seconds / save_sync:.2f}x | {written / save_b:.2f}x |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
