"""Run by tests/test_optimizer_kernels.py under TRITON_INTERPRET=1: the Triton write kernel on
CPU tensors against the torch path. Prints one line per check; exits non-zero on failure."""

import copy

import torch

from optimizer import Apollo, ApolloMini, kernels, rounding

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
    rounding.write_torch_(b, d, coef, 0.01, flag, stochastic=False)
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

# A vector (1-D), as AdamW parameters are.
v, dv = torch.randn(300), torch.randn(300)
a, b = v.clone(), v.clone()
kernels.write_triton_(a, dv, torch.tensor(-1e-2), 0.0, torch.tensor(True), False,
                      torch.tensor(1), 0)
rounding.write_torch_(b, dv, torch.tensor(-1e-2), 0.0, torch.tensor(True), False)
torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
print("ok vector")

# The fused rank-1 projection + squared norms: a group of both orientations, fp32 and bf16.
for dtype in (torch.float32, torch.bfloat16):
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(s, generator=g).to(dtype)
             for s in ((96, 40), (24, 700), (300, 300), (200, 300))]
    projs = [torch.randn((1, n) if m >= n else (m, 1), generator=g)
             for m, n in (x.shape for x in grads)]
    total = sum(max(x.shape) for x in grads)
    low, want_low = torch.empty(total), torch.empty(total)
    norms = kernels.project_rank1_(grads, projs, low, fused=True)
    want_norms = kernels.project_rank1_(grads, projs, want_low, fused=False)
    torch.testing.assert_close(low, want_low, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.stack(norms), torch.stack(want_norms), rtol=1e-5, atol=0)
    # other launch shapes (bench/tune_projection.py's candidates): rows cut in chunks too
    tiles = kernels.ProjectionTiles(rows=kernels.Tiles(2, 64, 3), cols=kernels.Tiles(16, 32, 5))
    norms = kernels.project_rank1_(grads, projs, low, fused=True, tiles=tiles)
    torch.testing.assert_close(low, want_low, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.stack(norms), torch.stack(want_norms), rtol=1e-5, atol=0)
    print("ok project", dtype)

# Unbiased: the mean of many stochastically rounded tiny updates tracks the exact value.
w = torch.full((64, 256), 1.0, dtype=torch.bfloat16)
d = torch.ones(64, 256, dtype=torch.bfloat16)
seed = torch.tensor(7, dtype=torch.int64)
total = torch.zeros(64, 256)
for _ in range(8):
    a = w.clone()
    seed.add_(1)
    kernels.write_triton_(a, d, torch.tensor(-1e-3), 0.0, torch.tensor(True), True, seed, 0)
    total += a.float()
mean = (total / 8).mean().item()
assert abs(mean - 0.999) < 2e-4, mean  # bf16 spacing at 1.0 is 2^-8 (0.0039)
print("ok unbiased", mean)

# The whole optimizer with the kernels (fused=True) against the torch paths (fused=False):
# APOLLO-Mini and rank-4 channel-wise (per-row and per-column coefficients), fp32, a skipped
# step in the middle.
launches = {"write": 0, "project": 0}  # the Triton launchers, counted
tiles_seen = set()


def counted(name: str, launcher):
    def launch(*args, **kwargs):
        launches[name] += 1
        if name == "project":
            tiles_seen.add(args[3])
        return launcher(*args, **kwargs)
    return launch


kernels.write_triton_ = counted("write", kernels.write_triton_)
kernels._project_rank1_triton = counted("project", kernels._project_rank1_triton)


def train(fused: bool, **hp):
    before = dict(launches)
    tiles_seen.clear()
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).requires_grad_(True)
              for s in ((48, 16), (12, 40), (40,))]
    opt = Apollo(params, lr=1e-2, weight_decay=0.01, fused=fused, **hp)
    for k in range(6):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        if k == 3:
            params[0].grad[0, 0] = float("nan")
        opt.step()
    mini = hp["rank"] == 1
    ran = {k: launches[k] - before[k] for k in launches}
    assert ran == ({"write": 18, "project": 6 if mini else 0} if fused else
                   {"write": 0, "project": 0}), ran  # the flag reaches every kernel
    assert tiles_seen == ({hp.get("tiles", kernels.DEFAULT_TILES)} if fused and mini else set())
    return [p.detach() for p in params], opt.skipped_steps


mini = dict(rank=1, scale=128.0, scale_type="tensor")
for hp in (mini, dict(rank=4, scale_type="channel"),
           # the optimizer's `tiles` reach the fused projection
           dict(mini, tiles=kernels.ProjectionTiles(rows=kernels.Tiles(2, 64, 3),
                                                    cols=kernels.Tiles(16, 32, 5)))):
    (a, skipped_a), (b, skipped_b) = train(True, **hp), train(False, **hp)
    assert skipped_a == skipped_b == 1
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    print("ok optimizer", hp["scale_type"], "tiles" if "tiles" in hp else "default tiles")


def bf16_steps(opt, params, first: int, last: int) -> None:
    for k in range(first, last):
        g = torch.Generator().manual_seed(k)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(torch.bfloat16)
        if k == 1:
            params[1].grad[2, 3] = float("inf")
        opt.step()


# state_dict() carries the rounding seed: under the kernel's stochastic rounding (bf16), a
# loaded optimizer continues bit for bit, its skipped-step count included.
g = torch.Generator().manual_seed(4)
a = [(torch.randn(s, generator=g) * 0.02).to(torch.bfloat16).requires_grad_(True)
     for s in ((48, 16), (12, 40))]
opt_a = ApolloMini(a, lr=1e-3, fused=True)
bf16_steps(opt_a, a, 0, 3)
b = [p.detach().clone().requires_grad_(True) for p in a]
opt_b = ApolloMini(b, lr=1e-3, fused=True)
opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
bf16_steps(opt_a, a, 3, 6)
bf16_steps(opt_b, b, 3, 6)
assert opt_a.skipped_steps == opt_b.skipped_steps == 1
for x, y in zip(a, b, strict=True):
    assert torch.equal(x, y), "a loaded optimizer rounds otherwise"
print("ok state_dict rounding seed")
