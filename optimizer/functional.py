"""The APOLLO step as functions of explicit tensors and hyper-parameters, in the shape of
torch.optim.adam.adam(): the Apollo class keeps the state and calls these.

A step has three phases, because whether it is valid (every gradient finite) is known only
once every group's gradient norms are:

1. `project` (matrices) and `grad_norms` (the rest), per group: R and this rank's ||G||;
2. `all_finite`, over all groups: the whole tensors' norms and the step-valid flag `ok`;
3. `apollo` (matrices) and `adamw` (the rest), per group: moments, scaling, limiter and step
   counters, all masked by `ok` on the device; they return the writes (`Update`), which
   `write_` applies. Only that last part touches the weights, so serving waits only for it.

torch's speed flags pick the variants: `foreach` the multi-tensor ops (torch._foreach_*) or a
loop of single-tensor ops (equal values on the CPU); `fused` the Triton kernels
(optimizer/kernels.py); `capturable` decides projection refreshes on the device. torch's
variants each restate Adam; here they differ in a few list operations only, so the algorithm
is written once and the variants are those operations.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn import Parameter

from optimizer.kernels import DEFAULT_TILES, ProjectionTiles, project_rank1_
from optimizer.kernels import write_ as write_kernel_
from optimizer.maths import SCALE_EPS, bias_corrected_lr, channel_dim, norm_limiter, project_into
from optimizer.sharding import UNSHARDED, Reductions


class Update(NamedTuple):
    """One parameter's write: W <- (W + coef * direction) * (1 - decay) if the step is valid."""

    param: Tensor  # this rank's tensor, written in place
    direction: Tensor
    coef: Tensor
    decay: float
    stochastic: bool
    stream: int  # the parameter's own stream of rounding bits
    fused: bool | None


def write_(update: Update, ok: Tensor, rounding_seed: Tensor) -> None:
    write_kernel_(update.param, update.direction, update.coef, update.decay, ok,
                  update.stochastic, rounding_seed, update.stream, update.fused)


