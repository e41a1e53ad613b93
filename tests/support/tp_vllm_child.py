"""One trainer rank attached to real vLLM's tensor-parallel export (rank = RANK): builds the
DTensor model on vLLM's shards and, on rank 0, prints the log-softmax of its logits for the
prompt given as JSON (tests/test_tensor_parallel.py compares them with vLLM's own)."""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from weight_mapping import attach, build_model, load_config, shares_storage


def main() -> None:
    export_dir, ids = sys.argv[1], json.loads(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    export = attach(export_dir, rank=rank, timeout=120)
    assert (export.rank, export.world_size) == (rank, world), export.manifest["world_size"]
    mesh = init_device_mesh("cpu", (world,))
    model = build_model(export.tensors, load_config(export.model_path), shards=export.shards,
                        mesh=mesh)
    locals_ = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    if rank == 0:
        print(json.dumps({
            "logprobs": torch.log_softmax(logits, -1).tolist(),
            "aliased": all(shares_storage(t, export.tensors) for t in locals_),
            "sharded": sum(isinstance(p, DTensor) for p in model.parameters()),
            "local_numel": sum(t.numel() for t in locals_),
            "full_numel": sum(p.numel() for p in model.parameters())}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
