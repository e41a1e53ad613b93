"""Run by tests/test_optimizer_kernels.py under TRITON_INTERPRET=1: the Triton write kernel on
CPU tensors against the torch path. Prints one line per check; exits non-zero on failure."""

import torch

from optimizer import kernels

assert kernels.triton is not None and kernels.INTERPRET


def case(dtype, coef_kind: str, stochastic: bool, ok: bool) -> None:
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(48, 40, generator=g) * 0.02).to(dtype)
    d = torch.randn(48, 40, generator=g).to(dtype)
    coef = {"tensor": torch.tensor(-1e-3), "row": torch.rand(48, 1, generator=g) * -1e-3,
            "col": torch.rand(40, generator=g) * -1e-3}[coef_kind]
    flag = torch.tensor(ok)
    seed = torch.tensor(1234, dtype=torch.int64)
    a, b = w.clone(), w.clone()
    assert kernels.triton_usable(a, d)
    kernels.write_triton_(a, d, coef, 0.01, flag, stochastic, seed, index=3)
    kernels.write_torch_(b, d, coef, 0.01, flag, stochastic=False)
    exact = (w.float() + coef * d.float()) * (1 - 0.01)
    if not ok:
        assert torch.equal(a, w), "a skipped step wrote"
    elif dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    elif not stochastic:  # fp32 results may differ in the last bit (FMA or not): rare ties
        ulp = torch.nextafter(b, torch.tensor(torch.inf, dtype=dtype)).float() - b.float()
        assert bool(((a.float() - b.float()).abs() <= ulp).all()), "more than 1 ulp off"
        assert (a != b).float().mean() < 0.01, "round-to-nearest differs from torch"
    else:  # each element lands on one of the two bf16 neighbours of the exact value
        lo = torch.where(exact.to(dtype).float() <= exact, exact.to(dtype).float(),
                         torch.nextafter(exact.to(dtype), torch.tensor(-torch.inf,
                                                                        dtype=dtype)).float())
        hi = torch.nextafter(lo.to(dtype), torch.tensor(torch.inf, dtype=dtype)).float()
        af = a.float()
        assert bool(((af == lo) | (af == hi) | (af == exact)).all()), "not a neighbour"
    print("ok", dtype, coef_kind, stochastic, ok)


for dtype in (torch.float32, torch.bfloat16):
    for coef_kind in ("tensor", "row", "col"):
        for stochastic in (False, True):
            for ok in (True, False):
                if dtype == torch.float32 and stochastic:
                    continue
                case(dtype, coef_kind, stochastic, ok)

# Unbiased: the mean of many stochastically rounded tiny updates tracks the exact value.
w = torch.full((256, 256), 1.0, dtype=torch.bfloat16)
d = torch.ones(256, 256, dtype=torch.bfloat16)
seed = torch.tensor(7, dtype=torch.int64)
total = torch.zeros(256, 256)
for _ in range(8):
    a = w.clone()
    seed.add_(1)
    kernels.write_triton_(a, d, torch.tensor(-1e-3), 0.0, torch.tensor(True), True, seed, 0)
    total += a.float()
mean = (total / 8).mean().item()
assert abs(mean - 0.999) < 2e-4, mean  # bf16 spacing at 1.0 is 2^-8 (0.0039)
print("ok unbiased", mean)
