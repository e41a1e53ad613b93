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
from dataclasses import dataclass

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


if triton is not None:
    _SEED_STRIDE = tl.constexpr(SEED_STRIDE)

    @triton.jit
    def _write_kernel(p_ptr, d_ptr, c_ptr, ok_ptr, seed_ptr, m, n, c_row_stride, c_col_stride,
                      decay, index, SCALAR_COEF: tl.constexpr, ROUND: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr):
        """One BM x BN tile of W (m x n, contiguous). ROUND: 0 none (fp32 weight), 1 to
        nearest even bf16, 2 stochastic bf16. bf16 rounding is done on the bits, so the final
        conversion is exact in any rounding mode (Triton's interpreter truncates)."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = pid_m * BM + tl.arange(0, BM)
        cols = pid_n * BN + tl.arange(0, BN)
        # a skipped step (ok == 0) reads and writes nothing: no rows are in bounds
        live_rows = m * tl.load(ok_ptr).to(tl.int32)
        mask = (rows[:, None] < live_rows) & (cols[None, :] < n)
        offs = rows[:, None].to(tl.int64) * n + cols[None, :]
        if SCALAR_COEF:
            c = tl.load(c_ptr).to(tl.float32)
        else:
            c = tl.load(c_ptr + rows[:, None] * c_row_stride + cols[None, :] * c_col_stride,
                        mask=mask, other=0.0).to(tl.float32)
        w = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(d_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        new = w + c * d
        new = new - decay * new
        if ROUND == 1:
            bits = new.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            new = bits.to(tl.float32, bitcast=True)
        elif ROUND == 2:  # add 16 random bits below bf16's mantissa, then truncate
            # one Philox call gives 4 x 32 bits = noise for 8 elements
            tile = pid_m * tl.num_programs(1) + pid_n
            counter = tile * (BM * BN // 8) + tl.arange(0, BM * BN // 8)
            seed = tl.load(seed_ptr) + index * _SEED_STRIDE
            r0, r1, r2, r3 = tl.randint4x(seed, counter)
            r = tl.interleave(tl.interleave(r0, r1), tl.interleave(r2, r3))
            noise = tl.reshape(tl.interleave(r & 0xFFFF, r >> 16), (BM, BN)).to(tl.int32)
            bits = (new.to(tl.int32, bitcast=True) + noise) & -65536
            new = bits.to(tl.float32, bitcast=True)
        tl.store(p_ptr + offs, new.to(p_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _project_rank1_kernel(g_ptr, proj_ptr, dot_ptr, sq_ptr, m, n, chunk, stride_split,
                              ALONG_ROWS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                              STEP: tl.constexpr):
        """APOLLO-Mini's projection and the gradient's squared norms in one read of G, as
        partial sums over one chunk of the reduced dimension (program_id(1) picks it):
        ALONG_ROWS (m >= n): dot[i] = sum_j G[i, j] P[j], sq[i] = sum_j G[i, j]^2;
        else: dot[j] = sum_i P[i] G[i, j], sq[j] = sum_i G[i, j]^2. fp32 accumulation, in
        BM x BN accumulators reduced once at the end, so the loop is loads and FMAs only."""
        pid = tl.program_id(0)
        split = tl.program_id(1)
        lo = split * chunk
        if ALONG_ROWS:
            rows = pid * BM + tl.arange(0, BM)
            hi = tl.minimum(lo + chunk, n)
        else:
            cols = pid * BN + tl.arange(0, BN)
            hi = tl.minimum(lo + chunk, m)
        acc_dot = tl.zeros([BM, BN], dtype=tl.float32)
        acc_sq = tl.zeros([BM, BN], dtype=tl.float32)
        for start in range(lo, hi, STEP):  # STEP: BN along rows, else BM
            if ALONG_ROWS:
                cols = start + tl.arange(0, BN)
                pv = tl.load(proj_ptr + cols, mask=cols < hi, other=0.0)[None, :]
                mask = (rows[:, None] < m) & (cols[None, :] < hi)
            else:
                rows = start + tl.arange(0, BM)
                pv = tl.load(proj_ptr + rows, mask=rows < hi, other=0.0)[:, None]
                mask = (rows[:, None] < hi) & (cols[None, :] < n)
            g = tl.load(g_ptr + rows[:, None].to(tl.int64) * n + cols[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            acc_dot += g * pv
            acc_sq += g * g
        if ALONG_ROWS:
            out = pid * BM + tl.arange(0, BM)
            keep = out < m
            dot = tl.sum(acc_dot, axis=1)
            sq = tl.sum(acc_sq, axis=1)
        else:
            out = pid * BN + tl.arange(0, BN)
            keep = out < n
            dot = tl.sum(acc_dot, axis=0)
            sq = tl.sum(acc_sq, axis=0)
        tl.store(dot_ptr + split * stride_split + out, dot, mask=keep)
        tl.store(sq_ptr + split * stride_split + out, sq, mask=keep)


def triton_usable(*tensors: Tensor) -> bool:
    """Triton runs it: CUDA (or the interpreter), contiguous, at most 2-D, fp32 or bf16."""
    return (triton is not None and all((t.is_cuda or INTERPRET) and t.dim() <= 2
                                       and t.is_contiguous()
                                       and t.dtype in (torch.float32, torch.bfloat16)
                                       for t in tensors))


def write_triton_(p: Tensor, direction: Tensor, coef: Tensor, decay: float, ok: Tensor,
                  stochastic: bool, seed: Tensor, index: int) -> None:
    m, n = p.shape if p.dim() == 2 else (1, p.numel())
    scalar = coef.numel() == 1
    c_row = c_col = 0
    if not scalar:
        c = coef.expand(p.shape)
        c_row, c_col = c.stride() if p.dim() == 2 else (0, c.stride(0))
    bm, bn = (8, 256) if m > 1 else (1, 1024)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _write_kernel[grid](p, direction, coef, ok.view(torch.uint8), seed, m, n, c_row, c_col,
                        float(decay), index, SCALAR_COEF=scalar,
                        ROUND=0 if p.dtype == torch.float32 else 2 if stochastic else 1,
                        BM=bm, BN=bn)


@dataclass(frozen=True)
class Tiles:
    """How the rank-1 projection kernel covers one orientation of G: BM x BN tiles, the
    reduced dimension cut into `splits` chunks (partial sums, each its own program), `warps`
    warps per program. bench/tune_projection.py times the candidates on a GPU."""

    bm: int
    bn: int
    splits: int
    warps: int = 4


# "rows": m >= n, each row reduced (whole rows: a matrix has enough of them to fill the GPU);
# "cols": m < n, each column reduced over row chunks (its columns alone give too few programs).
# The kept tiles of the H200 tuning (bench/RESULTS.md); bench/tune_projection.py swaps in
# candidates to time them.
TILES = {"rows": Tiles(bm=4, bn=512, splits=1), "cols": Tiles(bm=32, bn=64, splits=8)}


def project_rank1_(grads: list[Tensor], projs: list[Tensor], low: Tensor) -> list[Tensor]:
    """For matrices G_i with rank-1 projections P_i: fills `low` (fp32, the R_i concatenated)
    and returns ||G_i|| (0-d fp32 each). On Triton, one pass over each G gives both: the
    squared norms per row (m >= n) or column (m < n) come with the dot products. Partial sums
    of the chunks (`TILES`) land in zero-initialised rows and are reduced in a fixed order for
    the whole group (deterministic); a chunk no program covers stays zero, so the grid holds
    only programs with work. Elsewhere: a matmul and a norm per matrix."""
    sizes = [max(g.shape) for g in grads]
    if triton_usable(*grads, *projs, low):
        splits = max(t.splits for t in TILES.values())
        dot_parts = torch.zeros(splits, low.numel(), dtype=torch.float32, device=low.device)
        sq_parts = torch.zeros_like(dot_parts)
        offset = 0
        for g, p, size in zip(grads, projs, sizes, strict=True):
            m, n = g.shape
            along_rows = m >= n
            t = TILES["rows" if along_rows else "cols"]
            step = t.bn if along_rows else t.bm
            chunk = triton.cdiv(triton.cdiv(n if along_rows else m, t.splits), step) * step
            programs = triton.cdiv(m, t.bm) if along_rows else triton.cdiv(n, t.bn)
            _project_rank1_kernel[(programs, t.splits)](
                g, p, dot_parts[:, offset:], sq_parts[:, offset:], m, n, chunk, low.numel(),
                ALONG_ROWS=along_rows, BM=t.bm, BN=t.bn, STEP=step, num_warps=t.warps)
            offset += size
        torch.sum(dot_parts, 0, out=low)
        squares = list(sq_parts.sum(0).split(sizes))
        return list(torch._foreach_sqrt(torch._foreach_norm(squares, 1)))
    for g, p, lo in zip(grads, projs, low.split(sizes), strict=True):
        g32 = g.float()  # fp32, as the kernel accumulates (project_into keeps bf16 in bf16)
        if g.shape[0] >= g.shape[1]:
            torch.matmul(g32, p.t(), out=lo.view(-1, 1))
        else:
            torch.matmul(p.t(), g32, out=lo.view(1, -1))
    return list(torch._foreach_norm(grads, 2, dtype=torch.float32))


def write_(p: Tensor, direction: Tensor, coef: Tensor, decay: float, ok: Tensor,
           stochastic: bool, seed: Tensor, index: int) -> None:
    """W <- (W + coef * direction) * (1 - decay), rounded into W's dtype, only if `ok`."""
    if triton_usable(p, direction):
        write_triton_(p, direction, coef, decay, ok, stochastic, seed, index)
    else:
        write_torch_(p, direction, coef, decay, ok, stochastic)
