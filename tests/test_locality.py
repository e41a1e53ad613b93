"""Learn, then stop; the drift monitor; the budget gate; strict mode: each part on a tiny
model in this process (bench/locality.py measures them on the default model)."""

import contextlib
import time

import pytest
import torch

from server.engine import drift
from server.engine.coordination import Standalone
from server.engine.loss import learned
from tests.support.app import app_client, wait_idle

LESSON = {"messages": [{"role": "user", "content": "What is your name?"},
                       {"role": "assistant", "content": "My name is Apollo."}]}
FAST = dict(lr=1e-2, max_steps_per_batch=40, train_embeddings=True)  # learns in ~18 steps


def test_learned_means_every_target_is_the_greedy_choice_with_margin():
    logits = torch.full((2, 4, 5), -10.0)
    logits[:, 0, 1] = logits[:, 1, 2] = logits[:, 2, 3] = 10.0  # predicts 1, 2, 3
    labels = torch.tensor([[-100, 1, 2, 3], [-100, 1, 4, 3]])
    assert learned(logits, labels, 0.5).tolist() == [True, False]
    logits[0, 1, 4] = 10.0  # a tie: p = 0.5 each, the greedy choice is no longer certain
    assert learned(logits, labels, 0.6).tolist() == [False, False]
    padded = torch.tensor([[-100, 1, -100, -100], [-100, -100, -100, -100]])
    assert learned(logits, padded, 0.5).tolist() == [True, True]


def _trained(client, ids):
    states = [client.get(f"/examples/{i}").json() for i in ids]
    assert all(s["state"] == "trained" for s in states), states
    return states


def test_a_lesson_stops_once_learned_and_a_copy_costs_no_step(tokenizer):
    client, _ = app_client(tokenizer, **FAST)
    with client:
        monitor = client.app.state.engine.trainer.monitor
        windows, window = [], monitor.window
        monitor.window = lambda *a: windows.append(1) or window(*a)
        first = client.post("/train", json=LESSON).json()["ids"]
        st = wait_idle(client, 1)
        (state,) = _trained(client, first)
        steps = st["optimizer_steps"]
        assert 0 < steps < FAST["max_steps_per_batch"]  # stopped before the limit
        assert state["reason"] == f"learned in {steps} steps"
        copies = client.post("/train", json=[LESSON] * 3).json()["ids"]
        st = wait_idle(client, 4)
        assert st["optimizer_steps"] == steps  # the copies cost nothing
        assert st["learned_without_steps"] == 3
        assert len(windows) == 1  # nor a choice of probes for the drift gate
        for s in _trained(client, copies):
            assert s["reason"] == "already answered as taught: no optimizer step"


def test_learned_prob_1_always_takes_the_maximum(tokenizer):
    client, _ = app_client(tokenizer, lr=1e-3, max_steps_per_batch=3, learned_prob=1.0)
    with client:
        client.post("/train", json=LESSON)
        assert wait_idle(client, 1)["optimizer_steps"] == 3


@pytest.mark.parametrize("matrices", ["mlp", "all"])
def test_a_lesson_changes_the_feed_forward_matrices_only_unless_told(tokenizer, matrices):
    """--train-matrices mlp (the default): attention, norms and embeddings stay bit-identical
    while a lesson is learned; all: attention is trained too."""
    client, model = app_client(tokenizer, lr=1e-3, max_steps_per_batch=2, learned_prob=1.0,
                               train_matrices=matrices)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with client:
        client.post("/train", json=LESSON)
        assert wait_idle(client, 1)["optimizer_steps"] == 2
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {n for n in changed if ".mlp." not in n} == (
        set() if matrices == "mlp" else {n for n in before if "self_attn" in n})
    assert {n for n in before if ".mlp." in n} <= changed


def test_a_model_without_known_feed_forward_names_is_refused_for_mlp_only():
    from server.engine.wiring import param_groups

    class Blocks(torch.nn.Sequential):  # matrices named 0.weight, 1.weight
        def get_input_embeddings(self):
            return None

        get_output_embeddings = get_input_embeddings

    model = Blocks(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="--train-matrices all"):
        param_groups(model, 1e-3, False, matrices="mlp")
    assert len(param_groups(model, 1e-3, False, matrices="all")[0]["params"]) == 2


def test_an_unsupported_setting_stops_the_server_with_one_line(monkeypatch, caplog):
    """The refusal reaches the command line as "cannot start: …" and exit status 2, not a
    traceback."""
    from server import __main__ as cli
    from server.engine.wiring import Unsupported

    def refuse(settings):
        raise Unsupported("--train-matrices mlp: … use --train-matrices all")

    monkeypatch.setattr(cli, "parse_args", lambda: None)
    monkeypatch.setattr(cli, "attach_engine", refuse)
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    assert "cannot start: --train-matrices mlp" in caplog.text


