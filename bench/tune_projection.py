"""Time launch shapes (``optimizer.kernels.Tiles``) of APOLLO-Mini's fused rank-1 projection
on 8 Llama-3-8B layers (bf16), one orientation at a time, against one read of the gradients.

    python -m bench.tune_projection [--layers 8]     # on a GPU: about a minute (29 candidates)
    TRITON_INTERPRET=1 python -m bench.tune_projection --device cpu --shrink 128 --quick

Candidates: the kept tiles first, a few other shapes of the tile kernel (stages 0), and the
streaming kernel (stages >= 1: one launch for up to `group` matrices, folded accumulators,
stages >= 2 pipelined through shared memory). Each is checked against the kept tiles' result
(the kept one against torch's matmul), a candidate that errs or disagrees is reported and
skipped, and each is timed in a CUDA graph (kernel time, no Python launch overhead). Per
orientation the table ends with the best against two reads of the same bytes: the HBM floor
at --bandwidth and torch's own one-pass reduction over the same gradients
(torch._foreach_norm, timed the same way). The last line is the best pair as ``--tiles`` for
``bench.optimizer``; paste it into ``kernels.DEFAULT_TILES`` once measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from bench.optimizer import LAYER
from optimizer import DEFAULT_TILES, ProjectionTiles, Tiles, kernels

GOAL = 1.3  # the projection's target: within this factor of one read of G
ALL = 64  # `group` for "every matrix of the orientation in one launch" (8 layers: 32 and 24)

# (bm, bn, splits, warps, stages, group); the kept tiles come first on their own.
ROWS = [
    (8, 512, 1, 8), (4, 1024, 1, 8),  # the tile kernel, wider
    (4, 1024, 1, 4, 1, ALL), (8, 1024, 1, 4, 1, ALL), (16, 512, 1, 4, 1, ALL),
    (4, 2048, 1, 8, 1, ALL), (8, 512, 1, 2, 1, ALL),
    (4, 1024, 1, 4, 3, ALL), (8, 1024, 1, 4, 3, ALL), (8, 512, 1, 4, 4, ALL),
    (8, 1024, 1, 4, 1, 8), (8, 1024, 1, 4, 1, 1),  # what grouping buys
]
COLS = [
    (32, 128, 8, 8), (16, 256, 16, 8),
    (4, 1024, 16, 4, 1, ALL), (4, 1024, 32, 4, 1, ALL), (4, 1024, 8, 4, 1, ALL),
    (4, 512, 16, 2, 1, ALL), (4, 512, 32, 2, 1, ALL), (8, 1024, 16, 4, 1, ALL),
    (4, 2048, 16, 8, 1, ALL),
    (8, 1024, 16, 4, 3, ALL), (8, 1024, 32, 4, 3, ALL), (8, 512, 16, 2, 3, ALL),
    (4, 1024, 16, 4, 4, ALL),
    (4, 1024, 16, 4, 1, 8), (4, 1024, 16, 4, 1, 1),
]


def candidates(orientation: str, quick: bool) -> list[Tiles]:
    """The kept tiles, then the list above; quick: the kept tiles, the first streaming and
    the first pipelined candidate (the CPU dry run's path through both kernels)."""
    kept = getattr(DEFAULT_TILES, orientation)
    rest = [Tiles(*c) for c in (ROWS if orientation == "rows" else COLS)]
    if quick:
        rest = [next(t for t in rest if t.stages == 1), next(t for t in rest if t.stages > 1)]
    return [kept] + [t for t in rest if t != kept]


def timer(device: torch.device):
    """Seconds per call: CUDA-graph replays on a GPU, wall clock elsewhere."""
    if device.type == "cuda":
        from triton.testing import do_bench_cudagraph

        return lambda fn: do_bench_cudagraph(fn, rep=25) / 1e3

    def wall(fn):  # the CPU dry run (Triton's interpreter): the path, not a timing
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return wall


def tune(orientation: str, a: argparse.Namespace, time_of) -> tuple[Tiles, list[float]]:
    """Check and time every candidate for one orientation; print its rows and summary;
    return the best and the seconds of it, of the HBM floor and of torch's one read."""
    device = torch.device(a.device)
    g = torch.Generator(device=device).manual_seed(0)
    shapes = [(r // a.shrink, c // a.shrink) for r, c in LAYER * a.layers]
    shapes = [s for s in shapes if (s[0] >= s[1]) == (orientation == "rows")]
    grads = [torch.randn(s, generator=g, device=device, dtype=torch.bfloat16) for s in shapes]
    projs = [torch.randn((1, n) if m >= n else (m, 1), generator=g, device=device)
             for m, n in shapes]
    low = torch.empty(sum(max(s) for s in shapes), device=device)
    nbytes = sum(x.numel() * x.element_size() for x in grads)
    floor = nbytes / a.bandwidth

    def run(tiles: ProjectionTiles = DEFAULT_TILES, fused: bool = True):
        return kernels.project_rank1_(grads, projs, low, fused=fused, tiles=tiles)

    want_norms = torch.stack(run(fused=False))  # torch's matmul and norm: the kept's check
    want_low = low.clone()
    results, failed = [], []
    for tiles in candidates(orientation, a.quick):
        candidate = dataclasses.replace(DEFAULT_TILES, **{orientation: tiles})
        try:
            low.fill_(float("nan"))  # every element must be written
            norms = torch.stack(run(candidate))
            torch.testing.assert_close(low, want_low, rtol=1e-3, atol=1e-3)
            torch.testing.assert_close(norms, want_norms, rtol=1e-4, atol=0)
            seconds = time_of(lambda candidate=candidate: run(candidate))
        except Exception as exc:  # reported, never chosen; the others still run
            failed.append((tiles, f"{type(exc).__name__}: {exc}".replace("\n", " ")[:200]))
            if not results:  # the kept tiles themselves: nothing to compare against
                raise
            continue
        if not results:  # from here on, candidates must match the kept tiles' result
            want_norms, want_low = norms, low.clone()
        results.append((seconds, tiles))
    base = results[0][0]
    kept = getattr(DEFAULT_TILES, orientation)
    for seconds, tiles in sorted(results, key=lambda r: r[0]):
        mark = " (kept)" if tiles == kept else ""
        print(f"| {orientation} | {tiles.spec()}{mark} | {1e3 * seconds:.3f} "
              f"| {nbytes / seconds / 1e9:.0f} | {seconds / floor:.2f}x | {seconds / base:.2f}x |")
    for tiles, why in failed:
        print(f"| {orientation} | {tiles.spec()} | failed: {why} | | | |")
    best_seconds, best = min(results, key=lambda r: r[0])
    reference = time_of(lambda: torch._foreach_norm(grads, 2))
    again = time_of(lambda: run(dataclasses.replace(DEFAULT_TILES, **{orientation: best})))
    print(f"\n{orientation}: {len(shapes)} matrices, {nbytes / 1e9:.3f} GB; best {best.spec()} "
          f"{1e3 * best_seconds:.3f} ms (again: {1e3 * again:.3f} ms) = "
          f"{best_seconds / floor:.2f}x the HBM floor ({1e3 * floor:.3f} ms at "
          f"{a.bandwidth / 1e12:.1f} TB/s), {best_seconds / reference:.2f}x torch._foreach_norm "
          f"over the same gradients ({1e3 * reference:.3f} ms, one read); kept "
          f"{1e3 * base:.3f} ms" + ("" if device.type == "cuda" else " (CPU: wall clock)") + "\n")
    return best, [best_seconds, floor, reference]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--shrink", type=int, default=1, help="divide every dimension (dry run)")
    ap.add_argument("--quick", action="store_true",
                    help="three candidates per orientation (the CPU dry run)")
    ap.add_argument("--bandwidth", type=float, default=4.8e12,
                    help="bytes/s the card's HBM moves (H200: 4.8e12, H100 SXM: 3.35e12)")
    a = ap.parse_args()
    device = torch.device(a.device)
    time_of = timer(device)
    best, total = {}, [0.0, 0.0, 0.0]
    for orientation in ("rows", "cols"):
        print("| orientation | tiles (bm x bn x splits x warps [x stages x group]) | ms | GB/s "
              "| of HBM floor | vs kept |")
        print("|---|---|---|---|---|---|")
        best[orientation], seconds = tune(orientation, a, time_of)
        total = [x + y for x, y in zip(total, seconds, strict=True)]
    seconds, floor, reference = total
    verdict = "met" if seconds <= GOAL * floor else "not met"
    print(f"both orientations: {1e3 * seconds:.3f} ms = {seconds / floor:.2f}x the HBM floor "
          f"({1e3 * floor:.3f} ms), {seconds / reference:.2f}x torch._foreach_norm's read "
          f"({1e3 * reference:.3f} ms); goal <= {GOAL}x the floor: {verdict}"
          + ("" if device.type == "cuda" else " (CPU dry run: wall clock, not a timing)"))
    if device.type != "cuda":  # nothing was timed: the kept tiles stay
        best = {"rows": DEFAULT_TILES.rows, "cols": DEFAULT_TILES.cols}
    print(f"best: --tiles rows={best['rows'].spec()},cols={best['cols'].spec()}")


if __name__ == "__main__":
    main()
