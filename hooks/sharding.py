"""Which slice of the full (unsharded) tensor each of a tensor-parallel rank's parameters holds.

For the manifest: ``{vllm_name: {"dim": d, "pieces": [[start, stop], ...], "full": N}}``. Along
dim ``d`` the local tensor is the concatenation of the full tensor's ranges ``pieces`` (a fused
QKV shard is three: this rank's q heads, k heads and v heads); rows past the pieces are
padding (vocab-parallel embeddings); ``full`` is the full tensor's size along ``d``.
Parameters absent from the map are replicated: every rank holds all of them.

Read from vLLM's own layer attributes (vllm/model_executor/layers/linear.py and
vocab_parallel_embedding.py), so it follows vLLM's sharding rather than re-deriving it.
"""

from __future__ import annotations

from torch import nn


def split_ranges(sizes: list[int], rank: int, tp: int) -> list[list[int]]:
    """Rank `rank`'s 1/tp of each consecutive part of sizes `sizes` (a fused column shard)."""
    out, offset = [], 0
    for size in sizes:
        part = size // tp
        out.append([offset + rank * part, offset + (rank + 1) * part])
        offset += size
    return out


def parameter_shards(model: nn.Module) -> dict[str, dict]:
    from vllm.model_executor.layers.linear import (
        ColumnParallelLinear,
        MergedColumnParallelLinear,
        QKVParallelLinear,
        RowParallelLinear,
    )
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    shards: dict[str, dict] = {}
    for prefix, module in model.named_modules():
        tp = getattr(module, "tp_size", 1)
        params = dict(module.named_parameters(recurse=False))
        if not params:
            continue
        spec = None
        if isinstance(module, VocabParallelEmbedding):
            idx = module.shard_indices
            if idx.num_added_elements:
                raise NotImplementedError(f"{prefix}: added (LoRA) vocabulary is not supported")
            if module.tp_size > 1:
                spec = {"dim": 0, "full": module.org_vocab_size,
                        "pieces": [[idx.org_vocab_start_index, idx.org_vocab_end_index]]}
        elif tp == 1:
            continue
        elif isinstance(module, QKVParallelLinear):
            d, dv = module.head_size, module.v_head_size
            q, k = module.total_num_heads * d, module.total_num_kv_heads * d
            kv_rank = module.tp_rank // module.num_kv_head_replicas
            pieces = [[module.tp_rank * module.num_heads * d,
                       (module.tp_rank + 1) * module.num_heads * d]]
            for offset, size in ((q, d), (q + k, dv)):
                pieces.append([offset + kv_rank * module.num_kv_heads * size,
                               offset + (kv_rank + 1) * module.num_kv_heads * size])
            spec = {"dim": 0, "full": q + k + module.total_num_kv_heads * dv,
                    "pieces": pieces}
        elif isinstance(module, MergedColumnParallelLinear):
            spec = {"dim": 0, "full": sum(module.output_sizes),
                    "pieces": split_ranges(module.output_sizes, module.tp_rank, tp)}
        elif isinstance(module, ColumnParallelLinear):
            spec = {"dim": 0, "full": module.output_size,
                    "pieces": split_ranges([module.output_size], module.tp_rank, tp)}
        elif isinstance(module, RowParallelLinear):
            # weight (out, in) sharded along `in`; the bias is added once, after the reduce
            shards[f"{prefix}.weight"] = {
                "dim": 1, "full": module.input_size,
                "pieces": split_ranges([module.input_size], module.tp_rank, tp)}
            continue
        if spec is None:
            continue
        for name, p in params.items():
            if name in ("weight", "bias") and p.dim() >= 1:
                shards[f"{prefix}.{name}"] = spec
    return shards
