"""optimizer/: it learns — against AdamW on a small corpus, and in place in bf16."""

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimizer import ApolloMini
from tests.support.tiny_models import CONFIGS


def _corpus(steps: int, batch: int = 8, length: int = 32, vocab: int = 512):
    """Sequences from a fixed sparse Markov chain: learnable, not memorisable at once."""
    g = torch.Generator().manual_seed(0)
    successors = torch.randint(0, vocab, (vocab, 4), generator=g)
    for _ in range(steps):
        seq = torch.empty(batch, length, dtype=torch.long)
        seq[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        for t in range(1, length):
            pick = torch.randint(0, 4, (batch,), generator=g)
            seq[:, t] = successors[seq[:, t - 1], pick]
        yield seq


def _final_loss(make_opt, steps: int = 300) -> float:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS["llama"]())
    opt = make_opt(model)
    losses = []
    for ids in _corpus(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return sum(losses[-20:]) / 20


def _groups(model):
    emb = {id(model.model.embed_tokens.weight), id(model.lm_head.weight)}
    matrices = [p for p in model.parameters() if p.dim() == 2 and id(p) not in emb]
    others = [p for p in model.parameters() if p.dim() != 2 or id(p) in emb]
    return [{"params": matrices}, {"params": others, "apollo": False}]


def _run(job: tuple[str, float]) -> float:
    """One run of the sweep, in a worker process on one thread (the runs are independent)."""
    name, lr = job
    torch.set_num_threads(1)
    if name == "adamw":
        return _final_loss(lambda m: torch.optim.AdamW(m.parameters(), lr=lr))
    return _final_loss(lambda m: ApolloMini(_groups(m), lr=lr))


def test_mini_converges_within_5_percent_of_tuned_adamw():
    lrs = (1e-3, 3e-3, 1e-2)
    jobs = [(name, lr) for name in ("adamw", "mini") for lr in lrs]
    # six independent runs of a tiny model: one per core beats two threads on one run
    with ProcessPoolExecutor(min(len(jobs), os.cpu_count() or 1),
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        losses = dict(zip(jobs, pool.map(_run, jobs), strict=True))
    adamw = min(losses["adamw", lr] for lr in lrs)
    mini = min(losses["mini", lr] for lr in lrs)
    print(f"\nfinal loss after 300 steps: AdamW {adamw:.4f}, APOLLO-Mini {mini:.4f}")
    assert mini <= 1.05 * adamw


@pytest.mark.e2e
def test_bf16_lesson_is_learned_in_place_with_stochastic_rounding(default_model_dir,
                                                                   tokenizer):
    """The lesson "My name is Apollo.", on the default model loaded in bf16, batch 1, lr 1e-5:
    learned with stochastic rounding, which changes over twice as many elements per step."""
    from server.api.schemas import ChatExample
    from server.engine.loss import causal_lm_loss, collate
    from server.engine.tokenization import encode
    from server.engine.wiring import param_groups

    chat = ChatExample(messages=[{"role": "user", "content": "What is your name?"},
                                 {"role": "assistant", "content": "My name is Apollo."}])
    encoded = encode(chat.to_messages(), tokenizer, 256)
    ids, labels, mask = collate([encoded], tokenizer.pad_token_id, "cpu")
    targets = labels[0, 1:] != -100

    def answers_greedily(model) -> bool:
        """Teacher-forced greedy check: the argmax at every target position is the target
        token, i.e. greedy decoding would produce exactly "My name is Apollo."."""
        with torch.no_grad():
            pred = model(input_ids=ids).logits[0, :-1].argmax(-1)
        return bool((pred[targets] == labels[0, 1:][targets]).all())

    results = {}
    for sr in (True, False):
        model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.bfloat16)
        opt = ApolloMini(param_groups(model, 1e-5, False), lr=1e-5, stochastic_rounding=sr)
        learned_at, changed = None, []
        # Without rounding only the fraction of changed elements is measured (2 steps:
        # bf16 steps are slow on CPU).
        for step in range(1, 13 if sr else 3):
            before = model.model.layers[5].mlp.down_proj.weight.detach().clone()
            causal_lm_loss(model, ids, labels, mask).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            changed.append((model.model.layers[5].mlp.down_proj.weight != before)
                           .float().mean().item())
            if answers_greedily(model):
                learned_at = step
                break
        results[sr] = (learned_at, sum(changed[:2]) / 2)  # like for like: first 2 steps
    print(f"\nbf16, lr 1e-5: with stochastic rounding learned at step {results[True][0]}, "
          f"{results[True][1]:.2%} of elements changed per step (first 2 steps); without: "
          f"{results[False][1]:.2%} (learned: {results[False][0] or 'not within 2 steps'})")
    assert results[True][0] is not None and results[True][0] <= 12
    assert results[True][1] > 2 * results[False][1]
