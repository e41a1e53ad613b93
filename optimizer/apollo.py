"""APOLLO and APOLLO-Mini (Zhu et al., arXiv:2412.05270), as a torch.optim.Optimizer.

APOLLO keeps Adam's moments only for a random rank-r projection of each matrix's gradient and
uses them to derive a per-channel (or, for Mini, per-tensor) scaling of the *raw* gradient.
State per m x n matrix is 2 * max(m, n) * r + 2 numbers instead of AdamW's 2 * m * n.

The math follows the authors' reference code (apollo-torch 1.0.3) step for step, so that the
two can be compared number for number (tests/test_optimizer_reference.py):

* projection P ~ N(0, 1/r), regenerated from a per-parameter seed (never stored); the seed of
  parameter i (1-based, counted over all groups) starts at i and advances with `next_seed`
  every `update_proj_gap` steps;
* Adam moments on the projected gradient R, bias correction folded into the step size;
* scaling s = ||M / (sqrt(V) + eps)|| / (||R|| + 1e-8), per channel of the larger dimension
  ("channel") or per tensor ("tensor");
* update = sqrt(scale) * G * s, clipped by the norm-growth limiter (gamma = 1.01);
* W -= lr_t * update, then W -= lr * weight_decay * W.

Parameters that are not matrices, and matrices in a group with ``apollo=False`` (embeddings,
LM head), get AdamW with the same betas, eps and bias correction.

``step()`` is ``prepare()`` — moments, coefficients, limiter; reads gradients only — then
``apply()``, the in-place write: one fused ``addcmul_`` pass per parameter. A live trainer
runs ``prepare()`` while serving goes on and holds serving off only for ``apply()``.
``layerwise()`` instead steps each parameter during backward, as soon as its gradient exists.

bf16/fp16 weights: an in-place ``W -= lr * u`` at lr 1e-5 rounds most elements back to where
they were. With ``stochastic_rounding=True`` (default) the new value is computed in fp32 and
rounded up or down at random, in proportion to the distance, so small updates survive on
average.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

NORM_GROWTH_LIMIT = 1.01
SCALE_EPS = 1e-8


def next_seed(seed: int, adv: int = 0xF) -> int:
    """The reference's seed advance: the last of `adv` int64 draws from a CPU generator."""
    gen = torch.Generator().manual_seed(seed)
    return int(torch.randint(0, torch.iinfo(torch.int64).max, (adv,), generator=gen)[-1])


def projection(shape: tuple[int, int], rank: int, seed: int, device, dtype=torch.float32) -> Tensor:
    """The rank-r Gaussian projection for a gradient of `shape`, from its seed.

    m >= n: P is r x n and R = G @ P.T; m < n: P is m x r and R = P.T @ G.
    """
    m, n = shape
    pshape = (rank, n) if m >= n else (m, rank)
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(pshape, generator=gen, device=device, dtype=dtype) / math.sqrt(rank)


def project(grad: Tensor, proj: Tensor) -> Tensor:
    m, n = grad.shape
    return grad @ proj.t() if m >= n else proj.t() @ grad


def copy_stochastic_(target: Tensor, source: Tensor) -> None:
    """Round fp32 `source` into bf16 `target`, up or down at random (unbiased)."""
    noise = torch.randint_like(source, 0, 1 << 16, dtype=torch.int32)
    noise.add_(source.view(torch.int32)).bitwise_and_(-65536)
    target.copy_(noise.view(torch.float32))


def _write(param: Tensor, new_value_fp32: Tensor, stochastic: bool) -> None:
    if stochastic:
        copy_stochastic_(param, new_value_fp32)
    else:
        param.copy_(new_value_fp32)


def channel_dim(shape: tuple[int, ...]) -> int:
    """The dimension APOLLO reduces over: channels run along the larger one."""
    return 0 if shape[0] < shape[1] else 1


def grad_norms(grad: Tensor, scale_type: str) -> Tensor:
    """||grad|| per channel ("channel") or as a 0-d tensor ("tensor")."""
    return grad.norm(dim=channel_dim(grad.shape)) if scale_type == "channel" else grad.norm()


