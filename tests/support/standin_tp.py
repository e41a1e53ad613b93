"""vLLM's tensor-parallel layout without vLLM: rank r's shards of a model's fused tensors and
the manifest's "shard" entries, as hooks/sharding.py reads them from vLLM's layers (checked
against real vLLM in tests/test_tensor_parallel.py)."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from hooks.sharding import split_ranges
from weight_mapping import fuse_state_dict
from weight_mapping.families import gate_up_rows, qkv_rows

VOCAB_PADDING = 64  # vLLM's DEFAULT_VOCAB_PADDING_SIZE


def shard_spec(name: str, shape: torch.Size, config: PretrainedConfig, rank: int,
               world: int) -> dict | None:
    if ".qkv_proj." in name:
        return {"dim": 0, "full": shape[0], "pieces": split_ranges(qkv_rows(config), rank, world)}
    if ".gate_up_proj." in name:
        return {"dim": 0, "full": shape[0],
                "pieces": split_ranges(gate_up_rows(config), rank, world)}
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return {"dim": 1, "full": shape[1], "pieces": split_ranges([shape[1]], rank, world)}
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        padded = -(-shape[0] // VOCAB_PADDING) * VOCAB_PADDING
        per = padded // world
        return {"dim": 0, "full": shape[0],
                "pieces": [[rank * per, min(shape[0], (rank + 1) * per)]]}
    return None


def shard_model(state_dict: dict, config: PretrainedConfig, rank: int, world: int
                ) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(vLLM rank `rank`'s tensors, their manifest "shard" entries)."""
    tensors, shards = {}, {}
    for name, full in fuse_state_dict(state_dict, config).items():
        spec = shard_spec(name, full.shape, config, rank, world)
        if spec is None:
            tensors[name] = full.clone()
            continue
        parts = [full.narrow(spec["dim"], a, b - a) for a, b in spec["pieces"]]
        local = torch.cat(parts, spec["dim"])
        if name in ("model.embed_tokens.weight", "lm_head.weight"):  # vLLM's padding rows
            padded = -(-full.shape[0] // VOCAB_PADDING) * VOCAB_PADDING // world
            local = torch.cat([local, local.new_zeros(padded - local.shape[0],
                                                      *local.shape[1:])])
        tensors[name], shards[name] = local.contiguous(), spec
    return tensors, shards
