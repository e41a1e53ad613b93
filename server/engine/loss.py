"""Batches and losses: what one forward pass of the trainer computes."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

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


def leads(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position of `labels` (shifted as in HF models): by how many nats (log-probability)
    the target token leads the likeliest other token, negative where it is not the greedy
    choice; and which positions are targets."""
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    safe = targets.clamp_min(0)
    target = logits.gather(-1, safe[..., None])[..., 0]
    others = logits.scatter(-1, safe[..., None], float("-inf")).amax(-1)
    return target - others, targets != IGNORE_INDEX


# --- preferences and feedback: sequence log-probabilities, DPO, KTO, their stop criteria ---

def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: the sum of its target tokens' log-probabilities (fp32), as TRL's DPO and KTO
    trainers score a completion (summed, not averaged, over its tokens)."""
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    is_target = targets != IGNORE_INDEX
    logp = logits.log_softmax(-1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    return (logp * is_target).sum(-1)


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's sigmoid loss per pair (Rafailov et al., 2023; TRL's loss_type "sigmoid"):
    -log σ(β·((π_c − ref_c) − (π_r − ref_r))), from summed sequence log-probabilities."""
    return -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))


def kto_kl(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0: the batch's mean log-ratio on mismatched (prompt, answer)
    pairs, detached and clamped at 0 (TRL's KTOTrainer); 0 when there is no such pair."""
    if kl_logps.numel() == 0:
        return torch.zeros((), device=kl_logps.device)
    return (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
             kl: torch.Tensor, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> torch.Tensor:
    """KTO's loss per labeled answer (Ethayarajh et al., 2024, eq. 7; TRL's loss_type "kto"):
    1 − σ(β(r − z0)) for a thumbs-up, 1 − σ(β(z0 − r)) for a thumbs-down, r = π − ref."""
    ratio = logps - ref_logps
    up = desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    down = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    return torch.where(desirable, up, down)


@torch.no_grad()
def greedy_mismatch(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: is some target token not the greedy choice (so greedy decoding leaves the
    answer there)?"""
    targets = labels[:, 1:]
    wrong = logits[:, :-1].argmax(-1) != targets.clamp_min(0)
    return (wrong & (targets != IGNORE_INDEX)).any(-1)


@torch.no_grad()
def greedy_at(logits: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Per row: is the token at `positions[row]` the greedy choice after the tokens before it?"""
    rows = torch.arange(len(positions), device=logits.device)
    return logits[rows, positions - 1].argmax(-1) == ids[rows, positions]
