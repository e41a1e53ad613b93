"""APOLLO's building blocks, each as the authors' reference code (apollo-torch 1.0.3) defines
it, so that the step can be compared with the reference number for number."""

from __future__ import annotations

import math

import torch
from torch import Tensor

NORM_GROWTH_LIMIT = 1.01  # Fira's limiter: ||u_t|| <= gamma * ||u_{t-1}||
SCALE_EPS = 1e-8


def next_seed(seed: int, adv: int = 0xF) -> int:
    """The reference's seed advance: the last of `adv` int64 draws from a CPU generator."""
    gen = torch.Generator().manual_seed(seed)
    return int(torch.randint(0, torch.iinfo(torch.int64).max, (adv,), generator=gen)[-1])


def projection(shape: tuple[int, ...], rank: int, seed: int, device) -> Tensor:
    """The rank-r Gaussian projection P ~ N(0, 1/r) for a gradient of `shape`, from its seed.

    m >= n: P is r x n and R = G @ P.T; m < n: P is m x r and R = P.T @ G.
    Drawn on the CPU whatever the device, so one seed gives one projection everywhere (a run
    is reproducible across devices, and GPU results compare with CPU ones).
    """
    m, n = shape
    pshape = (rank, n) if m >= n else (m, rank)
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(pshape, generator=gen) / math.sqrt(rank)).to(device)


def low_rank_shape(shape: tuple[int, ...], rank: int) -> tuple[int, int]:
    m, n = shape
    return (m, rank) if m >= n else (rank, n)


def project_into(grad: Tensor, proj: Tensor, out: Tensor, along_rows: bool | None = None
                 ) -> None:
    """out (fp32) = the projected gradient R. A bf16 gradient is projected in bf16 (the
    matmul accumulates in fp32) rather than copied to fp32 first: one read of G, no copy.
    `along_rows` (R = G P^T): by default m >= n; a shard passes its whole matrix's."""
    m, n = grad.shape
    p = proj if proj.dtype == grad.dtype else proj.to(grad.dtype)
    a, b = (grad, p.t()) if (m >= n if along_rows is None else along_rows) else (p.t(), grad)
    if grad.dtype == out.dtype:
        torch.matmul(a, b, out=out)
    else:
        out.copy_(a @ b)


def channel_dim(shape: tuple[int, ...]) -> int:
    """The dimension APOLLO reduces over: channels run along the larger one."""
    return 0 if shape[0] < shape[1] else 1


def norm_limiter(update_norm: Tensor, previous: Tensor) -> Tensor:
    """The divisor (>= 1) that caps ||u_t|| at gamma * ||u_{t-1}||; 1 where previous is inf
    (the first step)."""
    return (update_norm / (previous + SCALE_EPS)).clamp(min=NORM_GROWTH_LIMIT) / \
        NORM_GROWTH_LIMIT


def bias_corrected_lr(lr: float, beta1: float, beta2: float, step: Tensor) -> Tensor:
    """lr * sqrt(1 - beta2^t) / (1 - beta1^t), computed on the device (t is a tensor)."""
    t = step.double()  # fp32 would lose ~1e-5 of (1 - beta2^t) at small t
    return (lr * torch.sqrt(1 - beta2**t) / (1 - beta1**t)).float()