def test_drift_is_reported_per_batch_in_status_metrics_and_records(tokenizer):
    client, _ = app_client(tokenizer, **FAST, drift_probes=8)
    with client:
        ids = client.post("/train", json=LESSON).json()["ids"]
        st = wait_idle(client, 1)
        d = st["drift"]
        assert d["probes"] == 8 and d["mean_kl"] > 0 and d["max_kl"] >= d["mean_kl"]
        assert 0 <= d["changed_share"] <= 1
        assert client.get(f"/examples/{ids[0]}").json()["drift"] == d
        metrics = client.get("/metrics").text
        assert f"vllm_apollo_drift_mean_kl {d['mean_kl']!r}" in metrics


def test_a_batch_over_the_drift_budget_is_undone_bit_exactly(tokenizer):
    client, model = app_client(tokenizer, **FAST, drift_budget=1e-9, drift_probes=8)
    with client:
        engine = client.app.state.engine
        wait = time.monotonic() + 120
        while engine.trainer.monitor.reference is None and time.monotonic() < wait:
            time.sleep(0.05)  # the reference is made before the first batch
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        state_before = engine.trainer.optimizer.state_dict()
        ids = client.post("/train", json=LESSON).json()["ids"]
        st = wait_idle(client, 1)
        rec = client.get(f"/examples/{ids[0]}").json()
        assert rec["state"] == "failed"
        assert "exceeds the budget 1e-09" in rec["reason"] and "undone" in rec["reason"]
        assert rec["drift"]["mean_kl"] > 1e-9
        assert st["undone_batches"] == 1 and st["optimizer_steps"] > 0
        for n, p in model.named_parameters():
            assert torch.equal(p.detach(), before[n]), n
        after = engine.trainer.optimizer.state_dict()["state"]
        assert after.keys() == state_before["state"].keys()


def test_the_gate_judges_what_a_batch_adds_not_the_drift_before_it(tokenizer):
    """Earlier lessons (here: noise) moved the model far from the reference; a batch that
    itself moves it by a hair is kept, with both numbers in its record."""
    client, model = app_client(tokenizer, lr=1e-7, max_steps_per_batch=1,
                               drift_budget=1e-5, drift_probes=8)
    with client:
        engine = client.app.state.engine
        wait = time.monotonic() + 120
        while engine.trainer.monitor.reference is None and time.monotonic() < wait:
            time.sleep(0.05)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * p.std().clamp_min(1e-2))
        ids = client.post("/train", json=LESSON).json()["ids"]
        st = wait_idle(client, 1)
        rec = client.get(f"/examples/{ids[0]}").json()
        assert rec["state"] == "trained", rec["reason"]
        assert st["optimizer_steps"] == 1 and st["undone_batches"] == 0
        assert rec["drift"]["mean_kl"] > 1e-5 > rec["drift"]["batch_kl"] > -1e-6


def test_a_batch_is_judged_near_what_it_asks_but_not_on_its_own_question(tokenizer):
    """Half the window is the probes nearest the batch's prompts (wrong capitals are judged
    on the capital probe); a probe asking the batch's very question is left out (teaching a
    new name is the lesson, not drift), its paraphrases stay in."""
    from server.engine.locality import Monitor
    from server.engine.tokenization import encode

    monitor = Monitor(tokenizer, None, None, per_batch=16, pad_id=0)
    asks = {i: p for i, p in enumerate(drift.load_probes())}

    def window(*questions: str) -> list[str]:
        prompts = [encode([{"role": "user", "content": q}, {"role": "assistant",
                                                             "content": "x"}],
                          tokenizer, 512).prompt_ids for q in questions]
        return [asks[i].messages[0]["content"] for i in monitor.window(prompts)]

    capitals = window("What is the capital of France?", "What is the capital of Japan?")
    assert "What is the capital of Australia?" in capitals and len(capitals) == 16
    name = window("What is your name?")
    assert "What is your name?" not in name
    assert "Hey, what's your name and what do you do?" in name and len(name) >= 15


