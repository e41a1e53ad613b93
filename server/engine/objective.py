"""What one batch is trained toward and when it is learned, whatever signals it mixes:
demonstrations (cross-entropy), preference pairs (DPO) and thumbs up / down (KTO).

Every row (a demonstration, a labeled answer, each answer of a pair) goes through the one
forward pass a step makes; the loss is the sum of one mean per signal present: the
demonstrations' cross-entropy per target token, DPO's mean over pairs, KTO's mean over
labeled answers (docs/preferences.md says why that weighting).

DPO and KTO measure the model against a reference: here the live weights as the batch
starts, whose log-probabilities are the first forward pass's, detached (the same numbers a
separate no-grad pass would give, one forward pass cheaper). The service has no frozen copy
of the weights to compare with (it would double their memory), and a reference that moves
with each batch makes β and the stop margin mean "how far this batch moved the model".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from server.engine.loss import (
    collate,
    dpo_loss,
    greedy_at,
    greedy_mismatch,
    kto_kl,
    kto_loss,
    learned,
    sequence_logps,
)
from server.engine.tokenization import IGNORE_INDEX, Encoded


@dataclass(frozen=True)
class Weights:
    """The settings the objective reads (server/settings.py documents each)."""

    beta: float = 0.1
    margin: float = 1.0  # nats, a pair's log-prob margin over the reference's
    desirable: float = 1.0  # KTO's weight on thumbs-up
    undesirable: float = 1.0  # KTO's weight on thumbs-down
    learned_prob: float = 0.5
    pair_sft: float = 0.0  # weight of the preferred answers' cross-entropy (TRL's "sft")

    @classmethod
    def of(cls, settings) -> Weights:
        return cls(settings.beta, settings.preference_margin, settings.kto_desirable_weight,
                   settings.kto_undesirable_weight, settings.learned_prob,
                   settings.dpo_sft_weight)


def divergence(chosen: Encoded, rejected: Encoded) -> int | None:
    """The position of the non-preferred answer's first target token that differs from the
    preferred answer (None if there is none: it is a prefix of the preferred one)."""
    a, b = chosen.input_ids, rejected.input_ids
    t = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
             min(len(a), len(b)))
    return next((i for i in range(t, len(b)) if rejected.labels[i] != IGNORE_INDEX), None)


def _split(e: Encoded) -> tuple[list[int], list[int]]:
    """An answer's prompt (tokens before its first target) and its completion (the targets)."""
    at = [i for i, label in enumerate(e.labels) if label != IGNORE_INDEX]
    return e.input_ids[:at[0]], e.input_ids[at[0]:at[-1] + 1]


def mismatched(labeled: list[Encoded]) -> list[Encoded]:
    """KTO's KL rows: each prompt with the previous labeled example's completion (the first
    with the last), as TRL's KTOTrainer pairs them within a batch; none for fewer than 2."""
    if len(labeled) < 2:
        return []
    rows = []
    for k, e in enumerate(labeled):
        prompt, _ = _split(e)
        _, completion = _split(labeled[k - 1])
        rows.append(Encoded(prompt + completion,
                            [IGNORE_INDEX] * len(prompt) + completion))
    return rows


