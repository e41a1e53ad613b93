"""A parameter's state, as the Apollo class keeps it: what its first step creates, and the
host's projection schedule, the reference's seed chain. Host-side, so that the step's
functions (optimizer/functional.py) take only tensors."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from optimizer.maths import next_seed
from optimizer.sharding import Reductions


def init_state_(state: dict[str, Any], p: Tensor, group: dict[str, Any], *, matrix: bool,
                seed: int, reductions: Reductions) -> None:
    """fp32 moments (of R for an APOLLO matrix, else of G), a device step counter, and for
    a matrix its projection (drawn from its seed) and the limiter's last update norm."""
    state.setdefault("seed", seed)
    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
    if matrix:
        state["calls"] = 0
        state["proj"] = reductions.projection(p, group["rank"], state["seed"])
        low = reductions.low_rank_shape(p, group["rank"])
        state["exp_avg"] = torch.zeros(low, dtype=torch.float32, device=p.device)
        state["exp_avg_sq"] = torch.zeros(low, dtype=torch.float32, device=p.device)
        # inf: the limiter leaves the first update alone, as the reference does
        state["update_norm"] = torch.full((), torch.inf, device=p.device)
    else:
        state["exp_avg"] = torch.zeros_like(reductions.local(p), dtype=torch.float32)
        state["exp_avg_sq"] = torch.zeros_like(reductions.local(p), dtype=torch.float32)


def refresh_on_schedule_(state: dict[str, Any], p: Tensor, group: dict[str, Any],
                         reductions: Reductions) -> None:
    """Without capturable, P is redrawn from the next seed of its chain every
    `update_proj_gap` steps asked of p, as in the reference. "Asked": ``state["calls"]`` is
    the one entry a skipped step advances (the host cannot know it was skipped without a
    sync). With capturable, the step itself redraws P on the device."""
    calls = state["calls"]
    state["calls"] += 1
    if not group["capturable"] and calls > 0 and calls % group["update_proj_gap"] == 0:
        state["seed"] = next_seed(state["seed"])
        state["proj"].copy_(reductions.projection(p, group["rank"], state["seed"]))
