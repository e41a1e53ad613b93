"""What the server trains: the mapped live model, its tokenizer and the optimizer."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AutoTokenizer

from checkpoint import Checkpointer, read_layout
from optimizer import ApolloMini
from server.config import Settings
from server.distributed import Group, free_port, gather_to_leader, join, start_followers
from server.live import ExportedWeights, LocalWeights
from weight_mapping import Export, attach, build_model, checkpoint_file_names, load_config

log = logging.getLogger("vllm_apollo.runtime")


@dataclass
class Runtime:
    model: nn.Module
    tokenizer: object
    optimizer: torch.optim.Optimizer
    model_path: str
    export: Export | None = None
    checkpointer: Checkpointer | None = None
    live: LocalWeights = field(default_factory=LocalWeights)
    group: Group | None = None  # tensor parallelism: this rank's place in the trainer group

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id or 0


def param_groups(model: nn.Module, lr: float, train_embeddings: bool) -> list[dict]:
    """Matrices of the decoder layers get APOLLO-Mini; norms AdamW; embeddings frozen unless
    asked (AdamW on them would cost two extra copies of the vocabulary matrix)."""
    embeddings = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings())
                  if m is not None for p in m.parameters()}
    matrices, others, frozen = [], [], []
    for p in model.parameters():
        if id(p) in embeddings:
            (others if train_embeddings else frozen).append(p)
        elif p.dim() == 2:
            matrices.append(p)
        else:
            others.append(p)
    for p in frozen:
        p.requires_grad_(False)
    return [{"params": matrices, "lr": lr}, {"params": others, "lr": lr, "apollo": False}]


def make_optimizer(model: nn.Module, settings: Settings) -> torch.optim.Optimizer:
    return ApolloMini(param_groups(model, settings.lr, settings.train_embeddings), lr=settings.lr)


def load_runtime(settings: Settings, rank: int = 0, port: int = 0) -> Runtime:
    """Attach to vLLM's rank `rank` export. With tensor parallelism, rank 0 (the server)
    also starts ranks 1..N-1 (server/follower.py) and all join one process group."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    export = attach(settings.export_dir, rank=rank, timeout=settings.attach_timeout)
    group = None
    if export.world_size > 1:
        if settings.train_embeddings:
            raise ValueError("--train-embeddings is not supported with tensor parallelism: "
                             "vLLM's ranks > 0 read the embedding before the step's first "
                             "collective, outside the step lock (hooks/vllm_worker.py)")
        if settings.optimizer_mode == "layerwise":
            raise ValueError("--optimizer-mode layerwise is not supported with tensor "
                             "parallelism; use standard")
        if rank == 0:
            from server.follower import follower_main

            port = free_port()
            start_followers(follower_main, settings, export.world_size, port)
        group = join(rank, export.world_size, port, export.device,
                     timeout=settings.attach_timeout + 60)
    config = load_config(export.model_path)
    model = build_model(export.tensors, config, shards=export.shards,
                        mesh=group.mesh if group else None)
    tokenizer = AutoTokenizer.from_pretrained(export.model_path)
    log.info("rank %d/%d attached to %s: %d parameters mapped onto vLLM's tensors", rank,
             export.world_size, export.model_path, sum(1 for _ in model.parameters()))
    params = dict(model.named_parameters(remove_duplicate=False))
    checkpointer = None
    if rank == 0:  # the other ranks send their shards to it (server/distributed.py)
        checkpointer = Checkpointer(
            export.model_path, params,
            file_names=checkpoint_file_names(list(params), set(read_layout(export.model_path))),
            gather=(lambda t: gather_to_leader(t, group)) if group else None)
    live = ExportedWeights(export, settings.consistency, settings.prefix_cache_reset, group)
    return Runtime(model=model, tokenizer=tokenizer, optimizer=make_optimizer(model, settings),
                   model_path=export.model_path, export=export, checkpointer=checkpointer,
                   live=live, group=group)