def project(params: list[Tensor], grads: list[Tensor], projs: list[Tensor], *, rank: int,
            scale_type: str, foreach: bool | None = None, fused: bool | None = None,
            tiles: ProjectionTiles = DEFAULT_TILES, reductions: Reductions = UNSHARDED
            ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """R = the projected gradient of each matrix, as views of one fp32 buffer (returned too,
    so that a bad step is zeroed in one go), and this rank's ||G|| (per channel for channel
    scaling). APOLLO-Mini's rank-1 projection gives ||G|| in the same pass over G."""
    grads = [reductions.local(g) for g in grads]
    shapes = [reductions.low_rank_shape(p, rank) for p in params]
    flat = torch.empty(sum(a * b for a, b in shapes), dtype=torch.float32,
                       device=grads[0].device)
    lows = [v.view(s) for v, s in zip(flat.split([a * b for a, b in shapes]), shapes,
                                      strict=True)]
    if rank == 1 and scale_type == "tensor" and all(reductions.shard(p) is None
                                                    for p in params):
        return flat, lows, project_rank1_(grads, projs, flat, fused=fused, tiles=tiles,
                                          foreach=_foreach(foreach, grads))
    for p, g, proj, low in zip(params, grads, projs, lows, strict=True):
        # the matrix's orientation: a shard's own shape may be oriented otherwise
        project_into(g, proj, low, along_rows=p.shape[0] >= p.shape[1])
        reductions.sum_partials_(p, low)
    return flat, lows, grad_norms(params, grads, per_channel=scale_type == "channel",
                                  foreach=foreach, reductions=reductions)


def grad_norms(params: list[Tensor], grads: list[Tensor], *, per_channel: bool,
               foreach: bool | None = None, reductions: Reductions = UNSHARDED
               ) -> list[Tensor]:
    """This rank's ||G|| (fp32) of each parameter: per channel of each matrix if
    `per_channel`, else 0-d."""
    grads = [reductions.local(g) for g in grads]
    if not grads:
        return []
    if not per_channel:
        return _norms(grads, _foreach(foreach, grads), torch.float32)
    return [torch.linalg.vector_norm(g, dim=channel_dim(p.shape), dtype=torch.float32)
            for p, g in zip(params, grads, strict=True)]


def all_finite(params: list[Tensor], norms: list[Tensor],
               reductions: Reductions = UNSHARDED) -> tuple[Tensor, list[Tensor]]:
    """The step-valid flag, from the whole tensors' gradient norms (returned too): the norms
    APOLLO needs anyway double as the finiteness check (a norm is finite iff every element
    is, barring fp32 overflow, which is as destructive)."""
    norms = reductions.grad_norms(params, norms)
    return torch.cat([n.reshape(-1) for n in norms]).isfinite().all(), norms


def apollo(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
           exp_avg_sqs: list[Tensor], projs: list[Tensor], update_norms: list[Tensor],
           state_steps: list[Tensor], streams: list[int], *, projected: Tensor,
           lows: list[Tensor], norms: list[Tensor], ok: Tensor, rank: int, scale: float,
           scale_type: str, update_proj_gap: int, lr: float, beta1: float, beta2: float,
           eps: float, weight_decay: float, stochastic_rounding: bool,
           foreach: bool | None = None, fused: bool | None = None, capturable: bool = False,
           reductions: Reductions = UNSHARDED) -> list[Update]:
    """APOLLO for one group's matrices, given `project`'s R (`projected`, viewed as `lows`)
    and `all_finite`'s norms and flag: Adam moments of R, the scaling of G they give, the
    norm-growth limiter, step counters; with `capturable`, the projection refresh."""
    foreach = _foreach(foreach, lows)
    projected.masked_fill_(~ok, 0.0)  # every R of the group: zero where the step is invalid
    normed = adam_moments_(exp_avgs, exp_avg_sqs, lows, ok, beta1, beta2, eps, foreach=foreach)
    scaling = _tensor_scaling if scale_type == "tensor" else _channel_scaling
    factors, update_norm = scaling(params, normed, lows, norms, foreach, reductions)
    previous = torch.stack(update_norms)
    limiter = norm_limiter(update_norm, previous)
    _copy_(update_norms, list(torch.where(ok, update_norm / limiter, previous).unbind(0)),
           foreach)
    t, lr_t = _advance_steps_(state_steps, ok, lr, beta1, beta2, foreach)
    if capturable:  # refresh decided on the device, for the next step
        _redraw_projections_(projs, t, ok, rank, update_proj_gap, foreach)
    scaled = -math.sqrt(scale) * lr_t / limiter
    decay = lr * weight_decay
    return [Update(reductions.local(p), reductions.local(g), f * s, decay, stochastic_rounding,
                   i, fused)
            for p, g, f, s, i in zip(params, grads, factors, scaled.unbind(0), streams,
                                     strict=True)]


def adamw(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
          exp_avg_sqs: list[Tensor], state_steps: list[Tensor], streams: list[int], *,
          ok: Tensor, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
          stochastic_rounding: bool, foreach: bool | None = None, fused: bool | None = None,
          reductions: Reductions = UNSHARDED) -> list[Update]:
    """AdamW (decoupled decay) for the parameters APOLLO does not project, with APOLLO's
    betas, eps and bias correction folded into the step size."""
    grads = [torch.where(ok, reductions.local(g).float(), 0.0) for g in grads]
    foreach = _foreach(foreach, grads)
    directions = adam_moments_(exp_avgs, exp_avg_sqs, grads, ok, beta1, beta2, eps,
                               foreach=foreach)
    _, lr_t = _advance_steps_(state_steps, ok, lr, beta1, beta2, foreach)
    decay = lr * weight_decay
    return [Update(reductions.local(p), d, -s, decay, stochastic_rounding, i, fused)
            for p, d, s, i in zip(params, directions, lr_t.unbind(0), streams, strict=True)]


def adam_moments_(exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], grads: list[Tensor],
                  ok: Tensor, beta1: float, beta2: float, eps: float, *, foreach: bool
                  ) -> list[Tensor]:
    """Advance Adam's moments and return M / (sqrt(V) + eps), uncorrected: the bias
    correction is folded into the step size, as in the reference. `grads` must be zero where
    `ok` is false: the betas become 1 and the moments stay bit-identical."""
    b1, b2 = torch.where(ok, beta1, 1.0), torch.where(ok, beta2, 1.0)
    if not foreach:
        return _single_tensor_moments_(exp_avgs, exp_avg_sqs, grads, b1, b2, beta1, beta2, eps)
    torch._foreach_mul_(exp_avgs, b1)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, b2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, eps)
    return list(torch._foreach_div(exp_avgs, denom))


