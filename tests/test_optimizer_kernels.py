"""optimizer/kernels.py and the sync-free step: the fused write, capturable mode."""

import copy
import os
import platform
import subprocess
import sys

import pytest
import torch

from optimizer import Apollo, ApolloMini
from optimizer.rounding import write_torch_
from tests.support import ROOT
from tests.support.optim_problems import groups, problem


def test_triton_write_kernel_matches_torch_in_the_interpreter():
    """The CUDA kernel's code, run by Triton's interpreter on the CPU: same values as the
    torch path (fp32, bf16 round-to-nearest), a neighbour of the exact value with stochastic
    rounding, unbiased on average, and no write at all on a skipped step; the fused rank-1
    projection gives the matmul's R and ||G|| in any launch shape; the optimizer with the
    kernels (fused=True) equals it without, and a loaded one rounds as the saved one would."""
    if platform.machine() != "x86_64":  # the `test` extra installs Triton on x86-64 only
        pytest.importorskip("triton")
    out = subprocess.run([sys.executable, str(ROOT / "tests/support/kernel_check_child.py")],
                         capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert out.stdout.count("ok ") == 26


def _interpreted(child: str) -> str:
    """Run `child` (a function of this module) in a process with TRITON_INTERPRET=1 (the
    kernels read it at import); its stdout."""
    if platform.machine() != "x86_64":  # the `test` extra installs Triton on x86-64 only
        pytest.importorskip("triton")
    out = subprocess.run([sys.executable, "-c", f"import {__name__} as t; t.{child}()"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    return out.stdout


def test_streaming_projection_kernel_in_the_interpreter():
    """The streaming rank-1 projection (Tiles.stages >= 1) on shapes that leave partial tiles,
    partial chunks, single rows and columns, reading nothing but G and P: R within fp32's
    summation bound of the float64 product, ||G|| as torch's, every output written; `group`
    only changes the launches (one per `group` matrices of one orientation and dtype), never
    a bit of the sums; and the optimizer with these tiles (fused) steps as the torch path
    does."""
    out = _interpreted("_streaming_child")
    assert out.count("ok ") == 5, out


STREAM_SHAPES = ((99, 40), (24, 700), (163, 150), (100, 150), (1, 40), (40, 1), (16, 512),
                 (3, 130))


def _streaming_child():
    import numpy as np
    from triton.runtime import interpreter

    from optimizer import kernels
    from optimizer.kernels import ProjectionTiles, Tiles

    spans = []  # the bytes of every G and P: the projection may read those alone
    builder = interpreter.interpreter_builder
    real_load = builder.create_masked_load

    def checked_load(ptrs, mask, *rest):
        if spans:
            size = ptrs.get_element_ty().primitive_bitwidth // 8
            at = ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape).astype(bool)]
            inside = np.zeros(at.shape, dtype=bool)
            for lo, hi in spans:
                inside |= (at >= lo) & (at + size <= hi)
            assert inside.all(), f"{int((~inside).sum())} reads outside every G and P"
        return real_load(ptrs, mask, *rest)

    builder.create_masked_load = checked_load

    def guarded(x):  # x between NaNs too: a read past either end also spoils a sum
        room = torch.full((x.numel() + 2 * 2048,), float("nan"), dtype=x.dtype)
        room[2048:2048 + x.numel()] = x.flatten()
        x = room[2048:2048 + x.numel()].view(x.shape)
        spans.append((x.data_ptr(), x.data_ptr() + x.numel() * x.element_size()))
        return x

    assert kernels.INTERPRET
    launches = []
    real = kernels._project_rank1_stream_kernel

    class Counted:  # each launch's matrix count, then the real kernel
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(kwargs["K"])
                return real[grid](*args, **kwargs)
            return launch

    kernels._project_rank1_stream_kernel = Counted()
    one = ProjectionTiles(rows=Tiles(8, 128, 1, 4, 1, 64), cols=Tiles(8, 128, 3, 4, 1, 64))
    each = ProjectionTiles(rows=Tiles(8, 128, 1, 4, 1, 1), cols=Tiles(8, 128, 3, 4, 1, 1))
    piped = ProjectionTiles(rows=Tiles(4, 64, 3, 4, 2, 3), cols=Tiles(16, 64, 2, 2, 3, 2))
    mixed = [torch.bfloat16, torch.float32] * 4
    for dtypes, runs in (([torch.bfloat16] * 8, (one, each, piped)), (mixed, (one,))):
        g = torch.Generator().manual_seed(len(set(dtypes)))
        grads = [guarded(torch.randn(s, generator=g).to(dt))
                 for s, dt in zip(STREAM_SHAPES, dtypes, strict=True)]
        projs = [guarded(torch.randn((1, n) if m >= n else (m, 1), generator=g))
                 for m, n in STREAM_SHAPES]
        want, bound, want_norms = [], [], []
        for x, p in zip(grads, projs, strict=True):
            x64, p64 = x.double(), p.double()
            if x.shape[0] >= x.shape[1]:
                want.append((x64 @ p64.t()).flatten())
                bound.append((x64.abs() @ p64.abs().t()).flatten() * (x.shape[1] + 2))
            else:
                want.append((p64.t() @ x64).flatten())
                bound.append((p64.abs().t() @ x64.abs()).flatten() * (x.shape[0] + 2))
            want_norms.append(x64.norm())
        want, want_norms = torch.cat(want), torch.stack(want_norms)
        bound = torch.cat(bound) * 2.0 ** -24  # recursive fp32 summation: (terms + 2) u
        seen = {}
        for tiles in runs:
            low = torch.full((want.numel(),), float("nan"))
            launches.clear()
            norms = torch.stack(kernels.project_rank1_(grads, projs, low, fused=True,
                                                       tiles=tiles))
            assert bool(((low.double() - want).abs() <= bound).all()), (low - want).abs().max()
            torch.testing.assert_close(norms.double(), want_norms, rtol=1e-5, atol=0)
            counts = {}
            for x in grads:
                key = (x.shape[0] >= x.shape[1], x.dtype)
                counts[key] = counts.get(key, 0) + 1
            group = {True: tiles.rows.group, False: tiles.cols.group}
            assert sorted(launches) == sorted(
                min(group[rows], count - k) for (rows, _), count in counts.items()
                for k in range(0, count, group[rows])), launches
            seen[tiles] = (low.clone(), norms)
        if each in seen:  # the same sums whatever the grouping, bit for bit
            assert torch.equal(seen[one][0], seen[each][0])
            assert torch.equal(seen[one][1], seen[each][1])
        print("ok projection", sorted({str(d) for d in dtypes}))

    assert spans, "no read was checked"
    spans.clear()  # the optimizer's tensors are its own
    # the optimizer with streaming tiles (fused) against the torch path
    for tiles in (one, piped):
        results = []
        for fused in (True, False):
            g = torch.Generator().manual_seed(0)
            params = [torch.randn(s, generator=g).requires_grad_(True)
                      for s in ((48, 16), (12, 40), (40,))]
            opt = ApolloMini(params, lr=1e-2, weight_decay=0.01, fused=fused, tiles=tiles)
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=g)
                opt.step()
            results.append([p.detach() for p in params])
        for x, y in zip(*results, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
        print("ok optimizer", tiles.rows)
    assert launches, "the optimizer did not reach the streaming kernel"
    print("ok launches", len(launches))


def test_tiles_reject_shapes_the_kernels_cannot_take_and_print_as_the_benches_read():
    from optimizer import Tiles

    for fields in ((4, 512, 1, 4), (8, 1024, 16, 4, 3, 64), (8, 1024, 1, 4, 1, 1)):
        tiles = Tiles(*fields)
        assert Tiles(*(int(v) for v in tiles.spec().split("x"))) == tiles
    assert Tiles(4, 512, 1, 4, 0, 1).spec() == "4x512x1x4"  # as before the streaming kernel
    for bad in ((3, 64, 1), (4, 64, 1, 6), (4, 64, 0), (4, 64, 1, 4, -1), (4, 64, 1, 4, 1, 0),
                (4, 64, 1, 4, 0, 2)):  # group > 1 needs the streaming kernel
        with pytest.raises(ValueError):
            Tiles(*bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_flag_write_equals_branching_write(dtype):
    """The accelerator path (select by a device flag, no host read) against the CPU path."""
    g = torch.Generator().manual_seed(1)
    w, d = torch.randn(16, 8, generator=g).to(dtype), torch.randn(16, 8, generator=g).to(dtype)
    coef = torch.rand(16, 1, generator=g) * -0.1
    for ok in (True, False):
        a, b = w.clone(), w.clone()
        write_torch_(a, d, coef, 0.01, torch.tensor(ok), stochastic=False, branch=True)
        write_torch_(b, d, coef, 0.01, torch.tensor(ok), stochastic=False, branch=False)
        assert torch.equal(a, b)
        assert torch.equal(a, w) != ok


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_lands_on_a_neighbour_and_is_unbiased(dtype):
    """An update far below the weight's spacing: round-to-nearest drops it, stochastic
    rounding keeps it on average (each element on one of the two neighbours)."""
    w = torch.full((256, 256), 1.0, dtype=dtype)
    d = torch.ones(256, 256, dtype=dtype)
    coef = torch.tensor(-1e-4)  # spacing below 1.0: 2^-9 (bf16), 2^-11 (fp16)
    nearest, rounded = w.clone(), w.clone()
    write_torch_(nearest, d, coef, 0.0, torch.tensor(True), stochastic=False)
    write_torch_(rounded, d, coef, 0.0, torch.tensor(True), stochastic=True)
    assert torch.equal(nearest, w)
    below = torch.nextafter(torch.tensor(1.0, dtype=dtype), torch.tensor(0.0, dtype=dtype))
    assert bool(((rounded == 1.0) | (rounded == below)).all())
    assert abs(rounded.float().mean().item() - (1 - 1e-4)) < 2e-5


def _train(opt_factory, steps: int, nan_at: int | None = None):
    params, targets = problem()
    params = [p.clone().requires_grad_(True) for p in params]
    opt = opt_factory(params)
    g = torch.Generator().manual_seed(5)
    for k in range(steps):
        for p, t in zip(params, targets, strict=True):
            p.grad = 2 * (p.detach() - t) + torch.randn(p.shape, generator=g)
        if k == nan_at:
            params[0].grad[1, 2] = float("inf")
        opt.step()
    return [p.detach() for p in params], opt


@pytest.mark.parametrize("variant", ["mini", "rank4-channel"])
def test_capturable_mode_equals_default_within_a_projection_period(variant):
    """capturable=True decides the refresh on the device; until the first refresh (same
    seeded projection) it computes the same steps, a skipped step included."""
    hp = (dict(rank=1, scale=128.0, scale_type="tensor") if variant == "mini"
          else dict(rank=4, scale_type="channel"))

    def make(capturable):
        return lambda ps: Apollo(groups(ps, True, **hp), lr=1e-2, weight_decay=0.01,
                                 update_proj_gap=200, capturable=capturable)

    (a, opt_a), (b, opt_b) = _train(make(False), 60, nan_at=20), _train(make(True), 60, 20)
    assert opt_a.skipped_steps == opt_b.skipped_steps == 1
    assert (opt_a.capturable, opt_b.capturable) == (False, True)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_capturable_mode_refreshes_the_projection_on_schedule():
    w = torch.randn(32, 16, requires_grad=True)
    opt = ApolloMini([w], lr=1e-3, update_proj_gap=5, capturable=True)
    seen = []
    for _ in range(11):
        w.grad = torch.randn_like(w)
        opt.step()
        seen.append(opt.state[w]["proj"].clone())
    changed = [k for k in range(1, 11) if not torch.equal(seen[k], seen[k - 1])]
    assert changed == [4, 9]  # the steps reaching t = 5 and t = 10 redraw it for the next


def test_bf16_weights_keep_fp32_state_across_state_dict_round_trip():
    w = torch.randn(24, 12).to(torch.bfloat16).requires_grad_(True)
    opt = ApolloMini([w], lr=1e-3)
    w.grad = torch.randn_like(w)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    fresh = ApolloMini([w], lr=1e-3)
    fresh.load_state_dict(saved)
    for key, value in opt.state[w].items():
        if torch.is_tensor(value):
            assert fresh.state[w][key].dtype == value.dtype, key
            assert torch.equal(fresh.state[w][key], value), key
