"""Time launch shapes (``optimizer.kernels.Tiles``) of APOLLO-Mini's fused rank-1 projection
on 8 Llama-3-8B layers (bf16), one orientation at a time, against the memory-bandwidth bound.

    python -m bench.tune_projection [--layers 8]     # on a GPU: ~1 min, mostly Triton compiles
    TRITON_INTERPRET=1 python -m bench.tune_projection --device cpu --shrink 128 --quick

Each candidate is checked against the kept tiles' result (a wrong launch shape fails loudly)
and timed in a CUDA graph (kernel time, no Python launch overhead). The last line is the
best pair as ``--tiles`` for ``bench.optimizer``; paste it into ``kernels.DEFAULT_TILES`` once
measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time

import torch

from bench.optimizer import LAYER, format_tiles
from optimizer import DEFAULT_TILES, ProjectionTiles, Tiles, kernels

ROWS = [(4, 512), (2, 1024), (8, 256), (8, 512), (1, 1024), (2, 512), (4, 1024), (16, 256)]
COLS = [(32, 64), (16, 128), (32, 128), (64, 64), (64, 128), (16, 256), (128, 32)]


def candidates(orientation: str, quick: bool) -> list[Tiles]:
    shapes, splits = (ROWS, (1, 2)) if orientation == "rows" else (COLS, (4, 8, 16))
    out = [getattr(DEFAULT_TILES, orientation)]
    for (bm, bn), s, w in itertools.product(shapes, splits, (4, 8)):
        t = Tiles(bm, bn, s, w)
        if t not in out and bm * bn <= 1024 * w:  # <= 32 fp32 per thread per accumulator
            out.append(t)
    return out[:2] if quick else out


def timer(device: torch.device):
    """Seconds per call: CUDA-graph replays on a GPU, wall clock elsewhere."""
    if device.type == "cuda":
        from triton.testing import do_bench_cudagraph

        return lambda fn: do_bench_cudagraph(fn, rep=40) / 1e3

    def wall(fn):  # the CPU dry run (Triton's interpreter): the path, not a timing
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return wall


def tune(orientation: str, a: argparse.Namespace, time_of) -> Tiles:
    """Check and time every candidate for one orientation; print its rows; return the best."""
    device = torch.device(a.device)
    g = torch.Generator(device=device).manual_seed(0)
    shapes = [(r // a.shrink, c // a.shrink) for r, c in LAYER * a.layers]
    shapes = [s for s in shapes if (s[0] >= s[1]) == (orientation == "rows")]
    grads = [torch.randn(s, generator=g, device=device, dtype=torch.bfloat16) for s in shapes]
    projs = [torch.randn((1, n) if m >= n else (m, 1), generator=g, device=device)
             for m, n in shapes]
    low = torch.empty(sum(max(s) for s in shapes), device=device)
    nbytes = sum(x.numel() * x.element_size() for x in grads)

    def run(tiles: ProjectionTiles = DEFAULT_TILES):
        return kernels.project_rank1_(grads, projs, low, fused=True, tiles=tiles)

    want_norms = torch.stack(run())
    want_low = low.clone()
    results = []
    for tiles in candidates(orientation, a.quick):
        candidate = dataclasses.replace(DEFAULT_TILES, **{orientation: tiles})
        norms = torch.stack(run(candidate))
        torch.testing.assert_close(low, want_low, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(norms, want_norms, rtol=1e-4, atol=0)
        results.append((time_of(lambda candidate=candidate: run(candidate)), tiles))
    base = results[0][0]
    kept = getattr(DEFAULT_TILES, orientation)
    for seconds, tiles in sorted(results, key=lambda r: r[0]):
        mark = " (kept)" if tiles == kept else ""
        print(f"| {orientation} | {tiles.bm}x{tiles.bn}x{tiles.splits}x{tiles.warps}{mark} "
              f"| {1e3 * seconds:.3f} | {nbytes / seconds / 1e9:.0f} "
              f"| {nbytes / a.bandwidth / seconds:.2f} | {seconds / base:.2f}x |")
    return min(results, key=lambda r: r[0])[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--shrink", type=int, default=1, help="divide every dimension (dry run)")
    ap.add_argument("--quick", action="store_true", help="two candidates per orientation")
    ap.add_argument("--bandwidth", type=float, default=4.8e12,
                    help="bytes/s the card's HBM moves (H200: 4.8e12, H100 SXM: 3.35e12)")
    a = ap.parse_args()
    time_of = timer(torch.device(a.device))
    print("| orientation | tiles (bm x bn x splits x warps) | ms | GB/s | of HBM bound | vs kept |")
    print("|---|---|---|---|---|---|")
    best = ProjectionTiles(**{orientation: tune(orientation, a, time_of)
                              for orientation in ("rows", "cols")})
    print(f"best: --tiles {format_tiles(best)}")


if __name__ == "__main__":
    main()
