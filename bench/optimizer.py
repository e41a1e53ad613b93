"""Optimizer step time and state size on Llama-3-8B layer shapes, side by side.

    .venv/bin/python -m bench.optimizer [--layers N] [--dtype float32|bfloat16] [--device cpu|cuda]

Defaults: CPU, one layer, fp32; on CUDA: 8 layers, bf16. Compares torch AdamW (fused where
available, else foreach), the authors' apollo-torch APOLLO-Mini, ours Mini (eager, and on CUDA
captured in a CUDA graph) and ours rank 256. "write ms" is the in-place write alone (apply()),
the part serving waits for.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import statistics
import sys
import time
import types
from pathlib import Path

import torch

from optimizer import DEFAULT_TILES, Apollo, ApolloMini, ProjectionTiles, Tiles

HIDDEN, INTER, KV = 4096, 14336, 1024
LAYER = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN),
         (INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER)]


def reference_apollo():
    """apollo-torch's APOLLO optimizer class. Its package __init__ also imports the 8-bit
    variants, which need bitsandbytes (not on the GPU machine); load the APOLLO module alone."""
    try:
        import apollo_torch

        return apollo_torch.APOLLOAdamW
    except ImportError as exc:
        spec = importlib.util.find_spec("apollo_torch")
        if spec is None:
            raise ImportError("apollo-torch is not installed") from exc
        package = types.ModuleType("apollo_torch")
        package.__path__ = [str(Path(spec.origin).parent)]
        sys.modules["apollo_torch"] = package
        return importlib.import_module("apollo_torch.apollo").AdamW


def make_params(layers: int, dtype, device, shrink: int = 1) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    params = []
    for _ in range(layers):
        for rows, cols in LAYER:
            shape = (rows // shrink, cols // shrink)
            p = (torch.randn(shape, generator=g, device=device, dtype=dtype) * 0.02)
            p.requires_grad_(True)
            p.grad = torch.randn(shape, generator=g, device=device, dtype=dtype) * 1e-3
            params.append(p)
    return params


def parse_tiles(text: str) -> ProjectionTiles:
    """'rows=4x512x1x4,cols=32x64x8x4' (bm x bn x splits x warps; either part may be left
    out, keeping the default's) -> the optimizer's `tiles`."""
    tiles = DEFAULT_TILES
    for part in filter(None, text.split(",")):
        key, _, spec = part.partition("=")
        if key not in ("rows", "cols"):
            raise SystemExit(f"--tiles: unknown orientation {key!r} (rows or cols)")
        tiles = dataclasses.replace(tiles, **{key: Tiles(*(int(v) for v in spec.split("x")))})
    return tiles


def format_tiles(tiles: ProjectionTiles) -> str:
    return ",".join(f"{k}={t.spec()}" for k, t in (("rows", tiles.rows), ("cols", tiles.cols)))


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if torch.is_tensor(v) and v.dim() > 0)


def _timed(fn, device, steps: int) -> float:
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def graphed(opt: Apollo):
    """opt.step() captured in a CUDA graph after warm-up steps (state, Triton compiles)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    return graph.replay


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--shrink", type=int, default=1,
                    help="divide every dimension (CI's dry run of the GPU kit: 4)")
    ap.add_argument("--tiles", default="",
                    help="rank-1 projection launch shapes, as bench.tune_projection prints")
    a = ap.parse_args()
    tiles = parse_tiles(a.tiles)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    layers = a.layers or (8 if cuda else 1)
    dtype = getattr(torch, a.dtype or ("bfloat16" if cuda else "float32"))
    lr = 1e-5

    def adamw(ps):
        return torch.optim.AdamW(ps, lr=lr, fused=cuda, foreach=None if cuda else True)

    def reference_mini(ps):
        return reference_apollo()(
            [{"params": ps, "rank": 1, "proj": "random", "scale_type": "tensor",
              "scale": 128, "update_proj_gap": 200, "proj_type": "std"}], lr=lr)

    candidates = {
        "torch AdamW (" + ("fused" if cuda else "foreach") + ")": (adamw, False),
        "apollo-torch APOLLO-Mini": (reference_mini, False),
        "ours APOLLO-Mini": (lambda ps: ApolloMini(ps, lr=lr, tiles=tiles), False),
        "ours APOLLO rank 256": (lambda ps: Apollo(ps, lr=lr, rank=256), False),
    }
    if cuda:
        candidates["ours APOLLO-Mini, CUDA graph"] = (
            lambda ps: ApolloMini(ps, lr=lr, capturable=True, tiles=tiles), True)
    n = sum((r // a.shrink) * (c // a.shrink) for r, c in LAYER) * layers
    shapes = "" if a.shrink == 1 else f" with every dimension / {a.shrink}"
    print(f"{layers} Llama-3-8B layer(s){shapes}, {n / 1e9:.3f} B params, {dtype}, {device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if cuda else ''}")
    if a.tiles:
        print(f"rank-1 projection tiles: {format_tiles(tiles)}")
    rows = []
    for name, (make, graph) in candidates.items():
        params = make_params(layers, dtype, device, a.shrink)
        try:
            opt = make(params)
        except ImportError as exc:
            print(f"skipped {name}: {exc}")
            continue
        step = graphed(opt) if graph else opt.step
        step()  # warm-up; creates state
        seconds = _timed(step, device, a.steps)
        write = None
        if isinstance(opt, Apollo) and not graph:
            def write_only(opt=opt):
                opt.prepare()
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                opt.apply()
                if cuda:
                    torch.cuda.synchronize()
                return time.perf_counter() - t0
            write = statistics.median(write_only() for _ in range(a.steps))
        rows.append((name, seconds, write, state_bytes(opt)))
        del opt, params, step
        if cuda:
            torch.cuda.empty_cache()
    base_t, base_s = rows[0][1], rows[0][3]
    ref_t = next((r[1] for r in rows if r[0].startswith("apollo-torch")), float("nan"))
    print("| optimizer | step ms | write ms | vs AdamW time | vs apollo-torch time "
          "| state MiB | vs AdamW state |")
    print("|---|---|---|---|---|---|---|")
    for name, t, w, s in rows:
        write = f"{1e3 * w:.1f}" if w is not None else "-"
        print(f"| {name} | {1e3 * t:.1f} | {write} | {t / base_t:.2f}x | {t / ref_t:.2f}x "
              f"| {s / 2**20:.1f} | {s / base_s:.4f}x |")


if __name__ == "__main__":
    main()
