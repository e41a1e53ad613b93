"""Where an optimizer step's GPU time goes: torch.profiler's top kernels for ours APOLLO-Mini
(eager and CUDA graph) on Llama-3-8B layer shapes. A tool for tuning, not a benchmark.

    python -m bench.profile_optimizer [--layers 8] [--tiles rows=...,cols=...]

--tiles takes the rank-1 projection's launch shapes as bench.tune_projection prints them.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench.optimizer import graphed, make_params, parse_tiles
from optimizer import ApolloMini


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tiles", default="", help="as bench.tune_projection's last line")
    a = ap.parse_args()
    tiles = parse_tiles(a.tiles)
    for graph in (False, True):
        params = make_params(a.layers, torch.bfloat16, torch.device("cuda"))
        opt = ApolloMini(params, lr=1e-5, capturable=graph, tiles=tiles)
        step = graphed(opt) if graph else opt.step
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        print(f"=== ours APOLLO-Mini, {'CUDA graph' if graph else 'eager'}, 3 steps")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18,
                                        max_name_column_width=60))
        del opt, params, step
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