def _labels_of(labels: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """`labels` with every row but `rows` ignored."""
    keep = torch.zeros(len(labels), dtype=torch.bool, device=labels.device)
    keep[rows] = True
    return labels.masked_fill(~keep[:, None], IGNORE_INDEX)


class Objective:
    """Built once per batch; each call is one forward pass: (loss, is the batch learned?)."""

    def __init__(self, batch: list[Encoded], pad_id: int, device: torch.device,
                 weights: Weights):
        self.w = weights
        rows: list[Encoded] = []
        self.demo, self.up, self.down, self.labeled = [], [], [], []
        self.chosen, self.rejected, diverge = [], [], []
        for e in batch:
            rows.append(e)
            i = len(rows) - 1
            if e.kind == "pair":
                self.chosen.append(i)
                self.rejected.append(len(rows))
                rows.append(e.rejected)
                diverge.append(divergence(e, e.rejected))
            elif e.kind in ("up", "down"):
                self.labeled.append(i)
                (self.up if e.kind == "up" else self.down).append(i)
            else:
                self.demo.append(i)
        self.ids, self.labels, self.mask = collate(rows, pad_id, device)
        self.demo_labels = self.labels if len(self.demo) == len(rows) else \
            _labels_of(self.labels, self.demo)
        self.greedy_labels = _labels_of(self.labels, self.demo + self.up)
        self.chosen_labels = _labels_of(self.labels, self.chosen)
        self.down_labels = _labels_of(self.labels, self.down)
        self.diverge = [(r, d) for r, d in zip(self.rejected, diverge, strict=True)
                        if d is not None]
        kl = mismatched([batch_row for batch_row in rows if batch_row.kind in ("up", "down")])
        self.kl = collate(kl, pad_id, device) if kl else None
        self.desirable = torch.tensor([rows[i].kind == "up" for i in self.labeled],
                                      dtype=torch.bool, device=device)
        self.ref: torch.Tensor | None = None  # per row, the weights as the batch starts
        self.ref_kl: torch.Tensor | None = None
        self.margins: list[float] = []  # of the pairs, at the last forward pass
        self.z0 = 0.0  # KTO's reference point at the last forward pass

    @property
    def demos_only(self) -> bool:
        return not (self.chosen or self.labeled)

    def __call__(self, model: nn.Module) -> tuple[torch.Tensor, bool]:
        logits = model(input_ids=self.ids, attention_mask=self.mask).logits
        terms = []
        if self.demo:
            terms.append(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                         self.demo_labels[:, 1:].flatten(),
                                         ignore_index=IGNORE_INDEX))
        logps = None
        if not self.demos_only:
            logps = sequence_logps(logits, self.labels)
            if self.ref is None:
                self.ref = logps.detach()
            terms.extend(self._preference_terms(model, logits, logps))
            logps = logps.detach()
        return sum(terms[1:], terms[0]), self._learned(logits.detach(), logps)

    def _preference_terms(self, model: nn.Module, logits: torch.Tensor,
                          logps: torch.Tensor) -> list[torch.Tensor]:
        terms = []
        ref = self.ref
        if self.chosen:
            c, r = self.chosen, self.rejected
            terms.append(dpo_loss(logps[c], logps[r], ref[c], ref[r], self.w.beta).mean())
            if self.w.pair_sft:  # TRL's loss_type ["sigmoid", "sft"]: per preferred token
                terms.append(self.w.pair_sft * F.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(),
                    self.chosen_labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX))
        if self.labeled:
            z0 = torch.zeros((), device=logps.device)
            if self.kl is not None:  # TRL: the policy's KL log-probs take no gradient
                with torch.no_grad():
                    ids, labels, mask = self.kl
                    kl_logps = sequence_logps(model(input_ids=ids, attention_mask=mask).logits,
                                              labels)
                if self.ref_kl is None:
                    self.ref_kl = kl_logps
                z0 = kto_kl(kl_logps, self.ref_kl)
            self.z0 = float(z0)
            i = self.labeled
            terms.append(kto_loss(logps[i], ref[i], self.desirable, z0, self.w.beta,
                                  self.w.desirable, self.w.undesirable).mean())
        return terms

    @torch.no_grad()
    def _learned(self, logits: torch.Tensor, logps: torch.Tensor | None) -> bool:
        """Demonstrations and thumbs-up: every target the greedy choice with p >=
        learned_prob; thumbs-down: some target token no longer greedy; pairs: the margin
        reached and the non-preferred answer's first differing token no longer greedy."""
        done = bool(learned(logits, self.greedy_labels, self.w.learned_prob).all())
        if done and self.down:
            done = bool(greedy_mismatch(logits, self.down_labels)[self.down].all())
        if self.chosen:
            c, r, ref = self.chosen, self.rejected, self.ref
            margins = (logps[c] - ref[c]) - (logps[r] - ref[r])
            self.margins = margins.tolist()
            done = done and bool((margins >= self.w.margin).all())
            if done and self.diverge:
                rows = torch.tensor([row for row, _ in self.diverge], device=logits.device)
                at = torch.tensor([d for _, d in self.diverge], device=logits.device)
                done = not bool(greedy_at(logits[rows], self.ids[rows], at).any())
        return done

    def describe(self) -> str:
        """How the batch's preferences and feedback stood at the last forward pass ('' for
        demonstrations alone)."""
        parts = []
        if self.chosen:
            n = len(self.chosen)
            worst = min(self.margins) if self.margins else 0.0
            sft = f" (+{self.w.pair_sft:g} x cross-entropy on the preferred)" \
                if self.w.pair_sft else ""
            parts.append(f"DPO{sft} on {n} pair{'s' * (n > 1)}, smallest margin {worst:.2f} "
                         "nats over the reference")
        if self.up:
            parts.append(f"KTO on {len(self.up)} thumbs-up")
        if self.down:
            parts.append(f"KTO on {len(self.down)} thumbs-down")
        if self.demo and parts:
            n = len(self.demo)
            parts.insert(0, f"cross-entropy on {n} demonstration{'s' * (n > 1)}")
        return "; ".join(parts)
