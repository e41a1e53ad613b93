"""optimizer/: APOLLO / APOLLO-Mini against the authors' reference code, and its guarantees."""

import copy

import pytest
import torch

from optimizer import Apollo, ApolloMini, kernels
from tests.support.optim_problems import groups, problem


def _run(make_opt, steps: int, seed: int = 0, grad_noise: int = 7):
    params, targets = problem(seed)
    params = [p.clone().requires_grad_(True) for p in params]
    opt = make_opt(params)
    g = torch.Generator().manual_seed(grad_noise)
    for _ in range(steps):
        loss = sum(((p - t) ** 2).sum() for p, t in zip(params, targets, strict=True))
        loss = loss + sum((p * torch.randn(p.shape, generator=g)).sum() for p in params)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("variant", ["mini", "rank4-channel"])
def test_matches_reference_apollo_torch(variant):
    import apollo_torch as reference  # the oracle (the `test` extra): missing, the test fails
    hp = (dict(rank=1, scale=128.0, scale_type="tensor") if variant == "mini"
          else dict(rank=4, scale=1.0, scale_type="channel"))
    lr, steps = 1e-3, 300  # crosses the projection refresh at steps 200

    def ours(params):
        return Apollo(groups(params, True, **hp), lr=lr, update_proj_gap=200,
                      weight_decay=0.01, stochastic_rounding=False)

    def theirs(params):
        ref_hp = dict(hp, proj="random", proj_type="std", update_proj_gap=200)
        return reference.APOLLOAdamW(groups(params, False, **ref_hp), lr=lr,
                                     weight_decay=0.01)

    a, b = _run(ours, steps), _run(theirs, steps)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_non_finite_gradient_changes_nothing():
    params, _ = problem()
    params = [p.clone().requires_grad_(True) for p in params]
    opt = ApolloMini(params, lr=1e-2)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()  # build state
    weights, state = [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())
    for p in params:
        p.grad = torch.ones_like(p)
    params[1].grad[3, 4] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1
    for p, w in zip(params, weights, strict=True):
        assert torch.equal(p.detach(), w)
    after = opt.state_dict()["state"]
    for k, s in state["state"].items():
        for key, v in s.items():
            if key == "calls":  # the host's count of steps asked (the refresh schedule)
                assert after[k][key] == v + 1
            elif torch.is_tensor(v):
                assert torch.equal(after[k][key], v), key
            else:
                assert after[k][key] == v, key


def test_mini_state_is_a_few_vectors():
    w = torch.randn(300, 200, requires_grad=True)
    opt = ApolloMini([w], lr=1e-3)
    w.grad = torch.randn_like(w)
    opt.step()
    numel = sum(v.numel() for v in opt.state[w].values() if torch.is_tensor(v))
    # moments 2 * max(m, n) * rank, stored projection min(m, n) * rank, step, limiter norm
    assert numel == 2 * 300 * 1 + 200 * 1 + 2


def test_bf16_stochastic_rounding_keeps_small_updates():
    torch.manual_seed(0)
    base = torch.randn(256, 256).to(torch.bfloat16)
    grad = torch.randn(256, 256).to(torch.bfloat16)
    changed = {}
    for sr in (False, True):
        w = base.clone().requires_grad_(True)
        opt = ApolloMini([w], lr=1e-5, stochastic_rounding=sr)
        w.grad = grad.clone()
        opt.step()
        changed[sr] = (w.detach() != base).float().mean().item()
    assert changed[False] < 0.05  # round-to-nearest drops most updates
    assert changed[True] > 3 * changed[False]


def _random_step(params, opt, k: int, nan: bool = False) -> None:
    g = torch.Generator().manual_seed(k)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    if nan:
        params[0].grad[1, 1] = float("nan")
    opt.step()


def test_state_dict_round_trip_is_bit_identical():
    def fresh():
        params, _ = problem()
        return [p.clone().requires_grad_(True) for p in params]

    def step(params, opt, k):
        g = torch.Generator().manual_seed(k)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()

    a = fresh()
    opt_a = ApolloMini(a, lr=1e-2)
    for k in range(3):
        step(a, opt_a, k)
    b = [p.detach().clone().requires_grad_(True) for p in a]
    opt_b = ApolloMini(b, lr=1e-2)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    step(a, opt_a, 99)
    step(b, opt_b, 99)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_state_dict_round_trip_keeps_the_device_counters():
    """Skipped steps and the rounding seed live outside the per-parameter state: a loaded
    optimizer has them too, and both continue bit for bit."""
    params, _ = problem()
    a = [p.clone().requires_grad_(True) for p in params]
    opt_a = Apollo(groups(a, True, rank=4), lr=1e-2, update_proj_gap=3)
    for k in range(5):
        _random_step(a, opt_a, k, nan=k == 1)
    b = [p.detach().clone().requires_grad_(True) for p in a]
    opt_b = Apollo(groups(b, True, rank=4), lr=1e-2, update_proj_gap=3)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert opt_b.skipped_steps == opt_a.skipped_steps == 1
    assert torch.equal(opt_b.state_dict()["device_counters"]["rounding_seed"],
                       opt_a.state_dict()["device_counters"]["rounding_seed"])
    for k in range(5, 9):  # a projection refresh (gap 3) and another skipped step
        _random_step(a, opt_a, k, nan=k == 6)
        _random_step(b, opt_b, k, nan=k == 6)
    assert opt_b.skipped_steps == opt_a.skipped_steps == 2
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_state_dict_round_trip_keeps_skipped_params():
    w = torch.randn(16, 8, requires_grad=True)
    opt = ApolloMini([w], lr=1e-3)
    opt.layerwise()
    (w * float("nan")).sum().backward()
    (w * 2).sum().backward()
    fresh = ApolloMini([torch.randn(16, 8, requires_grad=True)], lr=1e-3)
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert fresh.skipped_params == opt.skipped_params == 1


