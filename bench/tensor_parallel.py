"""Tensor-parallel training cost on this machine: TP=1 vs TP=2 (gloo), side by side, one run.

    python -m bench.tensor_parallel [--layers 4] [--hidden 512] [--tokens 256] [--steps 10]

A random Llama in vLLM's layout (tests/support/standin_tp.py shards it as vLLM's ranks hold
it); each rank builds the trainer's DTensor model over its shards and takes APOLLO-Mini steps on the
same batch. Prints per-step time (forward + backward + optimizer), the optimizer step alone,
the weights and optimizer state one rank holds, and the collectives of one TP=2 step
(docs/scaling.md derives their volume).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode
from transformers import AutoModelForCausalLM, LlamaConfig

from optimizer import ApolloMini
from server.engine.loss import causal_lm_loss
from server.engine.wiring import param_groups
from tests.support.standin_tp import shard_model
from weight_mapping import build_model, fuse_state_dict
from weight_mapping.sharded import ShardSpec


def run(rank: int, world: int, port: int, args, state_path: str, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    config = LlamaConfig.from_pretrained(state_path)
    state = AutoModelForCausalLM.from_pretrained(state_path).state_dict()
    if world == 1:
        tensors = {k: v.clone() for k, v in fuse_state_dict(state, config).items()}
        model = build_model(tensors, config)
    else:
        tensors, specs = shard_model(state, config, rank, world)
        model = build_model(tensors, config, mesh=mesh, shards={
            n: ShardSpec.from_manifest(s) for n, s in specs.items()})
    opt = ApolloMini(param_groups(model, 1e-4, train_embeddings=False), lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (1, args.tokens), generator=torch.Generator()
                        .manual_seed(0))
    mask = torch.ones_like(ids)
    steps, opt_s = [], []
    for i in range(args.steps + 2):  # two warm-up steps
        t0 = time.perf_counter()
        causal_lm_loss(model, ids, ids, mask).backward()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if i >= 2:
            steps.append(t2 - t0)
            opt_s.append(t2 - t1)
    with CommDebugMode() as model_comms:  # one more step, its collectives counted
        causal_lm_loss(model, ids, ids, mask).backward()
    with CommDebugMode() as opt_comms:
        opt.step()
    local = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
    state_bytes = sum(v.numel() * v.element_size() for s in opt.state.values()
                      for v in s.values() if torch.is_tensor(v))
    if rank == 0:
        out[world] = {"step_ms": 1e3 * sorted(steps)[len(steps) // 2],
                      "opt_ms": 1e3 * sorted(opt_s)[len(opt_s) // 2],
                      "weights_mib": sum(t.numel() * t.element_size() for t in local) / 2**20,
                      "state_kib": state_bytes / 1024,
                      "model_comms": _counts(model_comms), "opt_comms": _counts(opt_comms)}
    dist.destroy_process_group()


def _counts(mode: CommDebugMode) -> str:
    counts = mode.get_comm_counts()
    return ", ".join(f"{n} {str(op).rsplit('.', 1)[-1]}" for op, n in counts.items()) or "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    heads = args.hidden // 64
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64
                         * 64, num_hidden_layers=args.layers, num_attention_heads=heads,
                         num_key_value_heads=heads, head_dim=64, vocab_size=8192,
                         tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(Path(tmp))
        out = mp.Manager().dict()
        for world in (1, 2):
            port = 29500 + os.getpid() % 1000 + world
            mp.spawn(run, args=(world, port, args, tmp, out), nprocs=world, join=True)
    base = out[1]
    print(f"Llama {args.layers} layers, hidden {args.hidden}, {args.tokens} tokens, "
          f"APOLLO-Mini, fp32, gloo on {os.cpu_count()} CPU cores (median of {args.steps})")
    print(f"{'':6} {'step ms':>9} {'ratio':>6} {'opt ms':>8} {'ratio':>6} "
          f"{'weights/rank MiB':>17} {'state/rank KiB':>15}")
    for world in (1, 2):
        r = out[world]
        print(f"TP={world:<3} {r['step_ms']:9.1f} {r['step_ms'] / base['step_ms']:6.2f} "
              f"{r['opt_ms']:8.2f} {r['opt_ms'] / base['opt_ms']:6.2f} "
              f"{r['weights_mib']:17.1f} {r['state_kib']:15.1f}")
    print(f"TP=2 collectives per step: forward + backward: {out[2]['model_comms']}; "
          f"optimizer: {out[2]['opt_comms']}")


if __name__ == "__main__":
    main()
