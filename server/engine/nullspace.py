"""The null-space guard: a lesson may change a matrix only along input directions the rest
of the model's use does not occupy (after AlphaEdit, Fang et al., ICLR 2025).

For every trained linear layer y = W x, the inputs x it sees while the model answers the
probe set span a subspace S (the top eigenvectors of their covariance holding all but
`eps` of its energy). The weight gradient dL/dW = Σ dy xᵀ is taken with each x projected
off S, so the update ΔW satisfies ΔW s ≈ 0 for s in S: on probe-like inputs the layer
computes what it computed before. The projection acts on the activations inside backward
(T x d numbers per layer, not the d_out x d_in gradient), so a step costs little more.

Each input counts once in that covariance (scaled to unit length): some layers see a few
"massive activations" (an attention sink's token, thousands of times the others' norm), and
weighted by norm they alone held 99% of the energy — the default model's layer-11 down_proj
then protected one direction of 1536, and most of ten lessons' drift went through it.

A pinned sequence (a probe whose answer must stay token for token) has every input it gives
every trained matrix protected besides, in place of as many of S's weakest directions, until
a lesson asks its question and releases it. How the projections run: projection.py.
"""

from __future__ import annotations

import contextlib
import logging
import time
import types
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from server.engine.drift import save_atomic
from server.engine.projection import Projector, Staging, orth, projected_forward

if TYPE_CHECKING:
    from server.engine.pacing import Pace

log = logging.getLogger("vllm_apollo.guard")
# A pinned input's part outside the fitted span is protected down to this share of it.
PIN_TOL = 1e-3
FREE_SHARE = 1 / 16  # pins never leave less than this share of an input's directions free
# How the bases are fitted, kept with them: bases saved by another method are fitted again.
METHOD = f"unit-inputs; pins {PIN_TOL:g} {FREE_SHARE:g}"


def _trade(vectors: torch.Tensor, r: int, pinned: dict[str, torch.Tensor]
           ) -> tuple[int, dict[str, torch.Tensor], torch.Tensor]:
    """How many of the fitted span's directions (`vectors`' first r, strongest first) to
    keep beside the pinned inputs (n x d each, unit rows) so that together they protect no
    more than r directions where they can; each pin's own directions (what of its inputs
    lies outside the kept span) and all pins' span. Dropping weak directions can uncover
    more of a pin's inputs, hence the loop (two or three rounds)."""
    kept = r
    while True:
        span = vectors[:, :kept]
        own = {k: orth(x.T - span @ (span.T @ x.T), PIN_TOL) for k, x in pinned.items()}
        joint = orth(torch.cat(list(own.values()), 1))
        extra = kept + joint.shape[1] - r
        if extra <= 0 or kept == 0:
            return kept, own, joint
        kept = max(0, kept - extra)


