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
from torch.nn import functional as F

from server.engine.drift import save_atomic

if TYPE_CHECKING:
    from server.engine.pacing import Pace

log = logging.getLogger("vllm_apollo.guard")
# How the bases are fitted, kept with them: bases saved by another method are fitted again.
METHOD = "unit-inputs"


class _ProjectedLinear(torch.autograd.Function):
    """F.linear whose weight gradient sees the input projected off `basis` (d_in x r)."""

    @staticmethod
    def forward(ctx, x, weight, bias, basis):
        ctx.save_for_backward(x, weight, basis)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight, basis = ctx.saved_tensors
        dx = dy @ weight if ctx.needs_input_grad[0] else None
        dw = db = None
        if ctx.needs_input_grad[1]:
            flat_x = x.reshape(-1, x.shape[-1]).float()
            flat_x = flat_x - (flat_x @ basis) @ basis.T
            dw = dy.reshape(-1, dy.shape[-1]).T @ flat_x.to(dy.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.reshape(-1, dy.shape[-1]).sum(0)
        return dx, dw, db, None


def _projected_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled() or not self.weight.requires_grad:
        return F.linear(x, self.weight, self.bias)
    return _ProjectedLinear.apply(x, self.weight, self.bias, self.null_guard_basis)


class NullSpaceGuard:
    """Fits the protected input subspaces of a model's trained linear layers and makes their
    weight gradients avoid them."""

    def __init__(self, model: nn.Module, eps: float):
        self.eps = eps
        self.layers = {name: m for name, m in model.named_modules()
                       if isinstance(m, nn.Linear) and m.weight.requires_grad
                       and m.weight.dim() == 2}
        self.fitted = False

    @torch.no_grad()
    def fit(self, model: nn.Module, sequences: Sequence[list[int]], pad_id: int,
            batch: int = 32, pace: Pace = contextlib.nullcontext) -> None:
        """Input covariances over `sequences` (probe prompts with their answers), one per
        distinct input (q/k/v, gate/up share theirs), then their protected bases. `pace()`:
        the context each forward batch and each basis runs in (the trainer's pacing chunk)."""
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
        bases = {}
        for key, c in cov.items():
            with pace():
                bases[key] = self._basis(c)
        self._install(key_of, bases)
        dims = [b.shape for b in bases.values()]
        log.info("null-space guard: %d layers, %d distinct inputs, %.0f of %.0f input "
                 "directions protected on average (eps %g), fitted on %d probes in %.1f s",
                 len(self.layers), len(bases), sum(d[1] for d in dims) / len(dims),
                 sum(d[0] for d in dims) / len(dims), self.eps, len(sequences),
                 time.perf_counter() - t0)

    def _install(self, key_of: dict[str, str], bases: dict[str, torch.Tensor]) -> None:
        for name, module in self.layers.items():
            module.null_guard_basis = bases[key_of[name]].to(module.weight.device,
                                                             torch.float32)
            module.forward = types.MethodType(_projected_forward, module)
        self.key_of, self.bases = key_of, bases
        self.fitted = True

    def save(self, path: Path, tag: str) -> None:
        """The fitted bases (fp16: they are orthonormal directions, not values to add);
        `tag` names what they were fitted on."""
        save_atomic({"method": METHOD, "eps": self.eps, "tag": tag, "key_of": self.key_of,
                     "bases": {k: b.to("cpu", torch.float16) for k, b in self.bases.items()}},
                    path)

    def load(self, path: Path, tag: str, pace: Pace = contextlib.nullcontext) -> bool:
        """Install bases fitted earlier on `tag` for these layers and this eps; False if they
        do not fit (another model, probe set, eps or way of fitting). `pace()`: as in fit."""
        saved = torch.load(path, weights_only=True)
        if saved.get("method") != METHOD or saved["eps"] != self.eps or \
                saved["tag"] != tag or set(saved["key_of"]) != set(self.layers):
            return False
        # Kept in fp16, a basis is orthonormal to ~1e-3 only, and I - B Bᵀ then lets ~0.1% of
        # an update into the directions it protects: orthonormalised again (same span).
        bases = {}
        for k, b in saved["bases"].items():
            with pace():
                bases[k] = torch.linalg.qr(b.float())[0].contiguous()
        self._install(saved["key_of"], bases)
        log.info("null-space guard: %d layers, bases from %s", len(self.layers), path)
        return True

    def _basis(self, cov: torch.Tensor) -> torch.Tensor:
        """Top eigenvectors holding all but eps of the covariance's energy (d x r, fp32).
        fp32 suffices: only the split at 1 - eps of the energy matters, not the small
        eigenvalues' digits (and it is 3.5x faster than fp64 on a CPU)."""
        values, vectors = torch.linalg.eigh(cov.float())
        values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
        energy = values.cumsum(0) / values.sum().clamp_min(1e-30)
        r = int((energy < 1 - self.eps).sum()) + 1
        return vectors[:, :r].float().contiguous()

    def remove(self) -> None:
        for module in self.layers.values():
            if "forward" in module.__dict__:
                del module.forward
            module.__dict__.pop("null_guard_basis", None)
        self.fitted = False
