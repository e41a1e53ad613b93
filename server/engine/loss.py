"""Batches and losses: what one forward pass of the trainer computes."""

from __future__ import annotations

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
    logits = model(input_ids=ids, attention_mask=mask).logits
    return nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
