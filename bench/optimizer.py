"""Optimizer step time and state size on Llama-3-8B layer shapes, side by side.

    .venv/bin/python -m bench.optimizer [--layers N] [--dtype float32|bfloat16] [--device cpu|cuda]

Defaults: CPU, one layer, fp32; on CUDA: 8 layers, bf16. Compares torch AdamW (fused where
available, else foreach), the authors' apollo-torch APOLLO-Mini, ours Mini and ours rank 256.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from optimizer import Apollo, ApolloMini

HIDDEN, INTER, KV = 4096, 14336, 1024
LAYER = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN),
         (INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER)]


def make_params(layers: int, dtype, device) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    params = []
    for _ in range(layers):
        for shape in LAYER:
            p = (torch.randn(shape, generator=g, device=device, dtype=dtype) * 0.02)
            p.requires_grad_(True)
            p.grad = torch.randn(shape, generator=g, device=device, dtype=dtype) * 1e-3
            params.append(p)
    return params


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if torch.is_tensor(v) and v.dim() > 0)


def time_steps(opt: torch.optim.Optimizer, device, steps: int) -> float:
    opt.step()  # warm-up; creates state
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    device = torch.device(a.device)
    layers = a.layers or (8 if device.type == "cuda" else 1)
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    lr = 1e-5

    def adamw(ps):
        fused = device.type == "cuda"
        return torch.optim.AdamW(ps, lr=lr, fused=fused, foreach=None if fused else True)

    def reference_mini(ps):
        import apollo_torch

        return apollo_torch.APOLLOAdamW(
            [{"params": ps, "rank": 1, "proj": "random", "scale_type": "tensor",
              "scale": 128, "update_proj_gap": 200, "proj_type": "std"}], lr=lr)

    candidates = {
        "torch AdamW (" + ("fused" if device.type == "cuda" else "foreach") + ")": adamw,
        "apollo-torch APOLLO-Mini": reference_mini,
        "ours APOLLO-Mini": lambda ps: ApolloMini(ps, lr=lr),
        "ours APOLLO rank 256": lambda ps: Apollo(ps, lr=lr, rank=256),
    }
    n = sum(r * c for r, c in LAYER) * layers
    print(f"{layers} Llama-3-8B layer(s), {n / 1e9:.3f} B params, {dtype}, {device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}")
    rows = []
    for name, make in candidates.items():
        params = make_params(layers, dtype, device)
        opt = make(params)
        seconds = time_steps(opt, device, a.steps)
        rows.append((name, seconds, state_bytes(opt)))
        del opt, params
    base_t, base_s = rows[0][1], rows[0][2]
    ref_t = rows[1][1]
    print("| optimizer | step ms | vs AdamW time | vs apollo-torch time | state MiB "
          "| vs AdamW state |")
    print("|---|---|---|---|---|---|")
    for name, t, s in rows:
        print(f"| {name} | {1e3 * t:.1f} | {t / base_t:.2f}x | {t / ref_t:.2f}x "
              f"| {s / 2**20:.1f} | {s / base_s:.4f}x |")


if __name__ == "__main__":
    main()
