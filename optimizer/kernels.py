"""The Triton kernels of a step, and the `fused` flag that picks them.

* The in-place weight write, ``W <- (W + c * D) * (1 - decay)`` with rounding, as one pass:
  the only part of a step that touches the served weights, so the part serving waits for. It
  reads W and the direction D once, computes in fp32, rounds (stochastically for bf16) and
  writes W once; the step-valid flag ``ok`` is read on the device, so a skipped step needs no
  host synchronisation and the kernel is capturable in a CUDA graph. c broadcasts against W:
  0-d (one factor per tensor), m x 1 (per row) or n (per column). Stochastic rounding draws
  16 random bits per element from Triton's Philox, keyed by a device-side seed counter
  (advanced once per step, so graph replays draw fresh bits).
* APOLLO-Mini's rank-1 projection and the gradient's norm in one read of G, in launch shapes
  (`Tiles`) passed in by the caller, which also pick one of two kernels: the tile kernel (one
  launch per matrix) or the streaming kernel (one launch for many matrices, built to keep
  more bytes of G in flight).

Elsewhere (CPU, fp16, or no Triton) the same maths runs as torch ops (optimizer/rounding.py
for the write).

Over 300 lines on purpose: each kernel sits beside the code that launches it and picks its
launch shapes; split, the `fused` path could drift from the shapes it was tuned and checked
with.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from optimizer.rounding import write_torch_

try:  # Triton ships with CUDA builds of torch; the CPU build runs the torch fallback.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # tests run the kernel on the CPU
SEED_STRIDE = 1_000_003  # per-parameter offset of the Philox key within one step


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


    @triton.jit
    def _project_rank1_stream_kernel(G, P, M, N, OUT, CHUNK, TILES, STARTS, dot_ptr, sq_ptr,
                                     stride_split, ALONG_ROWS: tl.constexpr, BM: tl.constexpr,
                                     BN: tl.constexpr, V: tl.constexpr, EVEN: tl.constexpr,
                                     STAGES: tl.constexpr, K: tl.constexpr):
        """The same sums as _project_rank1_kernel, for K matrices of one orientation in one
        launch (tuples of pointers and sizes; program ids STARTS[i].. belong to matrix i, tile
        fastest, then the chunk of the reduced dimension), built to keep many bytes of G in
        flight per SM: the loop's loads carry no mask (a masked tail after it; rows past m are
        clamped and their sums dropped), each loaded tile is folded into small accumulators
        in the thread that holds it (along rows: V neighbouring columns, one 16-byte load;
        along columns: the tile's rows), and P is read in the tile's own layout, so the loop
        has no barrier and registers go to loads in flight. STAGES >= 2 pipelines the loop's
        loads through shared memory instead (Triton's cp.async pipeliner). EVEN (columns
        only): every n is a multiple of BN, so column tiles need no mask."""
        pid = tl.program_id(0)
        g_ptr = G[0]
        p_ptr = P[0]
        m = M[0]
        n = N[0]
        out_at = OUT[0]
        chunk = CHUNK[0]
        tiles = TILES[0]
        first = STARTS[0]
        for i in tl.static_range(1, K):
            if pid >= STARTS[i]:
                g_ptr = G[i]
                p_ptr = P[i]
                m = M[i]
                n = N[i]
                out_at = OUT[i]
                chunk = CHUNK[i]
                tiles = TILES[i]
                first = STARTS[i]
        local = pid - first
        tile = local % tiles
        split = local // tiles
        lo = split * chunk
        if ALONG_ROWS:
            rows = tile * BM + tl.arange(0, BM)
            base = g_ptr + tl.minimum(rows, m - 1)[:, None].to(tl.int64) * n
            zero = tl.zeros([BM, 1], dtype=tl.int32)
            hi = tl.minimum(lo + chunk, n)
            full = lo + (hi - lo) // BN * BN
            acc_dot = tl.zeros([BM, BN // V], dtype=tl.float32)
            acc_sq = tl.zeros([BM, BN // V], dtype=tl.float32)
            for start in tl.range(lo, full, BN, num_stages=STAGES):
                cols = start + tl.arange(0, BN)
                if STAGES > 1:  # through shared memory anyway: read P once per tile
                    pv = tl.load(p_ptr + cols, eviction_policy="evict_last")[None, :]
                else:  # in G's layout: no conversion through shared memory in the loop
                    pv = tl.load(p_ptr + cols[None, :] + zero, eviction_policy="evict_last")
                g = tl.load(base + cols[None, :], eviction_policy="evict_first").to(tl.float32)
                acc_dot += tl.sum(tl.reshape(g * pv, [BM, BN // V, V]), axis=2)
                acc_sq += tl.sum(tl.reshape(g * g, [BM, BN // V, V]), axis=2)
            for start in range(full, hi, BN):  # the last chunk's partial tile
                cols = start + tl.arange(0, BN)[None, :] + zero
                pv = tl.load(p_ptr + cols, mask=cols < hi, other=0.0)
                g = tl.load(base + cols, mask=cols < hi, other=0.0).to(tl.float32)
                acc_dot += tl.sum(tl.reshape(g * pv, [BM, BN // V, V]), axis=2)
                acc_sq += tl.sum(tl.reshape(g * g, [BM, BN // V, V]), axis=2)
            out = rows
            keep = rows < m
            dot = tl.sum(acc_dot, axis=1)
            sq = tl.sum(acc_sq, axis=1)
        else:
            cols = tile * BN + tl.arange(0, BN)
            col_ok = cols < n
            hi = tl.minimum(lo + chunk, m)
            full = lo + (hi - lo) // BM * BM
            acc_dot = tl.zeros([BN], dtype=tl.float32)
            acc_sq = tl.zeros([BN], dtype=tl.float32)
            for start in tl.range(lo, full, BM, num_stages=STAGES):
                rows = start + tl.arange(0, BM)
                offs = rows[:, None].to(tl.int64) * n + cols[None, :]
                if EVEN:
                    g = tl.load(g_ptr + offs, eviction_policy="evict_first").to(tl.float32)
                else:
                    g = tl.load(g_ptr + offs, mask=col_ok[None, :], other=0.0,
                                eviction_policy="evict_first").to(tl.float32)
                pv = tl.load(p_ptr + rows, eviction_policy="evict_last")[:, None]
                acc_dot += tl.sum(g * pv, axis=0)
                acc_sq += tl.sum(g * g, axis=0)
            for start in range(full, hi, BM):  # the last chunk's partial tile
                rows = start + tl.arange(0, BM)
                g = tl.load(g_ptr + rows[:, None].to(tl.int64) * n + cols[None, :],
                            mask=(rows[:, None] < hi) & col_ok[None, :], other=0.0)
                pv = tl.load(p_ptr + rows, mask=rows < hi, other=0.0)[:, None]
                g = g.to(tl.float32)
                acc_dot += tl.sum(g * pv, axis=0)
                acc_sq += tl.sum(g * g, axis=0)
            out = cols
            keep = col_ok
            dot = acc_dot
            sq = acc_sq
        at = split * stride_split + out_at + out
        tl.store(dot_ptr + at, dot, mask=keep)
        tl.store(sq_ptr + at, sq, mask=keep)


def unsupported(t: Tensor) -> str | None:
    """Why the Triton kernels cannot take `t`, or None if they can."""
    if triton is None:
        return "Triton is not installed"
    if not (t.is_cuda or INTERPRET):
        return (f"a {t.device.type} tensor (the kernels run on CUDA, or on the CPU under "
                "TRITON_INTERPRET=1)")
    if t.dtype not in (torch.float32, torch.bfloat16):
        return f"a {t.dtype} tensor (float32 or bfloat16 only)"
    if t.dim() > 2:
        return f"a {t.dim()}-D tensor (at most 2-D)"
    if not t.is_contiguous():
        return "a non-contiguous tensor"
    return None


def triton_usable(*tensors: Tensor) -> bool:
    """Triton runs it: CUDA (or the interpreter), contiguous, at most 2-D, fp32 or bf16."""
    return all(unsupported(t) is None for t in tensors)


def require_triton(tensors: Iterable[Tensor]) -> None:
    """The check behind fused=True: a clear error if the kernels cannot take a tensor."""
    reasons = {r for t in tensors if (r := unsupported(t)) is not None}
    if reasons:
        raise RuntimeError("fused=True, but the Triton kernels cannot take "
                           + "; ".join(sorted(reasons)) + ": pass fused=None or False")


def use_triton(fused: bool | None, *tensors: Tensor) -> bool:
    """The optimizer's `fused` flag for these tensors, as torch reads it: None takes the
    kernels where they run, False never, True always, with an error where they cannot."""
    if fused is None:
        return triton_usable(*tensors)
    if fused:
        require_triton(tensors)
    return fused


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
    warps per program. `stages` picks the kernel: 0 the tile kernel (one launch per matrix,
    BM x BN accumulators, masked tiles); >= 1 the streaming kernel (unmasked loop, folded
    accumulators; >= 2: its loads pipelined through that many shared-memory buffers), which
    covers up to `group` matrices per launch. bench/tune_projection.py times the candidates
    on a GPU."""

    bm: int
    bn: int
    splits: int
    warps: int = 4
    stages: int = 0
    group: int = 1

    def __post_init__(self):
        for name in ("bm", "bn", "warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"Tiles.{name} must be a power of two, got {value}")
        if self.splits < 1 or self.stages < 0 or self.group < 1:
            raise ValueError(f"Tiles: splits and group must be >= 1, stages >= 0: {self}")
        if self.group > 1 and self.stages == 0:
            raise ValueError("Tiles: group > 1 needs the streaming kernel (stages >= 1)")

    def spec(self) -> str:
        """'bm x bn x splits x warps[x stages x group]', trailing defaults left out: the form
        the benches' --tiles option reads (Tiles(*fields))."""
        fields = [self.bm, self.bn, self.splits, self.warps, self.stages, self.group]
        while len(fields) > 4 and fields[-1] == (0, 1)[len(fields) - 5]:
            fields.pop()
        return "x".join(str(v) for v in fields)


@dataclass(frozen=True)
class ProjectionTiles:
    """One `Tiles` per orientation of G. rows: m >= n, each row reduced (whole rows: a matrix
    has enough of them to fill the GPU); cols: m < n, each column reduced over row chunks
    (its columns alone give too few programs)."""

    rows: Tiles
    cols: Tiles


# The best tiles of the H200 tuning (bench/RESULTS.md, 2026-11-29: the streaming kernel,
# 64 matrices per launch; 0.81 ms for 8 Llama-3-8B layers' gradients, 1.12x one read at
# 4.8 TB/s; the tile kernel's 4x512x1 / 32x64x8 took 1.35 ms). Other shapes are passed in:
# the optimizer's `tiles=` option, or project_rank1_(tiles=...) (bench/tune_projection.py).
DEFAULT_TILES = ProjectionTiles(rows=Tiles(bm=8, bn=512, splits=1, warps=2, stages=1, group=64),
                                cols=Tiles(bm=4, bn=1024, splits=8, warps=4, stages=1, group=64))
# The optimizer's param groups hold them: torch.load(weights_only=True) may rebuild them.
torch.serialization.add_safe_globals([Tiles, ProjectionTiles])


def project_rank1_(grads: list[Tensor], projs: list[Tensor], low: Tensor, *,
                   fused: bool | None = None, tiles: ProjectionTiles = DEFAULT_TILES,
                   foreach: bool = True) -> list[Tensor]:
    """For matrices G_i with rank-1 projections P_i: fills `low` (fp32, the R_i concatenated)
    and returns ||G_i|| (0-d fp32 each). On Triton (`fused`, see use_triton), one pass over
    each G gives both: the squared norms per row (m >= n) or column (m < n) come with the dot
    products. Elsewhere: a matmul and a norm per matrix (`foreach`: all norms in one call)."""
    if use_triton(fused, *grads, *projs, low):
        return _project_rank1_triton(grads, projs, low, tiles)
    for g, p, lo in zip(grads, projs, low.split([max(g.shape) for g in grads]), strict=True):
        g32 = g.float()  # fp32, as the kernel accumulates (project_into keeps bf16 in bf16)
        if g.shape[0] >= g.shape[1]:
            torch.matmul(g32, p.t(), out=lo.view(-1, 1))
        else:
            torch.matmul(p.t(), g32, out=lo.view(1, -1))
    if foreach:
        return list(torch._foreach_norm(grads, 2, dtype=torch.float32))
    return [torch.linalg.vector_norm(g, 2, dtype=torch.float32) for g in grads]


def _project_rank1_triton(grads: list[Tensor], projs: list[Tensor], low: Tensor,
                          tiles: ProjectionTiles) -> list[Tensor]:
    """Each orientation's partial sums (R's and the squares', one row per chunk of the
    reduced dimension) land in a buffer of its own, zero-initialised when cut in chunks (a
    chunk no program covers stays zero, so the grid holds only programs with work), and are
    reduced in a fixed order (deterministic); R is then gathered into `low` in the
    matrices' order. One orientation's chunks never widen the other's buffer."""
    work: dict[bool, list[tuple[Tensor, Tensor, int]]] = {True: [], False: []}
    widths = {True: 0, False: 0}
    at = []  # (orientation, offset) of each matrix's sums
    for g, p in zip(grads, projs, strict=True):
        along_rows = g.shape[0] >= g.shape[1]
        work[along_rows].append((g, p, widths[along_rows]))
        at.append((along_rows, widths[along_rows]))
        widths[along_rows] += max(g.shape)
    sums = {}
    for along_rows, items in work.items():
        if not items:
            continue
        t = tiles.rows if along_rows else tiles.cols
        width = widths[along_rows]
        fill = torch.zeros if t.splits > 1 else torch.empty  # one chunk: every sum written
        parts = fill(2, t.splits, width, dtype=torch.float32, device=low.device)
        if t.stages:
            _stream(items, t, along_rows, parts[0], parts[1])
        else:
            for g, p, offset in items:
                m, n = g.shape
                step = t.bn if along_rows else t.bm
                chunk = triton.cdiv(triton.cdiv(n if along_rows else m, t.splits), step) * step
                programs = triton.cdiv(m, t.bm) if along_rows else triton.cdiv(n, t.bn)
                _project_rank1_kernel[(programs, t.splits)](
                    g, p, parts[0, :, offset:], parts[1, :, offset:], m, n, chunk, width,
                    ALONG_ROWS=along_rows, BM=t.bm, BN=t.bn, STEP=step, num_warps=t.warps)
        sums[along_rows] = parts.sum(1) if t.splits > 1 else parts[:, 0]
    views = [sums[o][:, offset:offset + max(g.shape)] for g, (o, offset) in
             zip(grads, at, strict=True)]
    torch.cat([v[0] for v in views], out=low)
    return list(torch._foreach_sqrt(torch._foreach_norm([v[1] for v in views], 1)))


class _Plan(NamedTuple):
    """One matrix of a streaming launch: the kernel's per-matrix arguments, in its order."""

    g: Tensor
    p: Tensor
    m: int
    n: int
    offset: int  # of its sums in the partial-sum rows
    chunk: int  # of the reduced dimension per program
    tiles: int  # BM x BN tiles across the kept dimension
    programs: int  # tiles x chunks


def _stream(work: list[tuple[Tensor, Tensor, int]], t: Tiles, along_rows: bool,
            dot_parts: Tensor, sq_parts: Tensor) -> None:
    """The streaming kernel over (G, P, output offset) of one orientation: up to t.group
    matrices of one dtype per launch, those with the longest chunks first (their programs
    start first, the short ones fill the end of the launch)."""
    step = t.bn if along_rows else t.bm
    plans = []
    for g, p, offset in work:
        m, n = g.shape
        reduced = n if along_rows else m
        chunk = triton.cdiv(triton.cdiv(reduced, t.splits), step) * step
        tiles = triton.cdiv(m, t.bm) if along_rows else triton.cdiv(n, t.bn)
        plans.append(_Plan(g, p, m, n, offset, chunk, tiles,
                           tiles * triton.cdiv(reduced, chunk)))
    plans.sort(key=lambda plan: (str(plan.g.dtype), -plan.chunk))  # stable
    batches: list[list[_Plan]] = []
    for plan in plans:
        if batches and len(batches[-1]) < t.group and batches[-1][0].g.dtype == plan.g.dtype:
            batches[-1].append(plan)
        else:
            batches.append([plan])
    for batch in batches:
        starts = [sum(plan.programs for plan in batch[:i]) for i in range(len(batch))]
        args = [tuple(plan[k] for plan in batch) for k in range(7)]
        _project_rank1_stream_kernel[(starts[-1] + batch[-1].programs,)](
            *args, tuple(starts), dot_parts, sq_parts, dot_parts.stride(0),
            ALONG_ROWS=along_rows, BM=t.bm, BN=t.bn, V=min(t.bn, 16 // batch[0].g.element_size()),
            EVEN=not along_rows and all(plan.n % t.bn == 0 for plan in batch),
            STAGES=t.stages, K=len(batch), num_warps=t.warps)


def write_(p: Tensor, direction: Tensor, coef: Tensor, decay: float, ok: Tensor,
           stochastic: bool, seed: Tensor, index: int, fused: bool | None = None) -> None:
    """W <- (W + coef * direction) * (1 - decay), rounded into W's dtype, only if `ok`."""
    if use_triton(fused, p, direction):
        write_triton_(p, direction, coef, decay, ok, stochastic, seed, index)
    else:
        write_torch_(p, direction, coef, decay, ok, stochastic)