class NullSpaceGuard:
    """Fits the protected input subspaces of a model's trained linear layers and makes their
    weight gradients avoid them."""

    def __init__(self, model: nn.Module, eps: float, on_device: bool = False):
        """`on_device`: on a GPU, keep the projectors in GPU memory beside the weights
        (faster) instead of pinned host memory copied in per layer (no GPU memory but two
        layers' worth in backward)."""
        self.eps, self.on_device = eps, on_device
        self.layers = {name: m for name, m in model.named_modules()
                       if isinstance(m, nn.Linear) and m.weight.requires_grad
                       and m.weight.dim() == 2}
        self.fitted = False

    @torch.no_grad()
    def fit(self, model: nn.Module, sequences: Sequence[list[int]], pad_id: int,
            batch: int = 32, pace: Pace = contextlib.nullcontext,
            pinned: dict[str, list[int]] | None = None) -> None:
        """Input covariances over `sequences` (probe prompts with their answers), one per
        distinct input (q/k/v, gate/up share theirs), then their protected bases. `pinned`:
        sequences whose every input is protected exactly besides (their answers then stay
        as they are, token for token). `pace()`: the context each forward batch and each
        basis runs in (the trainer's pacing chunk)."""
        t0 = time.perf_counter()
        device = next(model.parameters()).device
        key_of: dict[str, str] = {}  # layer -> the first layer that read the same input
        cov: dict[str, torch.Tensor] = {}
        # q/k/v (gate/up) read one tensor one after the other: sharing is "same as last"
        state = {"mask": None, "last": None, "last_name": None}

        def hook(name):
            def pre(module, args):
                x = args[0]
                if x is state["last"]:
                    key_of[name] = key_of[state["last_name"]]
                    return
                state["last"], state["last_name"] = x, name
                key_of[name] = name
                flat = x.reshape(-1, x.shape[-1])[state["mask"]].float()
                flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
                acc = cov.setdefault(name, torch.zeros(x.shape[-1], x.shape[-1],
                                                       dtype=torch.float32, device=device))
                acc.addmm_(flat.T, flat)
            return pre

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in self.layers.items()]
        # the LM head's logits (vocabulary-wide, at every position) are not needed unless
        # the head itself is guarded; batched by length, as padding is computed too
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") \
            else None
        body = model.get_decoder() if head is not None and head not in self.layers.values() \
            and hasattr(model, "get_decoder") else None
        body = body if isinstance(body, nn.Module) else model
        sequences = sorted(sequences, key=len)
        try:
            for lo in range(0, len(sequences), batch):
                chunk = sequences[lo:lo + batch]
                width = max(map(len, chunk))
                ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in chunk],
                                   device=device)
                mask = torch.arange(width, device=device)[None] < torch.tensor(
                    [len(s) for s in chunk], device=device)[:, None]
                state["mask"] = mask.reshape(-1)
                with pace():
                    body(input_ids=ids, attention_mask=mask.long())
                state["last"] = None
        finally:
            for h in handles:
                h.remove()
        spans = {}
        for key, c in cov.items():
            with pace():
                spans[key] = self._span(c)
        trades = self._accept_pins(spans, self._pinned_inputs(body, key_of, pinned or {},
                                                              pace))
        projectors = {}
        for key, (vectors, r) in spans.items():
            with pace():
                if key not in trades:
                    projectors[key] = Projector.of_vectors(vectors, r)
                    continue
                kept, own, joint = trades[key]
                projectors[key] = Projector.of_basis(torch.cat([vectors[:, :kept], joint], 1))
                projectors[key].pinned = {k: q.cpu() for k, q in own.items()}
        self._install(key_of, projectors)
        log.info("null-space guard: %d layers, %d distinct inputs, %.0f of %.0f input "
                 "directions protected on average (eps %g), fitted on %d probes in %.1f s",
                 len(self.layers), len(projectors),
                 sum(p.rank for p in projectors.values()) / len(projectors),
                 sum(p.dim for p in projectors.values()) / len(projectors), self.eps,
                 len(sequences), time.perf_counter() - t0)

    @torch.no_grad()
    def _pinned_inputs(self, body: nn.Module, key_of: dict[str, str],
                       pinned: dict[str, list[int]], pace: Pace
                       ) -> dict[str, dict[str, torch.Tensor]]:
        """Per pinned sequence, every input each distinct input key saw (n x d, unit rows)."""
        device = next(body.parameters()).device
        keys = set(key_of.values())
        out: dict[str, dict[str, torch.Tensor]] = {}
        seen: dict[str, torch.Tensor] = {}

        def hook(name):
            def pre(module, args):
                if name in keys and name not in seen:
                    x = args[0].reshape(-1, args[0].shape[-1]).float()
                    seen[name] = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
            return pre

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in self.layers.items()]
        try:
            for probe, seq in pinned.items():
                seen.clear()
                with pace():
                    body(input_ids=torch.tensor([seq], device=device))
                out[probe] = dict(seen)
        finally:
            for h in handles:
                h.remove()
        return out

    def _install(self, key_of: dict[str, str], projectors: dict[str, Projector]) -> None:
        staging = None if self.on_device else Staging()
        first = {}  # distinct inputs in the order forward reads them; backward goes back
        for name, module in self.layers.items():
            p = projectors[key_of[name]]
            p.place(module.weight, staging)
            module.null_guard = p
            module.forward = types.MethodType(projected_forward, module)
            first.setdefault(key_of[name], p)
        order = list(first.values())
        for p, before in zip(order, [None, *order[:-1]], strict=True):
            p.before = before
        self.key_of, self.projectors = key_of, projectors
        self.fitted = True

    def pins(self) -> set[str]:
        """The pinned sequences still protected exactly."""
        return {probe for p in self.projectors.values() for probe in p.pinned}

    def release(self, probe: str) -> None:
        """`probe`'s answer is being taught: its inputs are no longer protected beyond S."""
        for p in self.projectors.values():
            p.release(probe)

    def protected(self, name: str) -> torch.Tensor:
        """The orthonormal basis of what layer (or distinct input) `name` protects (d x r)."""
        return self.projectors[self.key_of.get(name, name)].protected()

    def save(self, path: Path, tag: str) -> None:
        """What each projector holds, the narrower of its basis and its complement (fp16:
        orthonormal directions, not values to add); `tag` names what they were fitted on."""
        save_atomic({"method": METHOD, "eps": self.eps, "tag": tag, "key_of": self.key_of,
                     "held": {k: p.held.to("cpu", torch.float16)
                              for k, p in self.projectors.items()},
                     "complement": {k: p.complement for k, p in self.projectors.items()},
                     "pins": {k: {probe: q.to(torch.float16) for probe, q in p.pinned.items()}
                              for k, p in self.projectors.items()}},
                    path)

    def load(self, path: Path, tag: str, pace: Pace = contextlib.nullcontext) -> bool:
        """Install bases fitted earlier on `tag` for these layers and this eps; False if they
        do not fit (another model, probe set, eps, way of fitting or file layout). `pace()`:
        as in fit."""
        saved = torch.load(path, weights_only=True)
        if saved.get("method") != METHOD or saved["eps"] != self.eps or \
                saved["tag"] != tag or set(saved["key_of"]) != set(self.layers) or \
                "held" not in saved:
            return False
        projectors = {}
        for k, held in saved["held"].items():
            with pace():
                projectors[k] = Projector.of_held(held, saved["complement"][k])
                projectors[k].pinned = {probe: q.float() for probe, q
                                        in saved.get("pins", {}).get(k, {}).items()}
        self._install(saved["key_of"], projectors)
        log.info("null-space guard: %d layers, bases from %s", len(self.layers), path)
        return True

    def _span(self, cov: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The covariance's eigenvectors (d x d, by falling eigenvalue) and how many of them
        hold all but eps of its energy: the span protected. fp32 suffices: only the split at
        1 - eps of the energy matters, not the small eigenvalues' digits (and it is 3.5x
        faster than fp64 on a CPU)."""
        values, vectors = torch.linalg.eigh(cov.float())
        values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
        energy = values.cumsum(0) / values.sum().clamp_min(1e-30)
        return vectors.float(), min(int((energy < 1 - self.eps).sum()) + 1, vectors.shape[1])

    def _accept_pins(self, spans: dict[str, tuple[torch.Tensor, int]],
                     inputs: dict[str, dict[str, torch.Tensor]]
                     ) -> dict[str, tuple[int, dict[str, torch.Tensor], torch.Tensor]]:
        """Per distinct input, the trade (`_trade`) of the pinned sequences that fit, taken
        in file order: a pin takes the place of the fitted span's weakest directions, so
        lessons keep the room they had. One whose inputs would still leave less than
        FREE_SHARE of some input's directions free (an answer longer than a layer is wide)
        is not pinned, with a warning."""
        trades: dict[str, tuple[int, dict[str, torch.Tensor], torch.Tensor]] = {}
        for probe, seen in inputs.items():
            tried = {}
            for key, x in seen.items():
                vectors, r = spans[key]
                pins = {p: inputs[p][key] for p in trades.get(key, (0, {}))[1]} | {probe: x}
                tried[key] = _trade(vectors, r, pins)
            short = [key for key, (kept, _, joint) in tried.items()
                     if kept + joint.shape[1] > (1 - FREE_SHARE) * spans[key][0].shape[0]]
            if short:
                log.warning("not pinning probe %s: its %d inputs would leave less than %.0f%% "
                            "of the input directions of %s free for lessons", probe,
                            next(iter(seen.values())).shape[0], 100 * FREE_SHARE, short[0])
                continue
            trades.update(tried)
        return trades

    def remove(self) -> None:
        for module in self.layers.values():
            if "forward" in module.__dict__:
                del module.forward
            module.__dict__.pop("null_guard", None)
        self.fitted = False
