"""One rank of a tensor-parallel trainer on stand-in shards (bench/standin_tp.py), beside an
unsharded copy of the same model: checks logits, then, for APOLLO-Mini and APOLLO rank 4 in
turn, trains both from the same weights for STEPS steps and compares the gathered weights.
Run by tests/test_tensor_parallel.py with torch.distributed's env vars (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT); rank 0 prints one JSON line."""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from optimizer import Apollo, ApolloMini
from server.engine.loss import causal_lm_loss
from server.engine.wiring import param_groups
from tests.support.standin_tp import shard_model
from weight_mapping import build_model, fuse_state_dict, load_config, shares_storage
from weight_mapping.sharded import ShardSpec

STEPS = 20


def main() -> None:
    model_dir = sys.argv[1]
    torch.manual_seed(0)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    config = load_config(model_dir)
    state = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    ids = torch.randint(0, config.vocab_size, (4, 3, 24))
    results = {kind: train_both(config, state, ids, kind, rank, world, mesh)
               for kind in ("mini", "rank4")}
    if rank == 0:
        print(json.dumps(results), flush=True)
    dist.destroy_process_group()


def train_both(config, state, ids, kind, rank, world, mesh) -> dict:
    tensors, specs = shard_model(state, config, rank, world)
    tp = build_model(tensors, config, shards={n: ShardSpec.from_manifest(s)
                                              for n, s in specs.items()}, mesh=mesh)
    ref = build_model({k: v.clone() for k, v in fuse_state_dict(state, config).items()}, config)
    aliased = all(shares_storage(p.to_local() if isinstance(p, DTensor) else p, tensors)
                  for p in tp.parameters())
    sharded = sum(isinstance(p, DTensor) for p in tp.parameters())

    mask = torch.ones_like(ids[0])
    with torch.no_grad():
        logit_diff = (tp(input_ids=ids[0]).logits - ref(input_ids=ids[0]).logits).abs().max()

    def make(model):
        groups = param_groups(model, lr=1e-3, train_embeddings=False)
        if kind == "mini":
            return ApolloMini(groups, lr=1e-3, update_proj_gap=8)
        return Apollo(groups, lr=1e-3, rank=4, update_proj_gap=8)

    for model in (tp, ref):
        opt = make(model)
        for step in range(STEPS):
            batch = ids[step % len(ids)]
            causal_lm_loss(model, batch, batch, mask).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    worst, moved = 0.0, 0.0
    for (name, p), q in zip(tp.named_parameters(), ref.parameters(), strict=True):
        full = p.full_tensor() if isinstance(p, DTensor) else p
        worst = max(worst, float((full - q).abs().max() / q.abs().max()))
        if name in state:
            moved = max(moved, float((q - state[name]).detach().abs().max()))
    return {"logit_diff": float(logit_diff), "weight_rel_diff": worst, "moved": moved,
            "aliased": aliased, "sharded": sharded}


if __name__ == "__main__":
    main()