def _single_tensor_moments_(exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                            grads: list[Tensor], b1: Tensor, b2: Tensor, beta1: float,
                            beta2: float, eps: float) -> list[Tensor]:
    out = []
    for m, v, g in zip(exp_avgs, exp_avg_sqs, grads, strict=True):
        m.mul_(b1).add_(g, alpha=1 - beta1)
        v.mul_(b2).addcmul_(g, g, value=1 - beta2)
        out.append(m.div(v.sqrt().add_(eps)))
    return out


def _tensor_scaling(params: list[Tensor], normed: list[Tensor], lows: list[Tensor],
                    norms: list[Tensor], foreach: bool, reductions: Reductions
                    ) -> tuple[list[Tensor], Tensor]:
    """One factor per matrix, ||M / (sqrt(V) + eps)|| / ||R||, and the update's norm."""
    r_norms = reductions.low_norms(params, torch.stack([*_norms(normed, foreach),
                                                        *_norms(lows, foreach)]))
    factors = r_norms[:len(params)] / (r_norms[len(params):] + SCALE_EPS)
    return list(factors.unbind(0)), torch.stack(norms) * factors


def _channel_scaling(params: list[Tensor], normed: list[Tensor], lows: list[Tensor],
                     norms: list[Tensor], foreach: bool, reductions: Reductions
                     ) -> tuple[list[Tensor], Tensor]:
    """One factor per channel of each matrix, and the update's norm ||G * f||, from the
    per-channel norms of G without materialising G * f."""
    factors, update_norms = [], []
    for p, r_tilde, low, norm in zip(params, normed, lows, norms, strict=True):
        dim = channel_dim(p.shape)
        f = r_tilde.norm(dim=dim) / (low.norm(dim=dim) + SCALE_EPS)
        f = f.unsqueeze(1) if dim == 1 else f
        update_norms.append((norm.view_as(f) * f).norm())
        factors.append(f)
    return factors, reductions.low_norms(params, torch.stack(update_norms))


def _advance_steps_(state_steps: list[Tensor], ok: Tensor, lr: float, beta1: float,
                    beta2: float, foreach: bool) -> tuple[Tensor, Tensor]:
    """t += 1 where the step is valid; (t, the bias-corrected step size) per parameter."""
    t = torch.stack(state_steps) + ok  # (_foreach_add_ with a tensor scalar syncs on CUDA)
    _copy_(state_steps, list(t.unbind(0)), foreach)
    return t, bias_corrected_lr(lr, beta1, beta2, t)


def _redraw_projections_(projs: list[Tensor], t: Tensor, ok: Tensor, rank: int, gap: int,
                         foreach: bool) -> None:
    """Where t reached a multiple of `gap`, P becomes a fresh N(0, 1/r) draw from torch's
    default generator (graph-safe, unlike the seed chain): a lerp by exactly 0 or 1 keeps P
    or takes the draw, without a host decision."""
    fresh = torch.randn(sum(p.numel() for p in projs), device=projs[0].device)
    fresh = fresh.div_(math.sqrt(rank)).split([p.numel() for p in projs])
    due = (ok & (torch.remainder(t, gap) == 0)).float()
    _lerp_(projs, [f.view_as(p) for f, p in zip(fresh, projs, strict=True)],
           list(due.unbind(0)), foreach)


def _foreach(foreach: bool | None, tensors: list[Tensor]) -> bool:
    """None: the multi-tensor ops wherever torch has them for the tensors' type; on the CPU
    too (unlike torch's default), where they run the per-tensor loop in C++."""
    if foreach is not None:
        return foreach
    return all(type(t) in (Tensor, Parameter) for t in tensors)


def _norms(tensors: list[Tensor], foreach: bool, dtype: torch.dtype | None = None
           ) -> list[Tensor]:
    if foreach:
        return list(torch._foreach_norm(tensors, 2, dtype=dtype))
    return [torch.linalg.vector_norm(t, 2, dtype=dtype) for t in tensors]


def _copy_(targets: list[Tensor], sources: list[Tensor], foreach: bool) -> None:
    if foreach:
        torch._foreach_copy_(targets, sources)
    else:
        for target, source in zip(targets, sources, strict=True):
            target.copy_(source)


def _lerp_(tensors: list[Tensor], ends: list[Tensor], weights: list[Tensor],
           foreach: bool) -> None:
    if foreach:
        torch._foreach_lerp_(tensors, ends, weights)
    else:
        for t, end, w in zip(tensors, ends, weights, strict=True):
            t.lerp_(end, w)