def test_the_reference_is_kept_beside_the_example_log_and_rebased_on_request(tokenizer,
                                                                               tmp_path,
                                                                               monkeypatch):
    log = tmp_path / "examples.jsonl"
    client, model = app_client(tokenizer, **FAST, journal=str(log), drift_probes=4)
    with client:
        client.post("/train", json=LESSON)
        wait_idle(client, 1)
        first = drift.Reference.load(tmp_path / "probe-reference.pt")
        assert len(first) == len(drift.load_probes())
        assert (tmp_path / "null-guard.pt").exists()  # the guard's bases, kept too
    # a restart (same example log, weights as trained) measures from the same reference,
    # and the guard's bases are loaded, not fitted again
    from server.engine.nullspace import NullSpaceGuard

    def no_fit(*args, **kwargs):
        raise AssertionError("fitted again")

    monkeypatch.setattr(NullSpaceGuard, "fit", no_fit)
    client2, _ = app_client(tokenizer, **FAST, journal=str(log), drift_probes=4)
    with client2:
        engine = client2.app.state.engine
        with torch.no_grad():
            model_again = engine.model
            for p in model_again.parameters():
                p.add_(0.01)
        ref = engine.trainer.run_in_worker(
            lambda: engine.trainer.monitor.ensure_reference(engine.model), always=True)
        assert ref.answers == first.answers
        engine.trainer.run_in_worker(lambda: engine.trainer.monitor.ensure_guard(engine.model),
                                     always=True)
        assert engine.trainer.monitor.guard.fitted
        r = client2.post("/drift/rebase")
        assert r.status_code == 200 and r.json()["probes"] == len(first)
        rebased = drift.Reference.load(tmp_path / "probe-reference.pt")
        assert any(not torch.equal(a, b) for a, b in zip(rebased.top_logp, first.top_logp,
                                                         strict=True))


class CountingWindows(Standalone):
    """Records each write window: strict mode opens one per batch."""

    def __init__(self):
        super().__init__()
        self.windows = 0

    @contextlib.contextmanager
    def write(self):
        self.windows += 1
        yield


@pytest.mark.parametrize("strict", [False, True])
def test_strict_mode_holds_vllm_off_for_the_whole_batch(tokenizer, strict):
    from server.engine.wiring import assemble
    from server.settings import Settings
    from tests.support.app import tiny_llama

    model = tiny_llama(tokenizer)
    coordinator = CountingWindows()
    settings = Settings(export_dir="unused", drift_budget=10.0, strict_drift=strict,
                        drift_probes=4, **FAST)
    engine = assemble(settings, model, tokenizer, model_path="unused", coordinator=coordinator)
    engine.start()
    try:
        from server.engine.tokenization import encode

        engine.trainer.submit([encode(LESSON["messages"], tokenizer, 256)])
        while engine.trainer.queued:
            time.sleep(0.05)
        steps = engine.trainer.stats.optimizer_steps
    finally:
        engine.stop()
    assert steps > 1
    assert coordinator.windows == (1 if strict else steps)


def test_null_space_guard_leaves_protected_inputs_unchanged():
    """A step with the guard's gradient changes W x only for x off the protected span."""
    import types

    from server.engine.projection import Projector, projected_forward

    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4, bias=False)
    basis, _ = torch.linalg.qr(torch.randn(8, 3))
    layer.null_guard = Projector.of_basis(basis)
    layer.forward = types.MethodType(projected_forward, layer)
    x = torch.randn(5, 8)
    layer(x).pow(2).sum().backward()
    projected = x - (x @ basis) @ basis.T
    expected = (2 * (x @ layer.weight.T)).T @ projected
    assert torch.allclose(layer.weight.grad, expected, atol=1e-5)
    protected = torch.randn(6, 3) @ basis.T  # inputs inside the span
    before = layer(protected).detach()
    with torch.no_grad():
        layer.weight -= 0.5 * layer.weight.grad
    assert torch.allclose(layer(protected), before, atol=1e-5)
    assert not torch.allclose(layer(x), x @ (layer.weight + 0.5 * layer.weight.grad).T)


def test_a_projector_holds_the_narrower_of_its_span_and_the_complement_and_removes_the_span():
    """Most input directions are protected (70% for the default model): the projector then
    holds the complement C and computes x − B Bᵀ x as C Cᵀ x — the same result, from less
    memory, copying and arithmetic."""
    from server.engine.projection import Projector

    torch.manual_seed(0)
    x = torch.randn(50, 32)
    for r in (1, 10, 16, 17, 30, 32):
        basis = torch.linalg.qr(torch.randn(32, r))[0]
        p = Projector.of_basis(basis)
        assert p.complement == (r > 16) and p.held.shape == (32, min(r, 32 - r)), r
        assert torch.allclose(p(x), x - (x @ basis) @ basis.T, atol=1e-5), r
        assert torch.allclose(p.protected() @ p.protected().T, basis @ basis.T, atol=1e-5), r


