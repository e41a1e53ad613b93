"""APOLLO and APOLLO-Mini (Zhu et al., arXiv:2412.05270), as a torch.optim.Optimizer.

APOLLO keeps Adam's moments only for a random rank-r projection of each matrix's gradient and
uses them to derive a per-channel (or, for Mini, per-tensor) scaling of the *raw* gradient.
State per m x n matrix: the moments, 2 * max(m, n) * r numbers, the projection, min(m, n) * r,
and two scalars, instead of AdamW's 2 * m * n.

The maths follows the authors' reference code (apollo-torch 1.0.3) step for step, so the two
can be compared number for number (tests/test_optimizer.py):

* projection P ~ N(0, 1/r) from a per-parameter seed; the seed of parameter i (1-based,
  counted over all groups) starts at i and advances with `next_seed` every `update_proj_gap`
  steps. P is stored (min(m, n) * r numbers) rather than regenerated every step: one
  generator launch per matrix per step costs more than it saves;
* Adam moments on the projected gradient R, bias correction folded into the step size;
* scaling s = ||M / (sqrt(V) + eps)|| / (||R|| + 1e-8), per channel of the larger dimension
  ("channel") or per tensor ("tensor");
* update = sqrt(scale) * G * s, clipped by the norm-growth limiter (gamma = 1.01);
* W -= lr_t * update, then W -= lr * weight_decay * W.

Parameters that are not matrices, and matrices in a group with ``apollo=False`` (embeddings,
LM head), get AdamW with the same betas, eps and bias correction.

No host synchronisation: whether the step is valid (all gradients finite) is a device flag
that masks every state update and the weight write, step counters live on the device, and the
per-parameter scalar maths runs on stacked vectors with multi-tensor (foreach) ops. With
``capturable=True`` the projection refresh is decided on the device too, so ``step()`` can be
captured in a CUDA graph; refreshed projections then come from torch's default generator
(graph-safe) instead of the seed chain: same distribution, other numbers. Without it, refresh
follows the host's count of steps asked of each matrix (``state["calls"]``: the one entry a
skipped step advances, since the host cannot know it was skipped without a sync), as in the
reference when no step is skipped.

``step()`` is ``prepare()`` — moments, coefficients, limiter; reads gradients only — then
``apply()``, the in-place write (optimizer/kernels.py: one fused pass per parameter). A live
trainer runs ``prepare()`` while serving goes on and holds serving off only for ``apply()``.
``layerwise()`` instead steps each parameter during backward, as soon as its gradient exists.

Tensor parallelism: DTensor parameters are stepped shard by shard, with the few
collectives that make the result equal to the unsharded step (optimizer/sharding.py).

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

from optimizer.functional import (
    SCALE_EPS,
    adam_moments_,
    bias_corrected_lr,
    channel_dim,
    low_rank_shape,
    next_seed,
    norm_limiter,
    project_into,
    projection,
)
from optimizer.kernels import project_rank1_, write_
from optimizer.sharding import (
    MatrixShard,
    all_reduce_norms,
    all_reduce_sum_,
    local,
    local_low_rank_shape,
    local_projection,
    shard_of,
    splits_projection,
)

Pending = tuple[Tensor, Tensor, Tensor, float, bool, int]  # p, direction, coef, decay, sr, index


class Apollo(Optimizer):
    """APOLLO for matrices, AdamW for everything else.

    Defaults are the paper's / reference code's: betas (0.9, 0.999), eps 1e-6, rank 256,
    channel-wise scaling, scale 1, projection refreshed every 200 steps.

    A group with ``apollo=False`` is plain AdamW (put embeddings and the LM head there, as the
    paper does). A step with a non-finite gradient anywhere changes no weight and no state
    and is counted in ``skipped_steps``.
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
        capturable: bool = False,
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
        self.capturable = capturable
        self._index: dict[Tensor, int] = {}
        # Tensor parallelism: DTensor parameters sharded across ranks (optimizer/sharding.py)
        self._shards: dict[Tensor, MatrixShard] = {}
        for group in self.param_groups:
            for p in group["params"]:
                self._index[p] = len(self._index) + 1
                if p.requires_grad:
                    self.state[p]["seed"] = self._index[p]
                if (shard := shard_of(p)) is not None:
                    self._shards[p] = shard
        if self._shards and capturable:
            raise ValueError("capturable=True draws refreshed projections from each device's "
                             "own generator; with sharded (DTensor) parameters they would "
                             "differ between ranks")
        self._skipped: Tensor | None = None  # device counters: reading them is the sync
        self._skipped_params: Tensor | None = None
        self._rounding_seed: Tensor | None = None
        self._pending: list[Pending] = []

    @property
    def skipped_steps(self) -> int:
        return 0 if self._skipped is None else int(self._skipped)

    @property
    def skipped_params(self) -> int:
        return 0 if self._skipped_params is None else int(self._skipped_params)

    @staticmethod
    def _uses_apollo(group: dict[str, Any], p: Tensor) -> bool:
        return bool(group["apollo"]) and p.dim() == 2

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.prepare()
        self.apply()
        return loss

    @torch.no_grad()
    def prepare(self) -> Tensor | None:
        """Everything but the weight write: moments, scaling coefficients, limiter. Reads
        gradients only, so it may run while vLLM serves. Returns the device flag saying
        whether the step is valid (every gradient finite); if not, nothing changes."""
        work = [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]
        work = [(g, ps) for g, ps in work if ps]
        if not work:
            self._pending = []
            return None
        ok, self._pending = self._prepare(work)
        self._skipped = self._count(self._skipped, ok)
        return ok

    @torch.no_grad()
    def apply(self) -> None:
        """The in-place write prepared by prepare(): one fused pass per parameter."""
        for p, direction, coef, decay, stochastic, index in self._pending:
            write_(p, direction, coef, decay, self._ok, stochastic, self._rounding_seed, index)
        self._pending = []

    def layerwise(self, write_guard=contextlib.nullcontext) -> list:
        """Layer-wise mode: each parameter is stepped (under `write_guard()`) as soon as its
        gradient is accumulated during backward, and its gradient freed, so the model's
        gradients never exist all at once. One accumulation step per backward. A parameter
        whose gradient is not finite is skipped (counted in skipped_params); the others of
        that backward are still updated. Returns the hook handles (call .remove() to stop)."""
        if self._shards:
            raise NotImplementedError("layer-wise mode with sharded (tensor-parallel) "
                                      "parameters: the ranks' hooks would need matching "
                                      "collectives per parameter; use the standard mode")
        group_of = {p: g for g in self.param_groups for p in g["params"]}

        @torch.no_grad()
        def hook(p: Tensor) -> None:
            ok, pending = self._prepare([(group_of[p], [p])])
            self._skipped_params = self._count(self._skipped_params, ok)
            with write_guard():
                for q, direction, coef, decay, stochastic, index in pending:
                    write_(q, direction, coef, decay, ok, stochastic, self._rounding_seed,
                           index)
            p.grad = None

        return [p.register_post_accumulate_grad_hook(hook)
                for p in group_of if p.requires_grad]

    @staticmethod
    def _count(counter: Tensor | None, ok: Tensor) -> Tensor:
        return (~ok).long() if counter is None else counter.add_(~ok)

    def _prepare(self, work: list[tuple[dict, list[Tensor]]]) -> tuple[Tensor, list[Pending]]:
        norms: dict[Tensor, Tensor] = {}  # ||G|| per parameter (per channel: see _grad_norms)
        projected = []  # per group: (matrices, their projections) and the other parameters
        for group, ps in work:
            for p in ps:
                if "step" not in self.state[p]:
                    self._init_state(p, group)
            mats = [p for p in ps if self._uses_apollo(group, p)]
            others = [p for p in ps if not self._uses_apollo(group, p)]
            projected.append((mats, self._project(group, mats, norms) if mats else None,
                              others))
        self._grad_norms(work, norms)
        if self._shards:
            self._reduce_grad_norms(norms)
        # The gradient norms APOLLO needs anyway double as the finiteness check (a norm is
        # finite iff every element is, barring fp32 overflow, which is as destructive).
        ok = torch.cat([n.reshape(-1) for n in norms.values()]).isfinite().all()
        self._ok = ok
        if self._rounding_seed is None:
            self._rounding_seed = torch.randint(1 << 62, (), device=ok.device)
        self._rounding_seed.add_(1)  # fresh rounding bits every step, also in graph replays
        pending: list[Pending] = []
        for (group, _), (mats, low, others) in zip(work, projected, strict=True):
            if low is not None:
                pending += self._prepare_apollo(group, mats, *low, norms, ok)
            if others:
                pending += self._prepare_adamw(group, others, ok)
        return ok, pending

    def _grad_norms(self, work: list[tuple[dict, list[Tensor]]],
                    norms: dict[Tensor, Tensor]) -> None:
        """||G|| (0-d) per tensor, or per channel for channel-scaled APOLLO matrices, for the
        parameters whose projection did not already give it."""
        for group, ps in work:
            ps = [p for p in ps if p not in norms]
            channel = group["scale_type"] == "channel"
            per_channel = [p for p in ps if channel and self._uses_apollo(group, p)]
            whole = [p for p in ps if not (channel and self._uses_apollo(group, p))]
            if whole:
                norms.update(zip(whole, torch._foreach_norm([local(p.grad) for p in whole], 2,
                                                            dtype=torch.float32),
                                 strict=True))
            for p in per_channel:
                norms[p] = torch.linalg.vector_norm(local(p.grad), dim=channel_dim(p.shape),
                                                    dtype=torch.float32)

    def _reduce_grad_norms(self, norms: dict[Tensor, Tensor]) -> None:
        """Shards' norms -> the whole tensor's: one all-reduce for every per-tensor norm, one
        per channel-norm vector whose channels are split across ranks."""
        whole = [p for p in norms if p in self._shards and norms[p].dim() == 0]
        if whole:
            group = self._shards[whole[0]].group
            norms.update(zip(whole, all_reduce_norms(torch.stack([norms[p] for p in whole]),
                                                     group).unbind(0), strict=True))
        for p, n in list(norms.items()):
            if n.dim() and splits_projection(tuple(p.shape), self._shards.get(p)):
                norms[p] = all_reduce_norms(n, self._shards[p].group)

    def _projection(self, p: Tensor, rank: int, seed: int) -> Tensor:
        full = projection(tuple(p.shape), rank, seed, p.device)
        return local_projection(full, tuple(p.shape), self._shards.get(p))

    def _low_shape(self, p: Tensor, rank: int) -> tuple[int, int]:
        return local_low_rank_shape(low_rank_shape(tuple(p.shape), rank), self._shards.get(p),
                                    tuple(p.shape))

    def _init_state(self, p: Tensor, group: dict) -> None:
        state = self.state[p]
        state.setdefault("seed", self._index[p])
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        if self._uses_apollo(group, p):
            state["calls"] = 0
            state["proj"] = self._projection(p, group["rank"], state["seed"])
            low = self._low_shape(p, group["rank"])
            state["exp_avg"] = torch.zeros(low, dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.zeros(low, dtype=torch.float32, device=p.device)
            # inf: the limiter leaves the first update alone, as the reference does
            state["update_norm"] = torch.full((), torch.inf, device=p.device)
        else:
            state["exp_avg"] = torch.zeros_like(local(p), dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(local(p), dtype=torch.float32)

    def _project(self, group: dict, ps: list[Tensor], norms: dict[Tensor, Tensor]
                 ) -> tuple[Tensor, list[Tensor]]:
        """R for every matrix of the group, into one buffer so that a bad step can be zeroed
        in one go. APOLLO-Mini's rank-1 projection also yields ||G|| in the same pass."""
        gap, rank = group["update_proj_gap"], group["rank"]
        for p in ps:
            state = self.state[p]
            calls = state["calls"]  # steps asked of p (host-side; a skipped one counts)
            state["calls"] += 1
            if not self.capturable and calls > 0 and calls % gap == 0:  # host schedule
                state["seed"] = next_seed(state["seed"])
                state["proj"].copy_(self._projection(p, rank, state["seed"]))
        shapes = [self._low_shape(p, rank) for p in ps]
        flat = torch.empty(sum(a * b for a, b in shapes), dtype=torch.float32,
                           device=ps[0].device)
        lows = [v.view(s) for v, s in zip(flat.split([a * b for a, b in shapes]), shapes,
                                          strict=True)]
        if rank == 1 and group["scale_type"] == "tensor" and not self._shards:
            norms.update(zip(ps, project_rank1_([p.grad for p in ps],
                                                [self.state[p]["proj"] for p in ps], flat),
                             strict=True))
        else:  # (a shard's own shape may be oriented otherwise than the matrix's)
            for p, low in zip(ps, lows, strict=True):
                project_into(local(p.grad), self.state[p]["proj"], low,
                             along_rows=p.shape[0] >= p.shape[1])
                if splits_projection(tuple(p.shape), self._shards.get(p)):
                    all_reduce_sum_(low, self._shards[p].group)  # partial sums of R
        return flat, lows

    def _prepare_apollo(self, group: dict, ps: list[Tensor], flat: Tensor, lows: list[Tensor],
                        norms: dict[Tensor, Tensor], ok: Tensor) -> list[Pending]:
        beta1, beta2 = group["betas"]
        states = [self.state[p] for p in ps]
        flat.masked_fill_(~ok, 0.0)  # all R of the group: zero where the step is invalid
        normed = adam_moments_([s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                               lows, ok, beta1, beta2, group["eps"])

        if group["scale_type"] == "tensor":
            r_norms = self._reduce_low_norms(ps, torch.stack(
                [*torch._foreach_norm(normed), *torch._foreach_norm(lows)]))
            factors = r_norms[:len(ps)] / (r_norms[len(ps):] + SCALE_EPS)
            update_norm = torch.stack([norms[p] for p in ps]) * factors
            factors = list(factors.unbind(0))
        else:
            factors, update_norms = [], []
            for p, r_tilde, low in zip(ps, normed, lows, strict=True):
                dim = channel_dim(p.shape)
                f = r_tilde.norm(dim=dim) / (low.norm(dim=dim) + SCALE_EPS)
                f = f.unsqueeze(1) if dim == 1 else f
                # ||G * f|| without materialising it: per-channel norms of G
                update_norms.append((norms[p].view_as(f) * f).norm())
                factors.append(f)
            update_norm = self._reduce_low_norms(ps, torch.stack(update_norms))
        previous = torch.stack([s["update_norm"] for s in states])
        limiter = norm_limiter(update_norm, previous)
        torch._foreach_copy_([s["update_norm"] for s in states],
                             list(torch.where(ok, update_norm / limiter, previous).unbind(0)))

        t, lr_t = self._advance_steps(group, states, ok)
        if self.capturable:  # refresh decided on the device, for the next step
            projs = [s["proj"] for s in states]
            fresh = torch.randn(sum(p.numel() for p in projs), device=flat.device)
            fresh = fresh.div_(math.sqrt(group["rank"])).split([p.numel() for p in projs])
            due = (ok & (torch.remainder(t, group["update_proj_gap"]) == 0)).float()
            # lerp by exactly 0 or 1: keeps P, or takes the fresh draw; one kernel for all
            torch._foreach_lerp_(projs, [f.view_as(p) for f, p in zip(fresh, projs,
                                                                         strict=True)],
                                 list(due.unbind(0)))
        scaled = -math.sqrt(group["scale"]) * lr_t / limiter
        decay = group["lr"] * group["weight_decay"]
        stochastic = group["stochastic_rounding"]
        return [(local(p), local(p.grad), f * s, decay, stochastic, self._index[p])
                for p, f, s in zip(ps, factors, scaled.unbind(0), strict=True)]

    def _prepare_adamw(self, group: dict, ps: list[Tensor], ok: Tensor) -> list[Pending]:
        beta1, beta2 = group["betas"]
        states = [self.state[p] for p in ps]
        grads = [torch.where(ok, local(p.grad).float(), 0.0) for p in ps]
        directions = adam_moments_([s["exp_avg"] for s in states],
                                   [s["exp_avg_sq"] for s in states], grads, ok, beta1, beta2,
                                   group["eps"])
        _, lr_t = self._advance_steps(group, states, ok)
        decay = group["lr"] * group["weight_decay"]
        return [(local(p), d, -s, decay, group["stochastic_rounding"], self._index[p])
                for p, d, s in zip(ps, directions, lr_t.unbind(0), strict=True)]

    def _reduce_low_norms(self, ps: list[Tensor], norms: Tensor) -> Tensor:
        """Norms computed from R-sized (row-/column-sharded) pieces, over the whole matrix:
        `norms` holds one or more entries per parameter of `ps`, in order, repeated."""
        sharded = [i for i, p in enumerate(ps) if p in self._shards and
                   not splits_projection(tuple(p.shape), self._shards[p])]
        if not sharded:
            return norms
        index = torch.tensor([i + k * len(ps) for k in range(len(norms) // len(ps))
                              for i in sharded], device=norms.device)
        reduced = all_reduce_norms(norms[index], self._shards[ps[sharded[0]]].group)
        return norms.index_copy(0, index, reduced)

    @staticmethod
    def _advance_steps(group: dict, states: list[dict], ok: Tensor) -> tuple[Tensor, Tensor]:
        """t += 1 where the step is valid; (t, the bias-corrected step size) per parameter."""
        steps = [s["step"] for s in states]
        t = torch.stack(steps) + ok  # (_foreach_add_ with a tensor scalar syncs on CUDA)
        torch._foreach_copy_(steps, list(t.unbind(0)))
        beta1, beta2 = group["betas"]
        return t, bias_corrected_lr(group["lr"], beta1, beta2, t)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but the state keeps its own dtype: torch casts floating state to the
        parameter's dtype, which would round a bf16 weight's fp32 moments to bf16."""
        super().load_state_dict(state_dict)
        saved = state_dict["state"]
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups,
                                      strict=True):
            for pid, p in zip(saved_group["params"], group["params"], strict=True):
                for key, value in saved.get(pid, {}).items():
                    if torch.is_tensor(value):
                        self.state[p][key] = value.to(p.device, copy=True)


class ApolloMini(Apollo):
    """APOLLO-Mini: rank 1, one scaling factor per tensor, scale 128 (alpha = sqrt(128))."""

    def __init__(self, params, lr: float = 1e-3, **kwargs):
        kwargs.setdefault("rank", 1)
        kwargs.setdefault("scale", 128.0)
        kwargs.setdefault("scale_type", "tensor")
        super().__init__(params, lr=lr, **kwargs)
