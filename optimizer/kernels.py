"""The in-place weight write, ``W <- (W + c * D) * (1 - decay)`` with rounding, as one pass.

This is the only part of a step that touches the served weights, so it is the part serving
waits for. On CUDA it is one Triton kernel per parameter: it reads W and the direction D
once, computes in fp32, rounds (stochastically for bf16) and writes W once; the step-valid
flag ``ok`` is read on the device, so a skipped step needs no host synchronisation and the
kernel is capturable in a CUDA graph. Elsewhere (CPU, fp16, or no Triton) the same maths runs
as torch ops.

c broadcasts against W: a 0-d tensor (one factor per tensor), m x 1 (per row) or n (per
column). Stochastic rounding of bf16 draws 16 random bits per element: Triton's Philox keyed by
a device-side seed counter (advanced once per step, so graph replays draw fresh bits), or
torch's generator on the fallback path.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:  # Triton ships with CUDA builds of torch; the CPU build runs the torch fallback.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # tests run the kernel on the CPU
SEED_STRIDE = 1_000_003  # per-parameter offset of the Philox key within one step


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


def write_torch_(p: Tensor, direction: Tensor, coef: Tensor, decay: float, ok: Tensor,
                 stochastic: bool, branch: bool | None = None) -> None:
    """The write with torch ops. On the CPU a skipped step returns early (reading a CPU flag
    costs nothing); on an accelerator (or ``branch=False``) the flag selects old or new
    values on the device instead."""
    branch = p.device.type == "cpu" if branch is None else branch
    if branch and not bool(ok):
        return
    target = p if p.dtype == torch.float32 and branch else p.to(torch.float32, copy=True)
    target.addcmul_(direction, coef)
    if decay:
        target.add_(target, alpha=-decay)
    if not branch:
        new = target
        if stochastic and p.dtype == torch.bfloat16:
            new = torch.empty_like(p)
            copy_stochastic_(new, target)
        elif stochastic and p.dtype == torch.float16:
            new = round_stochastic_fp16(target)
        p.copy_(torch.where(ok, new.to(p.dtype), p))
    elif target is not p:
        if stochastic and p.dtype == torch.bfloat16:
            copy_stochastic_(p, target)
        elif stochastic and p.dtype == torch.float16:
            p.copy_(round_stochastic_fp16(target))
        else:
            p.copy_(target)


if triton is not None:

    @triton.jit
    def _write_kernel(p_ptr, d_ptr, c_ptr, ok_ptr, seed_ptr, numel, n_cols, c_row_stride,
                      c_col_stride, decay, index, ROUND: tl.constexpr, BLOCK: tl.constexpr):
        """ROUND: 0 none (fp32 weight), 1 to nearest even bf16, 2 stochastic bf16. The bf16
        rounding is done on the bits, so the final conversion is exact in any rounding mode
        (Triton's interpreter truncates)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = (offs < numel) & (tl.load(ok_ptr) != 0)  # a skipped step reads/writes nothing
        row = offs // n_cols
        col = offs % n_cols
        c = tl.load(c_ptr + row * c_row_stride + col * c_col_stride, mask=mask, other=0.0)
        w = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(d_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        new = w + c.to(tl.float32) * d
        new = new - decay * new
        if ROUND == 1:
            bits = new.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            new = bits.to(tl.float32, bitcast=True)
        elif ROUND == 2:  # add 16 random bits below bf16's mantissa, then truncate
            seed = tl.load(seed_ptr) + index * SEED_STRIDE
            noise = (tl.randint(seed, offs) & 0xFFFF).to(tl.int32)
            bits = (new.to(tl.int32, bitcast=True) + noise) & -65536
            new = bits.to(tl.float32, bitcast=True)
        tl.store(p_ptr + offs, new.to(p_ptr.dtype.element_ty), mask=mask)


def triton_usable(p: Tensor, direction: Tensor) -> bool:
    return (triton is not None and (p.is_cuda or INTERPRET) and p.dim() <= 2
            and p.is_contiguous() and direction.is_contiguous()
            and p.dtype in (torch.float32, torch.bfloat16))


def write_triton_(p: Tensor, direction: Tensor, coef: Tensor, decay: float, ok: Tensor,
                  stochastic: bool, seed: Tensor, index: int) -> None:
    n_cols = p.shape[-1] if p.dim() == 2 else max(p.numel(), 1)
    c = coef.expand(p.shape) if coef.dim() else coef
    c_row, c_col = (c.stride() if p.dim() == 2 else (0, c.stride(0))) if coef.dim() else (0, 0)
    block = 1024
    grid = (triton.cdiv(p.numel(), block),)
    _write_kernel[grid](p, direction, coef, ok.view(torch.uint8), seed, p.numel(), n_cols,
                        c_row, c_col, float(decay), index,
                        ROUND=0 if p.dtype == torch.float32 else 2 if stochastic else 1,
                        BLOCK=block)


def write_(p: Tensor, direction: Tensor, coef: Tensor, decay: float, ok: Tensor,
           stochastic: bool, seed: Tensor, index: int) -> None:
    """W <- (W + coef * direction) * (1 - decay), rounded into W's dtype, only if `ok`."""
    if triton_usable(p, direction):
        write_triton_(p, direction, coef, decay, ok, stochastic, seed, index)
    else:
        write_torch_(p, direction, coef, decay, ok, stochastic)
