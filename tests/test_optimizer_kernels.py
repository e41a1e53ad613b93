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