def adam_update(grad: Tensor, state: dict[str, Any], *, beta1: float, beta2: float,
                eps: float) -> Tensor:
    """Adam's moments on `grad` (advanced in `state`) and M / (sqrt(V) + eps), uncorrected:
    the bias correction is folded into the step size, as in the reference."""
    if "exp_avg" not in state:
        state["exp_avg"] = torch.zeros_like(grad)
        state["exp_avg_sq"] = torch.zeros_like(grad)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    return exp_avg / exp_avg_sq.sqrt().add_(eps)


def apollo_scale(
    grad: Tensor, state: dict[str, Any], *, rank: int, scale: float, scale_type: str,
    update_proj_gap: int, beta1: float, beta2: float, eps: float, norms: Tensor | None = None,
) -> Tensor:
    """APOLLO's per-channel (m x 1 or n) or per-tensor (0-d) coefficient c, such that the
    update is ``grad * c``: the gradient scaling, the norm-growth limiter and sqrt(scale)
    folded together. Advances `state`; reads `grad` only, never the weight."""
    step = state["step"]
    if step % update_proj_gap == 0:  # refresh: a new seed, hence a new projection
        state["proj_seed"] = state["seed"] if step == 0 else next_seed(state["proj_seed"])
    proj = projection(tuple(grad.shape), rank, state["proj_seed"], grad.device)
    low = project(grad, proj)
    normed = adam_update(low, state, beta1=beta1, beta2=beta2, eps=eps)

    if norms is None:
        norms = grad_norms(grad, scale_type)
    if scale_type == "channel":
        norm_dim = channel_dim(grad.shape)
        factor = normed.norm(dim=norm_dim) / (low.norm(dim=norm_dim) + SCALE_EPS)
        if norm_dim == 1:
            factor = factor.unsqueeze(1)
        # ||grad * factor|| without materialising it: per-channel norms of grad.
        update_norm = (norms.view_as(factor) * factor).norm()
    elif scale_type == "tensor":
        factor = normed.norm() / (low.norm() + SCALE_EPS)
        update_norm = norms * factor
    else:
        raise ValueError(f"scale_type must be 'channel' or 'tensor', got {scale_type!r}")

    # Norm-growth limiter (Fira): ||u_t|| <= gamma * ||u_{t-1}||, kept on device (no sync).
    if "update_norm" in state:
        limiter = (update_norm / (state["update_norm"] + SCALE_EPS)).clamp(min=NORM_GROWTH_LIMIT)
        limiter = limiter / NORM_GROWTH_LIMIT
        factor = factor / limiter
        state["update_norm"] = update_norm / limiter
    else:
        state["update_norm"] = update_norm
    return factor * math.sqrt(scale)


