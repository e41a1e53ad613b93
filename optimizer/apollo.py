"""APOLLO and APOLLO-Mini (Zhu et al., arXiv:2412.05270), as a torch.optim.Optimizer.

Adam's moments kept only for a random low-rank projection of each matrix's gradient: about
AdamW's training for a sliver of its state, so that a trainer fits beside vLLM. Here are the
state and the host's schedule, shaped like torch.optim.Adam; the maths is in
optimizer/functional.py; docs/optimizer.md explains both."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

import optimizer.functional as F
from optimizer.kernels import DEFAULT_TILES, ProjectionTiles, require_triton
from optimizer.sharding import UNSHARDED, Reductions, reductions_for
from optimizer.state import init_state_, refresh_on_schedule_

FLAG_DEFAULTS = {"foreach": None, "fused": None, "capturable": False, "tiles": DEFAULT_TILES}


class Apollo(Optimizer):
    """APOLLO for matrices, AdamW for everything else.

    Defaults are the paper's / reference code's: betas (0.9, 0.999), eps 1e-6, rank 256,
    channel-wise scaling, scale 1, projection refreshed every 200 steps. A group with
    ``apollo=False`` is plain AdamW (put embeddings and the LM head there, as the paper does).
    A step with a non-finite gradient anywhere changes no weight and no state and is counted
    in ``skipped_steps``; nothing in a step waits for the host.

    torch's flags: ``foreach`` (None: multi-tensor ops), ``fused`` (None: the Triton kernels
    where they run; True raises where they cannot), ``capturable`` (the step can be captured
    in a CUDA graph: refreshed projections then come from torch's generator, not the seed
    chain). ``tiles``: launch shapes of the fused rank-1 projection.
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
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        tiles: ProjectionTiles = DEFAULT_TILES,
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
                        apollo=apollo, foreach=foreach, fused=fused, capturable=capturable,
                        tiles=tiles)
        self._index: dict[Tensor, int] = {}  # 1-based over all groups: seeds, rounding streams
        self._reductions: Reductions = UNSHARDED  # picked again as groups are added
        super().__init__(params, defaults)
        self._skipped: Tensor | None = None  # device counters: reading them is the sync
        self._skipped_params: Tensor | None = None
        self._rounding_seed: Tensor | None = None
        self._ok: Tensor | None = None
        self._pending: list[F.Update] = []

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch's; also numbers the group's parameters (the seed of parameter i starts at
        i, as in the reference) and picks the reductions for all parameters so far."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            self._index[p] = len(self._index) + 1
            if p.requires_grad:
                self.state[p]["seed"] = self._index[p]
        self._reductions = reductions_for(p for g in self.param_groups for p in g["params"])
        # refuse at construction what a flag cannot do, as torch does for fused=True
        if self._reductions.sharded and any(g["capturable"] for g in self.param_groups):
            raise ValueError("capturable=True draws refreshed projections from each device's "
                             "own generator; with sharded (DTensor) parameters they would "
                             "differ between ranks")
        for group in self.param_groups:
            if group["fused"]:
                require_triton(self._reductions.local(p) for p in group["params"])

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Groups saved before the flags existed get their defaults (torch does the same)."""
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in FLAG_DEFAULTS.items():
                group.setdefault(key, value)

    @property
    def capturable(self) -> bool:
        """step() may be captured in a CUDA graph: every group refreshes on the device."""
        return all(group["capturable"] for group in self.param_groups)

    @property
    def skipped_steps(self) -> int:
        return 0 if self._skipped is None else int(self._skipped)

    @property
    def skipped_params(self) -> int:
        return 0 if self._skipped_params is None else int(self._skipped_params)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
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
        self._ok, self._pending = self._prepare(work)
        self._skipped = _count(self._skipped, self._ok)
        return self._ok

    @torch.no_grad()
    def apply(self) -> None:
        """The in-place write prepared by prepare(): one fused pass per parameter."""
        for update in self._pending:
            F.write_(update, self._ok, self._rounding_seed)
        self._pending = []

    def layerwise(self, write_guard: Callable[[], contextlib.AbstractContextManager] =
                  contextlib.nullcontext) -> list[RemovableHandle]:
        """Layer-wise mode: each parameter is stepped (under `write_guard()`) as soon as its
        gradient is accumulated during backward, and its gradient freed, so the model's
        gradients never exist all at once. One accumulation step per backward. A parameter
        whose gradient is not finite is skipped (counted in skipped_params); the others of
        that backward are still updated. Returns the hook handles (call .remove() to stop)."""
        if self._reductions.sharded:
            raise NotImplementedError("layer-wise mode with sharded (tensor-parallel) "
                                      "parameters: the ranks' hooks would need matching "
                                      "collectives per parameter; use the standard mode")
        group_of = {p: g for g in self.param_groups for p in g["params"]}

        @torch.no_grad()
        def hook(p: Tensor) -> None:
            ok, updates = self._prepare([(group_of[p], [p])])
            self._skipped_params = _count(self._skipped_params, ok)
            with write_guard():
                for update in updates:
                    F.write_(update, ok, self._rounding_seed)
            p.grad = None

        return [p.register_post_accumulate_grad_hook(hook)
                for p in group_of if p.requires_grad]

    def _prepare(self, work: list[tuple[dict, list[Tensor]]]) -> tuple[Tensor, list[F.Update]]:
        """The three phases of optimizer/functional.py over the groups in `work`."""
        lists = [self._init_group(group, ps) for group, ps in work]
        projected = [self._project(group, mats) for (group, _), (mats, _) in
                     zip(work, lists, strict=True)]
        ok, norm_of = self._check(work, lists, projected)
        if self._rounding_seed is None:
            self._rounding_seed = torch.randint(1 << 62, (), device=ok.device)
        self._rounding_seed.add_(1)  # fresh rounding bits every step, also in graph replays
        updates: list[F.Update] = []
        for (group, _), (mats, others), low in zip(work, lists, projected, strict=True):
            if low is not None:
                updates += F.apollo(
                    **mats, projected=low[0], lows=low[1],
                    norms=[norm_of[p] for p in mats["params"]], ok=ok, rank=group["rank"],
                    scale=group["scale"], scale_type=group["scale_type"],
                    update_proj_gap=group["update_proj_gap"], capturable=group["capturable"],
                    **self._hyper(group))
            if others["params"]:
                updates += F.adamw(**others, ok=ok, **self._hyper(group))
        return ok, updates

    def _project(self, group: dict, mats: dict[str, list]
                 ) -> tuple[Tensor, list[Tensor], list[Tensor]] | None:
        """Phase 1 for the group's matrices, if any: R, and this rank's ||G||."""
        if not mats["params"]:
            return None
        return F.project(mats["params"], mats["grads"], mats["projs"], rank=group["rank"],
                         scale_type=group["scale_type"], fused=group["fused"],
                         tiles=group["tiles"], **self._flags(group))

    def _check(self, work: list[tuple[dict, list[Tensor]]], lists: list[tuple[dict, dict]],
               projected: list) -> tuple[Tensor, dict[Tensor, Tensor]]:
        """Phase 2: the step-valid flag, and each parameter's ||G|| over the whole tensor."""
        params, norms = [], []
        for (group, _), (mats, others), low in zip(work, lists, projected, strict=True):
            params += mats["params"] + others["params"]
            norms += (low[2] if low else []) + F.grad_norms(
                others["params"], others["grads"], per_channel=False, **self._flags(group))
        ok, norms = F.all_finite(params, norms, self._reductions)
        return ok, dict(zip(params, norms, strict=True))

    def _flags(self, group: dict) -> dict[str, Any]:
        return dict(foreach=group["foreach"], reductions=self._reductions)

    def _hyper(self, group: dict) -> dict[str, Any]:
        """The hyper-parameters apollo() and adamw() share."""
        beta1, beta2 = group["betas"]
        return dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    stochastic_rounding=group["stochastic_rounding"], fused=group["fused"],
                    **self._flags(group))

    def _init_group(self, group: dict, ps: list[Tensor]) -> tuple[dict, dict]:
        """As torch's: lazy state, then the lists the step takes, for APOLLO's matrices and
        for the AdamW parameters. Also advances the host's projection schedule."""
        common = ("params", "grads", "exp_avgs", "exp_avg_sqs", "state_steps", "streams")
        mats = {k: [] for k in (*common, "projs", "update_norms")}
        others: dict[str, list] = {k: [] for k in common}
        for p in ps:
            state, matrix = self.state[p], bool(group["apollo"]) and p.dim() == 2
            if "step" not in state:
                init_state_(state, p, group, matrix=matrix, seed=self._index[p],
                            reductions=self._reductions)
            lists = mats if matrix else others
            if matrix:
                refresh_on_schedule_(state, p, group, self._reductions)
                lists["projs"].append(state["proj"])
                lists["update_norms"].append(state["update_norm"])
            lists["params"].append(p)
            lists["grads"].append(p.grad)
            lists["exp_avgs"].append(state["exp_avg"])
            lists["exp_avg_sqs"].append(state["exp_avg_sq"])
            lists["state_steps"].append(state["step"])
            lists["streams"].append(self._index[p])
        return mats, others

    def state_dict(self) -> dict[str, Any]:
        """As torch's, plus the optimizer-wide device counters (skipped steps and parameters,
        the stochastic rounding seed), so that a loaded optimizer continues bit for bit."""
        state = super().state_dict()
        state["device_counters"] = {"skipped_steps": self._skipped,
                                    "skipped_params": self._skipped_params,
                                    "rounding_seed": self._rounding_seed}
        return state

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
        counters = state_dict.get("device_counters", {})
        device = self._reductions.local(self.param_groups[0]["params"][0]).device
        self._skipped, self._skipped_params, self._rounding_seed = (
            None if (v := counters.get(k)) is None else v.to(device, copy=True)
            for k in ("skipped_steps", "skipped_params", "rounding_seed"))
        self._ok, self._pending = None, []


class ApolloMini(Apollo):
    """APOLLO-Mini: rank 1, one scaling factor per tensor, scale 128 (alpha = sqrt(128))."""

    def __init__(self, params, lr: float = 1e-3, **kwargs):
        kwargs.setdefault("rank", 1)
        kwargs.setdefault("scale", 128.0)
        kwargs.setdefault("scale_type", "tensor")
        super().__init__(params, lr=lr, **kwargs)


def _count(counter: Tensor | None, ok: Tensor) -> Tensor:
    """Adds 1 to a device counter where the step was not valid, without reading either."""
    return (~ok).long() if counter is None else counter.add_(~ok)