def test_state_dict_without_the_flags_loads_with_their_defaults():
    """A state dict saved before foreach / fused / capturable / tiles were group options."""
    w = torch.randn(16, 8, requires_grad=True)
    opt = ApolloMini([w], lr=1e-3)
    w.grad = torch.randn_like(w)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        for key in ("foreach", "fused", "capturable", "tiles"):
            del group[key]
    del saved["device_counters"]
    fresh = ApolloMini([w], lr=1e-3)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["tiles"] == kernels.DEFAULT_TILES
    fresh.step()


def test_state_dict_loads_with_weights_only(tmp_path):
    """torch.load's safe default rebuilds it: the launch shapes in the groups included."""
    w = torch.randn(16, 8, requires_grad=True)
    tiles = kernels.ProjectionTiles(rows=kernels.Tiles(2, 64, 3), cols=kernels.Tiles(16, 32, 5))
    opt = ApolloMini([w], lr=1e-3, tiles=tiles)
    w.grad = torch.randn_like(w)
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert loaded["param_groups"][0]["tiles"] == tiles
    assert torch.equal(loaded["device_counters"]["rounding_seed"],
                       opt.state_dict()["device_counters"]["rounding_seed"])


@pytest.mark.parametrize("variant", ["mini", "rank4-channel", "mini-capturable"])
def test_single_tensor_ops_equal_multi_tensor_ops(variant):
    """foreach=False (a loop of per-tensor ops, no torch._foreach_* op at all) gives the
    default's weights bit for bit."""
    hp = (dict(rank=1, scale=128.0, scale_type="tensor") if variant.startswith("mini")
          else dict(rank=4, scale_type="channel"))

    def make(foreach):
        def build(ps):
            torch.manual_seed(0)  # capturable redraws projections from torch's generator
            return Apollo(groups(ps, True, **hp), lr=1e-2, weight_decay=0.01,
                          update_proj_gap=7, foreach=foreach,
                          capturable=variant.endswith("capturable"))
        return build

    for x, y in zip(_run(make(None), 20), _run(make(False), 20), strict=True):
        assert torch.equal(x, y)
    assert not any("_foreach_" in op for op in _ops_of_steps(make(False)))
    assert any("_foreach_" in op for op in _ops_of_steps(make(None)))


def _ops_of_steps(make_opt) -> set[str]:
    """The torch ops two steps run (the first creates the state)."""
    params, _ = problem()
    params = [p.clone().requires_grad_(True) for p in params]
    opt = make_opt(params)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for k in range(2):
            _random_step(params, opt, k)
    return {event.key for event in prof.key_averages()}


@pytest.mark.skipif(kernels.INTERPRET, reason="Triton's interpreter runs the kernels on CPU")
def test_fused_true_without_the_kernels_raises_at_construction():
    with pytest.raises(RuntimeError, match="fused=True, but the Triton kernels cannot take"):
        ApolloMini([torch.randn(8, 4, requires_grad=True)], fused=True)
    ApolloMini([torch.randn(8, 4, requires_grad=True)], fused=False)  # the torch paths


def test_layerwise_mode_gives_the_same_weights_as_standard():
    from transformers import AutoModelForCausalLM

    from tests.support.tiny_models import CONFIGS

    def train(layerwise: bool):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(CONFIGS["qwen2"]())
        # gap 2: projections are refreshed twice in 5 steps, per matrix, in both modes
        opt = ApolloMini(model.parameters(), lr=1e-3, update_proj_gap=2)
        if layerwise:
            handles = opt.layerwise()
        ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(3))
        for _ in range(5):
            model(ids, labels=ids).loss.backward()
            if layerwise:
                assert all(p.grad is None for p in model.parameters())  # freed as it went
            else:
                opt.step()
                opt.zero_grad()
        if layerwise:
            for h in handles:
                h.remove()
        return [p.detach() for p in model.parameters()]

    for a, b in zip(train(False), train(True), strict=True):
        assert torch.equal(a, b)