class Apollo(Optimizer):
    """APOLLO for matrices, AdamW for everything else.

    Defaults are the paper's / reference code's: betas (0.9, 0.999), eps 1e-6, rank 256,
    channel-wise scaling, scale 1, projection refreshed every 200 steps.

    A group with ``apollo=False`` is plain AdamW (put embeddings and the LM head there, as the
    paper does). A step with a non-finite gradient anywhere changes nothing and is counted in
    ``skipped_steps``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        rank: int = 256,
        scale: float = 1.0,
        scale_type: str = "channel",
        update_proj_gap: int = 200,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        stochastic_rounding: bool = True,
        apollo: bool = True,
    ):
        if lr < 0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if rank < 1:
            raise ValueError(f"Invalid rank: {rank}")
        if scale_type not in ("channel", "tensor"):
            raise ValueError(f"scale_type must be 'channel' or 'tensor', got {scale_type!r}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid betas: {betas}")
        defaults = dict(lr=lr, rank=rank, scale=scale, scale_type=scale_type,
                        update_proj_gap=update_proj_gap, betas=betas, eps=eps,
                        weight_decay=weight_decay, stochastic_rounding=stochastic_rounding,
                        apollo=apollo)
        super().__init__(params, defaults)
        self.skipped_steps = 0
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                index += 1
                if p.requires_grad:
                    self.state[p]["seed"] = index

    @staticmethod
    def _uses_apollo(group: dict[str, Any], p: Tensor) -> bool:
        return bool(group["apollo"]) and p.dim() == 2

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.prepare():
            self.apply()
        return loss

    @torch.no_grad()
    def prepare(self) -> bool:
        """Everything but the weight write: moments, scaling coefficients, limiter. Reads
        gradients only, so it may run while vLLM serves; returns False (and changes nothing)
        when a gradient is not finite."""
        self._pending: list[tuple[Tensor, dict, Tensor, Tensor | None, float]] = []
        # The gradient norms APOLLO needs anyway double as the finiteness check (a norm is
        # finite iff every element is, barring fp32 overflow, which is as destructive).
        norms = {p: grad_norms(p.grad.float(), g["scale_type"] if self._uses_apollo(g, p)
                               else "tensor")
                 for g in self.param_groups for p in g["params"] if p.grad is not None}
        if not norms:
            return False
        finite = torch.stack([n.isfinite().all() for n in norms.values()]).all()
        if not bool(finite):  # one host sync per step: nothing is touched on a bad step
            self.skipped_steps += 1
            return False
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._pending.append(self._prepare_param(p, group, norms[p]))
        return True

    def _prepare_param(self, p: Tensor, group: dict, norms: Tensor | None = None) -> tuple:
        beta1, beta2 = group["betas"]
        state = self.state[p]
        state.setdefault("step", 0)
        state.setdefault("seed", 0)
        grad = p.grad.float()
        if self._uses_apollo(group, p):
            coef = apollo_scale(
                grad, state, rank=group["rank"], scale=group["scale"],
                scale_type=group["scale_type"], update_proj_gap=group["update_proj_gap"],
                beta1=beta1, beta2=beta2, eps=group["eps"], norms=norms)
            direction = p.grad
        else:
            coef, direction = None, adam_update(grad, state, beta1=beta1, beta2=beta2,
                                                eps=group["eps"])
        state["step"] += 1
        t = state["step"]
        step_size = group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        return p, group, direction, coef, step_size

    @staticmethod
    def _apply_param(p: Tensor, group: dict, direction: Tensor, coef: Tensor | None,
                     step_size: float) -> None:
        wd = group["lr"] * group["weight_decay"]
        stochastic = group["stochastic_rounding"] and p.dtype == torch.bfloat16
        target = p if p.dtype == torch.float32 else p.float()
        if coef is None:
            target.add_(direction, alpha=-step_size)
        else:
            target.addcmul_(direction, coef, value=-step_size)
        if wd:
            target.add_(target, alpha=-wd)
        if target is not p:
            _write(p, target, stochastic)

    @torch.no_grad()
    def apply(self) -> None:
        """The in-place write prepared by prepare(): one fused pass per parameter."""
        for pending in self._pending:
            self._apply_param(*pending)
        self._pending = []

    def layerwise(self, write_guard=contextlib.nullcontext) -> list:
        """Layer-wise mode: each parameter is stepped (under `write_guard()`) as soon as its
        gradient is accumulated during backward, and its gradient freed, so the model's
        gradients never exist all at once. One accumulation step per backward. A parameter
        whose gradient is not finite is skipped (counted in skipped_params); the others of
        that backward are still updated. Returns the hook handles (call .remove() to stop)."""
        self.skipped_params = 0

        @torch.no_grad()
        def hook(p: Tensor) -> None:
            if not bool(torch.isfinite(p.grad).all()):
                self.skipped_params += 1
            else:
                pending = self._prepare_param(p, self._group_of[p])
                with write_guard():
                    self._apply_param(*pending)
            p.grad = None

        self._group_of = {p: g for g in self.param_groups for p in g["params"]}
        return [p.register_post_accumulate_grad_hook(hook)
                for p in self._group_of if p.requires_grad]


class ApolloMini(Apollo):
    """APOLLO-Mini: rank 1, one scaling factor per tensor, scale 128 (alpha = sqrt(128))."""

    def __init__(self, params, lr: float = 1e-3, **kwargs):
        kwargs.setdefault("rank", 1)
        kwargs.setdefault("scale", 128.0)
        kwargs.setdefault("scale_type", "tensor")
        super().__init__(params, lr=lr, **kwargs)
