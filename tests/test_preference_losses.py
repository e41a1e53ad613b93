"""DPO and KTO against TRL's own trainers: for the same tokens and reference log-probs, the
loss values and the gradients on every weight of a tiny model equal TRL's within 1e-5.

TRL (1.16) computes these losses inside DPOTrainer._compute_loss / KTOTrainer._compute_loss
(no standalone loss function); those methods are called here on a stand-in `self` holding
the attributes their __init__ sets from TRL's default configs, with TRL's fused LM head on
the model and the reference log-probs given as precomputed (`precompute_ref_log_probs`).
"""

from collections import defaultdict
from types import MethodType, SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

trl = pytest.importorskip("trl")
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from server.engine.loss import collate, dpo_loss, kto_kl, kto_loss, sequence_logps  # noqa: E402
from server.engine.objective import Objective, Weights, mismatched  # noqa: E402
from server.engine.tokenization import IGNORE_INDEX, Encoded  # noqa: E402
from tests.support.tiny_models import CONFIGS  # noqa: E402

CPU = torch.device("cpu")
TOL = 1e-5


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS["llama"](), dtype=torch.float32)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    return model


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _answer(prompt: list[int], completion: list[int], kind: str = "demo") -> Encoded:
    return Encoded(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion, kind=kind)


def _stub(**attrs) -> SimpleNamespace:
    accelerator = SimpleNamespace(device=CPU, gather=lambda x: x,
                                  gather_for_metrics=lambda x: x)
    return SimpleNamespace(model=SimpleNamespace(training=True), accelerator=accelerator,
                           aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
                           _total_train_tokens=0, _tp_size=1, beta=0.1, **attrs)


def _dpo_trl(model, rows: list[Encoded], ref: torch.Tensor, sft: float = 0.0) -> torch.Tensor:
    """TRL's DPO loss; `rows` are the chosen answers, then the rejected ones; with `sft`,
    loss_type ["sigmoid", "sft"] weighted [1, sft]."""
    types, weights = (["sigmoid", "sft"], [1.0, sft]) if sft else (["sigmoid"], [1.0])
    stub = _stub(ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                 loss_types=types, loss_weights=weights, use_weighting=False)
    ids, labels, mask = collate(rows, 0, CPU)
    n = len(rows) // 2
    inputs = {"input_ids": ids, "attention_mask": mask,
              "completion_mask": (labels != IGNORE_INDEX).long(),
              "ref_chosen_logps": ref[:n], "ref_rejected_logps": ref[n:]}
    return DPOTrainer._compute_loss(stub, model, inputs, False)


def _kto_trl(model, rows: list[Encoded], desirable: list[bool], ref: torch.Tensor,
             ref_kl: torch.Tensor | None) -> torch.Tensor:
    """TRL's KTO loss; KL rows built as TRL's dataset map builds them (completions rotated
    by one within the batch); without `ref_kl`, TRL's no-KL path (z0 = 0)."""
    stub = _stub(calculate_KL=ref_kl is not None, precompute_ref_logps=True, loss_type="kto",
                 desirable_weight=1.0, undesirable_weight=1.0)
    stub._compute_kl_logps = MethodType(KTOTrainer._compute_kl_logps, stub)
    ids, labels, mask = collate(rows, 0, CPU)
    inputs = {"input_ids": ids, "attention_mask": mask,
              "completion_mask": (labels != IGNORE_INDEX).long(),
              "label": torch.tensor(desirable), "ref_logps": ref}
    if ref_kl is not None:
        kl_ids, kl_labels, kl_mask = collate(_trl_kl_rows(rows), 0, CPU)
        inputs.update(KL_input_ids=kl_ids, KL_attention_mask=kl_mask,
                      KL_completion_mask=(kl_labels != IGNORE_INDEX).long(), ref_KL_logps=ref_kl)
    return KTOTrainer._compute_loss(stub, model, inputs, False)


def _trl_kl_rows(rows: list[Encoded]) -> list[Encoded]:
    """KTOTrainer's KL_completion_ids: [completion_ids[-1]] + completion_ids[:-1]."""
    starts = [next(i for i, x in enumerate(r.labels) if x != IGNORE_INDEX) for r in rows]
    prompts = [r.input_ids[:s] for r, s in zip(rows, starts, strict=True)]
    completions = [r.input_ids[s:] for r, s in zip(rows, starts, strict=True)]
    completions = [completions[-1]] + completions[:-1]
    return [_answer(p, c) for p, c in zip(prompts, completions, strict=True)]


def _grads(model) -> list[torch.Tensor]:
    out = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
           for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


def _step_away_then_ours(model, objective, loss):
    """One SGD step on `loss` (so the policy differs from the batch-start reference), then
    our loss again and its gradients: what is compared with TRL's."""
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
    model.zero_grad(set_to_none=True)
    ours, _ = objective(model)
    ours.backward()
    return ours, _grads(model)


def _assert_same(ours: torch.Tensor, theirs: torch.Tensor, g_ours, g_theirs) -> None:
    ours, theirs = float(ours.detach()), float(theirs.detach())
    assert abs(ours - theirs) <= TOL, (ours, theirs)
    worst = max(float((a - b).abs().max()) for a, b in zip(g_ours, g_theirs, strict=True))
    scale = max(float(g.abs().max()) for g in g_theirs)
    assert scale > 1e-4  # a real gradient, not two zeros
    assert worst <= TOL, (worst, scale)


