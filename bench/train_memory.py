"""Peak memory of one training step on the default model: standard vs layer-wise mode.

    .venv/bin/python -m bench.train_memory

Each mode runs in its own process; the table shows the peak RSS above the loaded model
(the weights, which vLLM owns in production, are excluded), with APOLLO-Mini as the server
configures it (embeddings frozen).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import psutil


def child(mode: str, batch: int, tokens: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from server.default_model import build
    from server.engine.wiring import make_optimizer
    from server.settings import Settings

    model = AutoModelForCausalLM.from_pretrained(build(), dtype=torch.float32)
    opt = make_optimizer(model, Settings(export_dir="unused"))
    ids = torch.randint(0, 49000, (batch, tokens), generator=torch.Generator().manual_seed(0))
    if mode == "layerwise":
        opt.layerwise()
    with torch.no_grad():  # page in the weights (safetensors may map them lazily)
        for p in model.parameters():
            p.add_(0)
    proc = psutil.Process()
    base = peak = proc.memory_info().rss
    done = threading.Event()

    def sample() -> None:  # ru_maxrss would include the model load's own peak
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
        if mode == "standard":
            opt.step()
            opt.zero_grad(set_to_none=True)
    done.set()
    sampler.join()
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                if torch.is_tensor(v))
    print(json.dumps({"mode": mode, "peak_above_model_mib": (peak - base) / 2**20,
                      "optimizer_state_mib": state / 2**20}))


def main() -> None:
    print("| batch x tokens | mode | peak RSS above the loaded model | optimizer state |")
    print("|---|---|---|---|")
    for batch, tokens in ((1, 32), (4, 64)):
        rows = {}
        for mode in ("standard", "layerwise"):
            out = subprocess.run(
                [sys.executable, "-m", "bench.train_memory", mode, str(batch), str(tokens)],
                capture_output=True, text=True, check=True).stdout
            r = rows[mode] = json.loads(out.strip().splitlines()[-1])
            print(f"| {batch} x {tokens} | {mode} | {r['peak_above_model_mib']:.0f} MiB | "
                  f"{r['optimizer_state_mib']:.2f} MiB |")
    print("\n(standard holds every matrix's gradient at once, 425 MiB here; layer-wise one at "
          "a time; activations grow with batch x tokens and dominate at 4 x 64)")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