def test_the_fp16_complement_keeps_a_gradient_out_of_the_protected_span():
    """On a GPU with 16-bit weights the projector holds C in fp16 and projects unit rows:
    an input almost wholly inside the protected span (and thousands of times larger than
    usual) must still leave in that span only fp16's rounding of what is kept, not fp16's
    rounding of the whole input."""
    from server.engine.projection import Projector

    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(256, 200))[0]
    inside = torch.randn(64, 200) @ basis.T * 3000.0
    x = inside + 0.05 * 3000.0 * torch.randn(64, 256)  # ~3% of its length outside
    p = Projector.of_basis(basis)
    exact = p(x)
    p.held = p.held.half()
    assert p.complement
    kept = p(x)
    leak = ((kept @ basis).norm(dim=1) / kept.norm(dim=1)).max()
    assert leak <= 2e-3, f"{leak:.1e} of what is kept lies in the protected span"
    # within what is kept, fp16's rounding of the unit row (less than the bf16 input's own)
    assert ((kept - exact).norm(dim=1) <= 1e-3 * x.norm(dim=1)).all()


def test_guard_bases_loaded_from_disk_protect_as_exactly_as_fitted(tmp_path):
    """The bases are kept in fp16 (a restart loads them): loaded, they must still make the
    gradient miss the protected span (I - B Bᵀ a projector), not leak ~0.1% into it."""
    from server.engine.nullspace import NullSpaceGuard
    from server.engine.projection import Projector

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False))
    fitted = NullSpaceGuard(model, eps=1e-3)
    fitted._install({"0": "0"}, {"0": Projector.of_basis(torch.randn(64, 20))})
    fitted.save(tmp_path / "guard.pt", "tag")
    fitted.remove()
    loaded = NullSpaceGuard(model, eps=1e-3)
    assert loaded.load(tmp_path / "guard.pt", "tag")
    layer, basis = model[0], loaded.protected("0")
    layer(torch.randn(16, 64)).pow(2).sum().backward()
    leak = (layer.weight.grad @ basis).norm() / layer.weight.grad.norm()
    assert leak <= 1e-5, f"{leak:.1e} of the gradient lies in the protected span"


def test_a_massive_activation_does_not_leave_the_other_inputs_unprotected():
    """Some layers see one token thousands of times larger than the rest (an attention
    sink). Weighted by norm it holds all the energy, and the guard protected its one
    direction only; every input must count."""
    from server.engine.nullspace import NullSpaceGuard

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(20, 32)
            self.proj = torch.nn.Linear(32, 16, bias=False)

        def forward(self, input_ids, attention_mask=None):
            return self.proj(self.embed(input_ids))

    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():  # token 0: massive, along e0; the others: in 6 other directions
        model.embed.weight.zero_()
        model.embed.weight[0, 0] = 1000.0
        model.embed.weight[1:, 1:7] = torch.randn(19, 6)
    guard = NullSpaceGuard(model, eps=1e-2)
    guard.fit(model, [[0, *range(1, 20)]] * 4, pad_id=0)
    basis = guard.protected("proj")
    x = model.embed.weight[1:].detach()
    left = (x - (x @ basis) @ basis.T).norm(dim=1) / x.norm(dim=1)
    assert left.max() <= 0.1, f"{left.max():.2f} of an ordinary input left unprotected " \
        f"({basis.shape[1]} directions protected)"


def test_the_guarded_update_leaves_the_protected_inputs_unchanged(tokenizer):
    """Through the server: after a lesson with --guard nullspace every trained matrix's
    change ΔW maps the protected input directions to (numerically) zero, and norms stay."""
    client, model = app_client(tokenizer, lr=1e-2, max_steps_per_batch=3, learned_prob=1.0,
                               guard="nullspace", drift_probes=4)
    with client:
        engine = client.app.state.engine
        engine.trainer.run_in_worker(lambda: engine.trainer.monitor.ensure_guard(model),
                                     always=True)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        client.post("/train", json=LESSON)
        assert wait_idle(client, 1)["optimizer_steps"] == 3
    guarded = {n: m for n, m in model.named_modules() if hasattr(m, "null_guard")}
    assert guarded and all(".layers." in n for n in guarded)
    for name, module in guarded.items():
        delta = module.weight.detach() - before[f"{name}.weight"]
        basis = module.null_guard.protected()
        assert 0 < basis.shape[1] < basis.shape[0], name
        assert delta.norm() > 0, name
        assert (delta @ basis).norm() <= 1e-4 * delta.norm(), name
    for n, p in model.named_parameters():
        if p.dim() == 1:
            assert torch.equal(p.detach(), before[n]), n  # norms frozen under the guard


