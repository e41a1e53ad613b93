"""The weight write with torch ops, and the rounding it needs: the path where the Triton
kernel does not run (CPU, fp16, no Triton), and the reference the kernel is tested against.

bf16/fp16 weights: an in-place ``W -= lr * u`` at lr 1e-5 rounds most elements back to where
they were. Stochastic rounding computes the new value in fp32 and rounds up or down at
random, in proportion to the distance, so small updates survive on average. Here the random
bits come from torch's default generator.
"""

from __future__ import annotations

import torch
from torch import Tensor


def copy_stochastic_(target: Tensor, source: Tensor) -> None:
    """Round fp32 `source` into bf16 `target`, up or down at random (unbiased)."""
    noise = torch.randint_like(source, 0, 1 << 16, dtype=torch.int32)
    noise.add_(source.view(torch.int32)).bitwise_and_(-65536)
    target.copy_(noise.view(torch.float32))


def round_stochastic_fp16(source: Tensor) -> Tensor:
    """fp32 -> fp16, to one of the two neighbours with probability by distance (unbiased)."""
    near = source.half()
    near32 = near.float()
    toward = torch.where(source > near32, torch.inf, -torch.inf).half()
    other = torch.nextafter(near, toward)
    gap = (other.float() - near32).abs()
    p_other = torch.where(gap > 0, (source - near32).abs() / gap, 0.0)
    return torch.where(torch.rand_like(source) < p_other, other, near)


def _rounded(value: Tensor, dtype: torch.dtype, stochastic: bool) -> Tensor:
    """fp32 `value` in `dtype`: stochastically rounded for bf16/fp16 if asked, else nearest."""
    if stochastic and dtype == torch.bfloat16:
        out = torch.empty_like(value, dtype=dtype)
        copy_stochastic_(out, value)
        return out
    if stochastic and dtype == torch.float16:
        return round_stochastic_fp16(value)
    return value.to(dtype)


def write_torch_(p: Tensor, direction: Tensor, coef: Tensor, decay: float, ok: Tensor,
                 stochastic: bool, branch: bool | None = None) -> None:
    """The write with torch ops. On the CPU a skipped step returns early (reading a CPU flag
    costs nothing); on an accelerator (or ``branch=False``) the flag selects old or new
    values on the device instead."""
    branch = p.device.type == "cpu" if branch is None else branch
    if branch and not bool(ok):
        return
    if branch and p.dtype == torch.float32:  # in place, one pass
        p.addcmul_(direction, coef)
        if decay:
            p.add_(p, alpha=-decay)
        return
    target = p.to(torch.float32, copy=True)
    target.addcmul_(direction, coef)
    if decay:
        target.add_(target, alpha=-decay)
    new = _rounded(target, p.dtype, stochastic)
    p.copy_(new if branch else torch.where(ok, new, p))
