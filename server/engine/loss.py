"""Batches and losses: what one forward pass of the trainer computes."""

from __future__ import annotations

import math

import torch
from torch import nn

from server.engine.tokenization import IGNORE_INDEX, Encoded


def collate(batch: list[Encoded], pad_id: int, device: torch.device):
    """Right-padded ids, labels (IGNORE_INDEX on padding) and attention mask."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return ids.to(device), labels.to(device), mask.to(device)


def causal_lm_loss(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over target tokens (labels shifted by one, as in HF models)."""
    return lm_loss_and_logits(model, ids, labels, mask)[0]


def lm_loss_and_logits(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor,
                       mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(input_ids=ids, attention_mask=mask).logits
    loss = nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    return loss, logits


@torch.no_grad()
def learned(logits: torch.Tensor, labels: torch.Tensor, min_prob: float) -> torch.Tensor:
    """Per example: is every target token the greedy choice, with probability >= min_prob?
    (What a temperature-0 answer needs, plus a margin so the lesson does not hang on a
    hair; measured in bench/locality.py.)"""
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    is_target = targets != IGNORE_INDEX
    safe = targets.clamp_min(0)
    logp = logits.log_softmax(-1)
    target_logp = logp.gather(-1, safe[..., None])[..., 0]
    greedy = logits.argmax(-1) == safe
    ok = greedy & (target_logp >= math.log(min_prob))
    return (ok | ~is_target).all(-1)