def _pairs() -> list[tuple[Encoded, Encoded]]:
    out = []
    for k, (p, c, r) in enumerate([(5, 4, 7), (9, 6, 3), (3, 2, 2)]):
        prompt = _tokens(p, 10 * k)
        out.append((_answer(prompt, _tokens(c, 10 * k + 1)),
                    _answer(prompt, _tokens(r, 10 * k + 2))))
    return out


def test_dpo_loss_and_gradients_equal_trl_for_given_reference_logps():
    model = _model()
    pairs = _pairs()
    rows = [c for c, _ in pairs] + [r for _, r in pairs]
    ref = -torch.rand(len(rows), generator=torch.Generator().manual_seed(3)) * 30 - 10
    ids, labels, mask = collate(rows, 0, CPU)
    logps = sequence_logps(model(input_ids=ids, attention_mask=mask).logits, labels)
    n = len(pairs)
    ours = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta=0.1).mean()
    ours.backward()
    g_ours = _grads(model)
    theirs = _dpo_trl(model, rows, ref)
    theirs.backward()
    _assert_same(ours, theirs, g_ours, _grads(model))


@pytest.mark.parametrize("sft", [0.0, 0.5])
def test_the_trainers_dpo_objective_equals_trl_after_a_step(sft):
    """The objective the trainer steps: its reference is the batch's first forward pass; after
    one SGD step its loss and gradients equal TRL's with that reference precomputed (and with
    --dpo-sft-weight, TRL's loss_type ["sigmoid", "sft"])."""
    model = _model()
    pairs = _pairs()
    batch = []
    for c, r in pairs:
        batch.append(Encoded(c.input_ids, c.labels, kind="pair", rejected=r))
    rows = [c for c, _ in pairs] + [r for _, r in pairs]
    ids, labels, mask = collate(rows, 0, CPU)
    with torch.no_grad():  # TRL's way to a reference: the fused head on the initial weights
        ref = model(input_ids=ids, attention_mask=mask, labels=labels.masked_fill(
            labels == IGNORE_INDEX, -100), fused_lm_head=True).log_probs.sum(-1)
    objective = Objective(batch, 0, CPU, Weights(beta=0.1, pair_sft=sft))
    loss, _ = objective(model)
    if not sft:
        assert abs(float(loss.detach()) - 0.6931472) <= TOL  # log 2: policy == reference
    ours, g_ours = _step_away_then_ours(model, objective, loss)
    theirs = _dpo_trl(model, rows, ref, sft)
    theirs.backward()
    _assert_same(ours, theirs, g_ours, _grads(model))


def _labeled() -> tuple[list[Encoded], list[bool]]:
    rows, desirable = [], []
    for k, (p, c, up) in enumerate([(5, 4, True), (7, 6, False), (4, 3, True), (6, 5, False)]):
        rows.append(_answer(_tokens(p, 100 + k), _tokens(c, 200 + k), "up" if up else "down"))
        desirable.append(up)
    return rows, desirable


def test_kto_loss_and_gradients_equal_trl_for_given_reference_logps():
    model = _model()
    rows, desirable = _labeled()
    g = torch.Generator().manual_seed(4)
    ref = -torch.rand(len(rows), generator=g) * 30 - 10
    ref_kl = -torch.rand(len(rows), generator=g) * 30 - 30  # a positive KL estimate: z0 > 0
    ids, labels, mask = collate(rows, 0, CPU)
    logps = sequence_logps(model(input_ids=ids, attention_mask=mask).logits, labels)
    kl_ids, kl_labels, kl_mask = collate(mismatched(rows), 0, CPU)
    with torch.no_grad():
        kl_logps = sequence_logps(model(input_ids=kl_ids, attention_mask=kl_mask).logits,
                                  kl_labels)
    z0 = kto_kl(kl_logps, ref_kl)
    assert float(z0) > 0
    ours = kto_loss(logps, ref, torch.tensor(desirable), z0, beta=0.1).mean()
    ours.backward()
    g_ours = _grads(model)
    theirs = _kto_trl(model, rows, desirable, ref, ref_kl)
    theirs.backward()
    _assert_same(ours, theirs, g_ours, _grads(model))


@pytest.mark.parametrize("n", [1, 4])
def test_the_trainers_kto_objective_equals_trl_after_a_step(n):
    """With one labeled answer in a batch there is no mismatched pair: z0 = 0, TRL's path
    without a KL estimate (its KTOTrainer refuses batches of one)."""
    model = _model()
    rows, desirable = _labeled()
    rows, desirable = rows[:n], desirable[:n]
    ids, labels, mask = collate(rows, 0, CPU)

    def fused_logps(ids, labels, mask):
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, labels=labels,
                         fused_lm_head=True).log_probs.sum(-1)

    ref = fused_logps(ids, labels, mask)
    ref_kl = fused_logps(*collate(_trl_kl_rows(rows), 0, CPU)) if n > 1 else None
    objective = Objective(rows, 0, CPU, Weights(beta=0.1))
    loss, _ = objective(model)
    assert abs(float(loss.detach()) - 0.5) <= TOL  # 1 - σ(0) for every answer
    ours, g_ours = _step_away_then_ours(model, objective, loss)
    theirs = _kto_trl(model, rows, desirable, ref, ref_kl)
    theirs.backward()
    _assert_same(ours, theirs, g_ours, _grads(model))
