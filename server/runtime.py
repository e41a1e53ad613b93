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


def load_runtime(settings: Settings) -> Runtime:
    if settings.threads:
        torch.set_num_threads(settings.threads)
    export = attach(settings.export_dir, timeout=settings.attach_timeout)
    config = load_config(export.model_path)
    model = build_model(export.tensors, config)
    tokenizer = AutoTokenizer.from_pretrained(export.model_path)
    log.info("attached to %s: %d parameters mapped onto vLLM's tensors",
             export.model_path, sum(1 for _ in model.parameters()))
    params = dict(model.named_parameters(remove_duplicate=False))
    checkpointer = Checkpointer(export.model_path, params, file_names=checkpoint_file_names(
        list(params), set(read_layout(export.model_path))))
    live = ExportedWeights(export, settings.consistency, settings.prefix_cache_reset)
    return Runtime(model=model, tokenizer=tokenizer, optimizer=make_optimizer(model, settings),
                   model_path=export.model_path, export=export, checkpointer=checkpointer,
                   live=live)