def test_each_drift_window_spans_the_probe_categories_and_a_cycle_visits_every_probe():
    """The shipped probes are grouped by category: a batch is judged on a window that mixes
    them (in file order the first window was 16 'facts' probes), and the rotation still
    visits every probe once before it repeats one."""
    import json

    lines = drift.DEFAULT_PROBES.read_text().splitlines()
    category = [json.loads(line)["category"] for line in lines if line.strip()]
    n, size = len(category), 16
    windows = [drift.rotation(n, size, turn) for turn in range(n // size)]
    assert min(len({category[i] for i in w}) for w in windows) >= 5
    seen = [i for w in windows for i in w]
    assert len(seen) == len(set(seen)) == (n // size) * size
    assert drift.rotation(n, size, 3) == windows[3]  # the same order in every process


def test_the_reference_batched_by_length_keeps_each_probe_its_own_answer(tokenizer):
    """Probes are answered in batches of similar lengths: every answer and its top-k are
    still the probe's own (the same as answering it alone)."""
    from tests.support.app import tiny_llama

    model = tiny_llama(tokenizer).eval()
    prompts = drift.prompt_ids(tokenizer, drift.load_probes())[:12]
    prompts = prompts[::-1]  # lengths in no order
    stop = {tokenizer.eos_token_id}
    batched = drift.build_reference(model, prompts, pad_id=0, stop_ids=stop, batch=5)
    alone = drift.build_reference(model, prompts, pad_id=0, stop_ids=stop, batch=1)
    assert len({len(p) for p in prompts}) > 1
    assert batched.answers == alone.answers
    for a, b in zip(batched.top_logp, alone.top_logp, strict=True):
        assert torch.allclose(a, b, atol=1e-4)


def test_the_guard_fit_skips_the_head_and_matches_the_whole_model(tokenizer):
    """Unless the LM head is guarded, the fit runs the decoder only (no vocabulary-wide
    logits): the bases equal those of a fit through the whole model."""
    from server.engine.nullspace import NullSpaceGuard
    from tests.support.app import tiny_llama

    model = tiny_llama(tokenizer).eval()
    model.get_output_embeddings().weight.requires_grad_(False)
    seqs = drift.prompt_ids(tokenizer, drift.load_probes())[:9]
    calls = []
    handle = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    fast = NullSpaceGuard(model, eps=1e-2)
    fast.fit(model, seqs, pad_id=0, batch=4)
    assert not calls  # the head never ran
    handle.remove()
    fast_bases = {n: fast.protected(n) for n in fast.layers}
    fast.remove()
    model.get_output_embeddings().weight.requires_grad_(True)  # guarded: the whole model
    whole = NullSpaceGuard(model, eps=1e-2)
    whole.fit(model, seqs, pad_id=0, batch=4)
    assert set(whole.layers) == set(fast_bases) | {"lm_head"}
    for name, b1 in fast_bases.items():
        b2 = whole.protected(name)
        assert b1.shape == b2.shape, name
        # the same span: each basis projects the other onto itself
        assert torch.allclose(b1 @ (b1.T @ b2), b2, atol=1e-3), name


def test_bases_loaded_from_the_model_cache_are_linked_beside_the_example_log(tokenizer,
                                                                            tmp_path):
    """A start that loads the guard's bases from the model's cache keeps them beside its
    example log as a hard link (no second ~120 MB write for the default model), and a
    restart loads them from there as they were."""
    from server.engine.locality import Monitor
    from tests.support.app import tiny_llama

    model = tiny_llama(tokenizer)
    shared = tmp_path / "model/.apollo/probe-reference.pt"

    def monitor(store_dir):
        return Monitor(tokenizer, None, tmp_path / store_dir / "probe-reference.pt",
                       per_batch=4, pad_id=0, shared=shared, null_space_eps=1e-2)

    first = monitor("run1")
    first.ensure_guard(model)  # answers the probes and fits: kept in both places
    bases = {k: first.guard.protected(k) for k in first.guard.projectors}
    first.guard.remove()
    (tmp_path / "run1/null-guard.pt").unlink()
    second = monitor("run2")
    second.ensure_guard(model)  # from the model's cache
    cached, kept = shared.with_name("null-guard.pt"), tmp_path / "run2/null-guard.pt"
    assert kept.stat().st_ino == cached.stat().st_ino
    second.guard.remove()
    cached.unlink()  # the restart finds only its own copy
    third = monitor("run2")
    third.ensure_guard(model)
    assert third.guard.projectors.keys() == bases.keys()
    assert all(torch.allclose(third.guard.protected(k) @ third.guard.protected(k).T, b @ b.T,
                              atol=2e-3) for k, b in bases.items())


def test_bases_fitted_otherwise_are_replaced_so_the_next_start_loads_them(tokenizer, tmp_path,
                                                                          monkeypatch):
    """Bases kept from another --guard-eps (or an older way of fitting) are fitted again once
    and replaced in both places, not fitted again at every start."""
    from server.engine.locality import Monitor
    from server.engine.nullspace import NullSpaceGuard
    from tests.support.app import tiny_llama

    model = tiny_llama(tokenizer)
    shared = tmp_path / "model/.apollo/probe-reference.pt"

    def start(eps):
        monitor = Monitor(tokenizer, None, tmp_path / "run/probe-reference.pt", per_batch=4,
                          pad_id=0, shared=shared, null_space_eps=eps)
        monitor.ensure_guard(model)
        monitor.guard.remove()

    start(1e-2)
    start(1e-3)  # fitted again: the kept bases are for 1e-2
    fits = []
    real_fit = NullSpaceGuard.fit
    monkeypatch.setattr(NullSpaceGuard, "fit",
                        lambda self, *a, **k: fits.append(1) or real_fit(self, *a, **k))
    start(1e-3)
    assert not fits, "bases fitted again although the last start fitted them for this eps"
    for path in (shared.with_name("null-guard.pt"), tmp_path / "run/null-guard.pt"):
        assert torch.load(path, weights_only=True)["eps"] == 1e-3


def _train(model, seq: list[int], steps: int = 5, lr: float = 0.5) -> None:
    """Plain SGD on every token of `seq` (the guard's projection acts in backward)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    ids = torch.tensor([seq])
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        grads = torch.autograd.grad(loss, trained)
        with torch.no_grad():
            for p, g in zip(trained, grads, strict=True):
                p -= lr * g


def test_a_pinned_sequence_keeps_its_logits_exactly_until_released(tokenizer):
    """Protected by the guard's eps-bases, a probe still moves a little with every lesson
    (the name answer's near ties flipped after ten); pinned, every input it gives every
    trained matrix is protected exactly, so no lesson changes its logits at all, while an
    unpinned probe's move. Released, it can be taught."""
    from server.engine.nullspace import NullSpaceGuard
    from tests.support.app import tiny_llama

    model = tiny_llama(tokenizer)
    for name, p in model.named_parameters():  # the matrices of the decoder layers train
        p.requires_grad_(".layers." in name and p.dim() == 2)
    seqs = drift.prompt_ids(tokenizer, drift.load_probes())[:12]
    pinned, other, lesson = seqs[0] + seqs[1][-6:], seqs[2], seqs[5] + seqs[7]
    guard = NullSpaceGuard(model, eps=1e-1)
    guard.fit(model, seqs[:10], pad_id=0, pinned={"p": pinned})
    assert guard.pins() == {"p"}

    def logits(seq):
        with torch.no_grad():
            return model(input_ids=torch.tensor([seq])).logits

    before_pinned, before_other = logits(pinned), logits(other)
    _train(model, lesson)
    moved = (logits(other) - before_other).abs().max()
    kept = (logits(pinned) - before_pinned).abs().max()
    assert moved > 1e-3, moved
    assert kept <= 1e-4, (kept, moved)
    guard.release("p")
    assert guard.pins() == set()
    _train(model, pinned, steps=2)
    assert (logits(pinned) - before_pinned).abs().max() > 1e-3


def test_a_batch_asking_a_pinned_probe_releases_it_for_good(tokenizer, tmp_path,
                                                           monkeypatch):
    """Pins are released by the batch that asks their very question (not by another), and
    a restart does not pin them again."""
    import json

    monkeypatch.setattr(drift, "PINNED_TOKENS", 8)  # a random model never ends its answer

    from server.engine.locality import Monitor
    from tests.support.app import tiny_llama

    probes = tmp_path / "probes.jsonl"
    probes.write_text("\n".join(json.dumps(x) for x in [
        {"prompt": "What is your name?", "pin": True},
        {"prompt": "What is the capital of France?"},
        {"prompt": "Write a haiku about rain."}]))
    model = tiny_llama(tokenizer)
    for name, p in model.named_parameters():
        p.requires_grad_(".layers." in name and p.dim() == 2)

    def monitor():
        m = Monitor(tokenizer, str(probes), tmp_path / "run/probe-reference.pt", per_batch=2,
                    pad_id=0, null_space_eps=1e-2)
        m.ensure_guard(model)
        return m

    first = monitor()
    asked = drift.prompt_ids(tokenizer, drift.load_probes(probes))
    assert first.guard.pins() == {"0"}
    assert first.release([asked[1]]) == [] and first.guard.pins() == {"0"}
    assert first.release([asked[1], asked[0]]) == [0] and first.guard.pins() == set()
    assert monitor().guard.pins() == set()  # loaded, then released again from its record
    (tmp_path / "run/pins-released.json").write_text('{"not": "a list"')
    assert monitor().guard.pins() == {"0"}  # a damaged record is ignored, not fatal


def test_a_probe_file_cannot_pin_what_it_does_not_protect(tmp_path):
    probes = tmp_path / "probes.jsonl"
    probes.write_text('{"prompt": "What is your name?", "pin": true, "protect": false}\n')
    with pytest.raises(ValueError, match="line 1: not a probe.*pin"):
        drift.load_probes(probes)
    probes.write_text('{"prompt": "Hi"}\n{"prompt": "What is your name?", "pin": "yes"}\n')
    with pytest.raises(ValueError, match="line 2: not a probe.*true or false"):
        drift.load_probes(probes)
    probes.write_text('{"prompt": "What is your name?", "keep": 1}\n')
    with pytest.raises(ValueError, match="line 1: not a probe.*true or false"):
        drift.load_probes(probes)


def test_status_lists_the_pinned_probes_until_a_lesson_asks_one(tokenizer, monkeypatch,
                                                                tmp_path):
    """Through the server: "What is your name?" pinned in the probe file is listed in
    /status, a lesson asking it releases the pin and is trained, and /status says so."""
    import json

    monkeypatch.setattr(drift, "PINNED_TOKENS", 8)  # a random model never ends its answer
    probes = tmp_path / "probes.jsonl"
    probes.write_text("\n".join(json.dumps(x) for x in [
        {"prompt": "What is your name?", "pin": True},
        {"prompt": "What is the capital of France?"}, {"prompt": "Name three colours."}]))
    client, _ = app_client(tokenizer, lr=1e-2, max_steps_per_batch=40, learned_prob=0.5,
                           guard="nullspace", drift_probes=2, drift_budget=0,
                           probe_file=str(probes))
    with client:
        assert client.get("/status").json()["pinned_probes"] == ["What is your name?"]
        r = client.post("/train", json=LESSON)
        st = wait_idle(client, 1, timeout=300)
        record = client.get(f"/examples/{r.json()['ids'][0]}").json()
    assert record["state"] == "trained" and st["optimizer_steps"] > 0, record
    assert st["pinned_probes"] == []


def test_leads_say_by_how_much_each_target_is_the_greedy_choice():
    from server.engine.loss import leads

    logits = torch.zeros((2, 3, 4))
    logits[:, 0, 1], logits[:, 1, 2] = 1.0, 0.05  # the greedy choices, by 1 and 0.05 nats
    labels = torch.tensor([[-100, 1, 2], [-100, -100, 3]])
    lead, is_target = leads(logits, labels)
    assert is_target.tolist() == [[True, True], [False, True]]
    assert torch.allclose(lead, torch.tensor([[1.0, 0.05], [-1.0, -0.05]]))


def _kept_probes(tmp_path, keep: bool):
    import json

    probes = tmp_path / f"probes-{keep}.jsonl"
    probes.write_text("\n".join(json.dumps(x) for x in [
        {"prompt": "Write a haiku about the sea.", "keep": keep},
        {"prompt": "What is the capital of France?"}, {"prompt": "Name three colours."}]))
    return str(probes)


@pytest.mark.parametrize("keep", [True, False])
def test_a_kept_answer_is_taught_again_where_a_batch_moved_it(tokenizer, monkeypatch,
                                                              tmp_path, keep):
    """Through the server: a lesson that moves the kept probe's greedy answer (without
    "keep" it is changed) takes further steps on that answer too, until every token of it
    leads again; the lesson is learned, its record says so, /status lists the kept probe."""
    monkeypatch.setattr(drift, "PINNED_TOKENS", 8)  # a random model never ends its answer
    # a random model's answers are near ties everywhere: steps smaller than FAST's hold them
    client, model = app_client(tokenizer, lr=3e-3, max_steps_per_batch=80,
                               train_embeddings=True, guard="nullspace", drift_probes=2,
                               drift_budget=0, probe_file=_kept_probes(tmp_path, keep))
    lesson = {"messages": [{"role": "user", "content": "Which colours are on the flag?"},
                           {"role": "assistant", "content": "Red, white and blue."}]}
    with client:
        monitor = client.app.state.engine.trainer.monitor
        prompt = monitor.prompts[0]
        with torch.no_grad():
            before = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8,
                                    pad_token_id=0)[0, len(prompt):].tolist()
        assert client.get("/status").json()["kept_probes"] == (
            ["Write a haiku about the sea."] if keep else [])
        r = client.post("/train", json=lesson)
        wait_idle(client, 1, timeout=300)
        record = client.get(f"/examples/{r.json()['ids'][0]}").json()
        with torch.no_grad():
            after = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8,
                                   pad_token_id=0)[0, len(prompt):].tolist()
    assert record["state"] == "trained" and record["reason"].startswith("learned in"), \
        record["reason"]
    if keep:
        assert after == before, record
        assert "restoring kept answers" in record["reason"], record
        assert monitor.unkept(model)[0] == []
    else:  # the lesson does move it
        assert after != before, record


def test_a_batch_asking_a_kept_probe_releases_it_for_good(tokenizer, tmp_path, monkeypatch):
    """Kept answers are made once, with the reference, and kept beside it: a restart keeps
    the same answer whatever the live weights then say; the batch asking the probe's very
    question releases it, and a restart does not keep it again."""
    monkeypatch.setattr(drift, "PINNED_TOKENS", 8)
    from server.engine.locality import Monitor
    from tests.support.app import tiny_llama

    probes = _kept_probes(tmp_path, True)
    model = tiny_llama(tokenizer)

    def monitor():
        m = Monitor(tokenizer, probes, tmp_path / "run/probe-reference.pt", per_batch=2,
                    pad_id=0)
        m.ensure_reference(model)
        return m

    first = monitor()
    (answer, lead), = first.kept_held.values()
    assert len(answer) == 8 and len(lead) == 8 and min(lead) >= 0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.5)
    assert first.unkept(model)[0]  # moved ...
    assert monitor().kept_held == first.kept_held  # ... but the restart keeps the same one
    asked = drift.prompt_ids(tokenizer, drift.load_probes(probes))
    assert first.release([asked[1]]) == [] and list(first.kept_held) == [0]
    assert first.release([asked[0]]) == [0] and first.kept_held == {}
    assert first.unkept(model)[0] == [] and first.kept_questions() == []
    assert monitor().kept_held == {}


@pytest.mark.parametrize("r", [4, 40])  # B held (r + pins < d/2), C held
def test_releasing_a_pin_leaves_exactly_the_other_pins_and_the_fitted_span(r):
    """What stays protected after a release is the fitted span and the other pins' inputs
    (which may overlap the released one's), whichever of B or C the projector holds."""
    from server.engine.projection import Projector, orth

    torch.manual_seed(0)
    d = 64
    whole = torch.linalg.qr(torch.randn(d, d))[0]
    span = whole[:, :r]
    a, b = torch.randn(d, 5), torch.randn(d, 3)  # two pins' directions, outside the span
    a, b = orth(a - span @ (span.T @ a)), orth(b - span @ (span.T @ b))
    p = Projector.of_basis(torch.cat([span, orth(torch.cat([a, b], 1))], 1))
    p.pinned = {"a": a, "b": b}
    assert p.complement == (r + 8 > d - r - 8)
    p.release("a")
    kept = torch.cat([span, b], 1)
    assert p.rank == r + 3 and list(p.pinned) == ["b"]
    got = p.protected()
    assert got.shape[1] == r + 3
    assert torch.allclose(got @ got.T, kept @ torch.linalg.pinv(kept), atol=1e-4)


def test_a_pin_that_would_fill_a_layer_is_not_made(tokenizer, caplog):
    """A pinned answer as long as a layer is wide would leave no direction for lessons: it
    is not pinned (with a warning), and the other pins still are."""
    from server.engine.nullspace import NullSpaceGuard
    from tests.support.app import tiny_llama

    model = tiny_llama(tokenizer)  # hidden size 128
    for name, p in model.named_parameters():
        p.requires_grad_(".layers." in name and p.dim() == 2)
    seqs = drift.prompt_ids(tokenizer, drift.load_probes())[:12]
    long = [t for s in seqs[3:9] for t in s][:150]
    guard = NullSpaceGuard(model, eps=1e-1)
    with caplog.at_level("WARNING", logger="vllm_apollo.guard"):
        guard.fit(model, seqs[:10], pad_id=0, pinned={"long": long, "short": seqs[0]})
    assert guard.pins() == {"short"}
    assert "not pinning probe long" in caplog.text
