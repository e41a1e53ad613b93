"""Preference pairs and thumbs up / down through POST /train, on a tiny model in this process:
the forms, their 422s, learn-then-stop for each signal, the guard, the example log."""

import pytest
import torch

from server.engine.example_log import ExampleLog
from server.engine.loss import greedy_at, greedy_mismatch, learned
from server.engine.objective import divergence, mismatched
from server.engine.tokenization import IGNORE_INDEX, Encoded, encode_lesson
from tests.support.app import app_client, wait_idle

FAST = dict(lr=1e-2, max_steps_per_batch=40, train_embeddings=True, guard="none",
            drift_probes=0)
NAME, HOME, SUM = "What is your name?", "Where do you live?", "What is 2+2?"
PAIR = {"input": {"messages": [{"role": "user", "content": "Hello there!"}]},
        "preferred_output": [{"role": "assistant", "content": "Ahoy, matey!"}],
        "non_preferred_output": [{"role": "assistant", "content": "Hello! How can I help?"}]}


def _chat(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _logits(model, enc: Encoded) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, labels = torch.tensor([enc.input_ids]), torch.tensor([enc.labels])
    with torch.no_grad():
        return model(input_ids=ids).logits, ids, labels


def _is_greedy(model, tokenizer, prompt: str, answer: str) -> bool:
    """Is `answer`'s text what greedy decoding says after `prompt`?"""
    logits, _, labels = _logits(model, encode_lesson("down", _chat(prompt, answer), tokenizer,
                                                     512))
    return not bool(greedy_mismatch(logits, labels)[0])


def _states(client, ids: list[str]) -> list[dict]:
    states = [client.get(f"/examples/{i}").json() for i in ids]
    assert all(s["state"] == "trained" for s in states), states
    return states


# --- the forms and their 422s ---

@pytest.fixture(scope="module")
def idle(tokenizer):
    client, _ = app_client(tokenizer, guard="none", drift_probes=0, max_tokens_per_example=64,
                           max_steps_per_batch=1)
    with client:
        yield client


def _pair(**change) -> dict:
    return {**PAIR, **change}


BAD = {
    "no preferred_output": {k: v for k, v in PAIR.items() if k != "preferred_output"},
    "no non_preferred_output": {k: v for k, v in PAIR.items() if k != "non_preferred_output"},
    "empty preferred content": _pair(preferred_output=[{"role": "assistant", "content": ""}]),
    "blank non-preferred content": _pair(non_preferred_output=[{"role": "assistant",
                                                                "content": "  "}]),
    "preferred role user": _pair(preferred_output=[{"role": "user", "content": "Ahoy"}]),
    "two preferred messages": _pair(preferred_output=[{"role": "assistant", "content": "a"}] * 2),
    "input ends with assistant": _pair(input={"messages": _chat("hi", "hello")}),
    "input empty": _pair(input={"messages": []}),
    "same answers": _pair(non_preferred_output=PAIR["preferred_output"]),
    "extra key": _pair(tools=[]),
    "label a string": {"prompt": "hi", "completion": "hello", "label": "false"},
    "label a number": {"prompt": "hi", "completion": "hello", "label": 0},
    "empty completion": {"prompt": "hi", "completion": "", "label": False},
    "completion role user": {"prompt": "hi", "completion": [{"role": "user", "content": "x"}],
                             "label": True},
    "prompt ends with assistant": {"prompt": _chat("hi", "hello"), "completion": "x",
                                   "label": True},
    "preferred_completion with label true": {"prompt": "hi", "completion": "a", "label": True,
                                             "preferred_completion": "b"},
    "preferred_completion without label": {"prompt": "hi", "completion": "a",
                                           "preferred_completion": "b"},
    "preferred_completion same answer": {"prompt": "hi", "completion": "a", "label": False,
                                         "preferred_completion": "a"},
    "non-preferred answer too long": _pair(non_preferred_output=[
        {"role": "assistant", "content": "word " * 100}]),
    "one bad in a mixed list": [PAIR, {"prompt": "hi", "completion": "x", "label": True},
                                {"prompt": "hi", "completion": "x", "label": "yes"}],
}


@pytest.mark.parametrize("case", list(BAD))
def test_an_invalid_preference_or_label_is_422_and_queues_nothing(idle, case):
    before = idle.get("/status").json()
    r = idle.post("/train", json=BAD[case])
    assert r.status_code == 422, r.text
    assert r.json()["detail"]
    assert idle.get("/status").json() == before


def test_the_422_names_the_problem(idle):
    r = idle.post("/train", json=BAD["preferred role user"])
    assert "role must be assistant" in r.text
    r = idle.post("/train", json=BAD["label a string"])
    assert "label" in r.text and "boolean" in r.text
    r = idle.post("/train", json=BAD["non-preferred answer too long"])
    assert "limit of 64" in r.text


def test_every_form_encodes_its_answers_as_targets(tokenizer):
    pair = encode_lesson("pair", _chat("Hi", "Ahoy!"), tokenizer, 512,
                         rejected=_chat("Hi", "Hello."))
    assert pair.kind == "pair" and pair.rejected.kind == "demo"
    target = tokenizer.decode([t for t, x in zip(pair.input_ids, pair.labels, strict=True)
                               if x != IGNORE_INDEX])
    assert target.startswith("Ahoy!") and "Hi" not in target
    assert pair.tokens == len(pair.input_ids) + len(pair.rejected.input_ids)
    at = divergence(pair, pair.rejected)
    assert tokenizer.decode(pair.rejected.input_ids[at]).strip().startswith("Hello")
    # a thumbs-down judges the text: no end-of-turn target; a thumbs-up has one
    down = encode_lesson("down", _chat("Hi", "Hello."), tokenizer, 512)
    up = encode_lesson("up", _chat("Hi", "Hello."), tokenizer, 512)
    assert down.num_targets == up.num_targets - 1
    assert tokenizer.decode([t for t, x in zip(down.input_ids, down.labels, strict=True)
                             if x != IGNORE_INDEX]) == "Hello."


def test_kto_kl_rows_pair_each_prompt_with_the_previous_completion():
    a = Encoded([1, 2, 3, 4], [IGNORE_INDEX, IGNORE_INDEX, 3, 4], kind="up")
    b = Encoded([5, 6, 7], [IGNORE_INDEX, 6, 7], kind="down")
    rows = mismatched([a, b])
    assert [r.input_ids for r in rows] == [[1, 2, 6, 7], [5, 3, 4]]
    assert [r.labels for r in rows] == [[IGNORE_INDEX, IGNORE_INDEX, 6, 7],
                                        [IGNORE_INDEX, 3, 4]]
    assert mismatched([a]) == []  # one labeled answer: no estimate, z0 = 0


def test_the_stop_criteria():
    logits = torch.full((2, 4, 6), -10.0)
    logits[:, 0, 1] = logits[:, 1, 2] = logits[:, 2, 3] = 10.0  # greedy: 1, 2, 3
    labels = torch.tensor([[-100, 1, 2, 3], [-100, 1, 5, 3]])
    assert greedy_mismatch(logits, labels).tolist() == [False, True]
    ids = torch.tensor([[0, 1, 2, 3], [0, 1, 5, 3]])
    assert greedy_at(logits, ids, torch.tensor([2, 2])).tolist() == [True, False]
    assert learned(logits, labels, 0.5).tolist() == [True, False]


def test_the_example_log_keeps_kinds_and_pairs(tmp_path):
    demo = Encoded([1, 2], [IGNORE_INDEX, 2])
    pair = Encoded([1, 3], [IGNORE_INDEX, 3], kind="pair", rejected=Encoded([1, 4],
                                                                            [IGNORE_INDEX, 4]))
    down = Encoded([1, 5], [IGNORE_INDEX, 5], kind="down")
    log = ExampleLog(tmp_path / "log.jsonl")
    log.accept([("d", demo), ("p", pair), ("n", down)])
    log.begin(["d"], 1, 0)
    log.done(["d"], 1, "learned in 1 steps")
    log.close()
    log = ExampleLog(tmp_path / "log.jsonl")
    state = log.restore(applied_steps=1)  # compacted: "d" loses its tokens, keeps its kind
    assert state.accepted["p"] == pair and state.accepted["n"] == down
    assert state.kinds == {"d": "demo", "p": "pair", "n": "down"}
    log.close()
    again = ExampleLog(tmp_path / "log.jsonl").replay(applied_steps=1)
    assert again.accepted["p"] == pair and again.kinds["d"] == "demo"


# --- learning, through the server ---

def _served(model, tokenizer, prompt: str) -> str:
    """What vLLM would answer at temperature 0 with max_tokens 8: the model's greedy text."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                        add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert _is_greedy(model, tokenizer, prompt, text)  # its text encodes to the same tokens
    return text


def test_a_thumbs_down_unlearns_that_answer_and_a_thumbs_up_keeps_another(tokenizer):
    """A lesson the tiny model over-generalizes: taught "Four." for 2+2, it also answers
    "Four." when asked where it lives. A thumbs-down on that served answer and a thumbs-up
    on the same text for 2+2, in one batch: the first stops being greedy, the second stays."""
    client, model = app_client(tokenizer, **FAST)
    with client:
        client.post("/train", json={"messages": _chat(SUM, "Four.")})
        steps = wait_idle(client, 1)["optimizer_steps"]
        bad = _served(model, tokenizer, HOME)
        assert _is_greedy(model, tokenizer, SUM, "Four.")
        r = client.post("/train", json=[
            {"prompt": HOME, "completion": bad, "label": False},
            {"prompt": [{"role": "user", "content": SUM}],
             "completion": [{"role": "assistant", "content": "Four."}], "label": True}])
        assert r.status_code == 202, r.text
        took = wait_idle(client, 3)["optimizer_steps"] - steps
        down, up = _states(client, r.json()["ids"])
    assert (down["kind"], up["kind"]) == ("down", "up")
    assert 0 < took <= 12, down  # measured: 5 steps
    assert down["reason"] == (f"learned in {took} steps (KTO on 1 thumbs-up; KTO on 1 "
                              "thumbs-down)")
    assert not _is_greedy(model, tokenizer, HOME, bad)
    assert _is_greedy(model, tokenizer, SUM, "Four.")


def test_a_thumbs_down_on_an_answer_that_is_not_greedy_costs_no_step(tokenizer):
    client, model = app_client(tokenizer, **FAST)
    with client:
        r = client.post("/train", json={"prompt": NAME, "completion": "Zebra crossing.",
                                        "label": False})
        st = wait_idle(client, 1)
        (state,) = _states(client, r.json()["ids"])
    assert st["optimizer_steps"] == 0 and st["learned_without_steps"] == 1
    assert state["reason"].startswith("already learned: no optimizer step")


@pytest.mark.parametrize("form", ["openai", "label false + preferred_completion"])
def test_a_pair_is_learned_by_margin_and_the_rejected_answer_stops_being_greedy(tokenizer,
                                                                               form):
    client, model = app_client(tokenizer, **FAST)
    body = PAIR if form == "openai" else {
        "prompt": "Hello there!", "completion": "Hello! How can I help?", "label": False,
        "preferred_completion": "Ahoy, matey!"}
    chosen = encode_lesson("pair", _chat("Hello there!", "Ahoy, matey!"), tokenizer, 512,
                           rejected=_chat("Hello there!", "Hello! How can I help?"))
    rejected, at = chosen.rejected, divergence(chosen, chosen.rejected)
    with client:
        # first make the non-preferred answer the greedy one: the pair must undo it
        client.post("/train", json={"messages": _chat("Hello there!", "Hello! How can I help?")})
        wait_idle(client, 1)
        logits, ids, _ = _logits(model, rejected)
        assert greedy_at(logits, ids, torch.tensor([at])).item()
        steps = client.get("/status").json()["optimizer_steps"]
        r = client.post("/train", json=body)
        assert r.status_code == 202, r.text
        st = wait_idle(client, 2)
        (state,) = _states(client, r.json()["ids"])
    took = st["optimizer_steps"] - steps
    assert state["kind"] == "pair" and 0 < took <= 12, state  # measured: 3 steps
    # the default adds the preferred answers' cross-entropy (--dpo-sft-weight 1)
    assert state["reason"].startswith(f"learned in {took} steps (DPO (+1 x cross-entropy on "
                                      "the preferred) on 1 pair, smallest margin ")
    margin = float(state["reason"].split("margin ")[1].split(" ")[0])
    assert margin >= 1.0  # --preference-margin
    logits, ids, _ = _logits(model, rejected)
    assert not greedy_at(logits, ids, torch.tensor([at])).item()


def test_a_mixed_list_trains_as_one_batch(tokenizer):
    client, _ = app_client(tokenizer, **{**FAST, "max_steps_per_batch": 2})
    with client:
        r = client.post("/train", json=[
            {"messages": _chat(NAME, "My name is Apollo.")}, PAIR,
            {"prompt": HOME, "completion": "On Mars.", "label": True},
            {"prompt": HOME, "completion": "Nowhere.", "label": False}])
        assert r.status_code == 202, r.text
        wait_idle(client, 4)
        states = _states(client, r.json()["ids"])
    assert [s["kind"] for s in states] == ["demo", "pair", "up", "down"]
    assert len({s["step"] for s in states}) == 1
    assert "cross-entropy on 1 demonstration; DPO (+1 x cross-entropy on the preferred) on 1 " \
           "pair" in states[0]["reason"]


def test_the_guard_keeps_a_preference_out_of_the_protected_inputs(tokenizer):
    """The null-space projection sits in the model's backward: a DPO step is guarded like a
    demonstration's (as tests/test_locality.py checks for those)."""
    client, model = app_client(tokenizer, lr=1e-2, max_steps_per_batch=3, learned_prob=1.0,
                               guard="nullspace", drift_probes=4)
    with client:
        engine = client.app.state.engine
        engine.trainer.run_in_worker(lambda: engine.trainer.monitor.ensure_guard(model),
                                     always=True)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        client.post("/train", json=[PAIR, {"prompt": HOME, "completion": "x", "label": False}])
        assert wait_idle(client, 2)["optimizer_steps"] == 3
    guarded = {n: m for n, m in model.named_modules() if hasattr(m, "null_guard")}
    assert guarded
    for name, module in guarded.items():
        delta = module.weight.detach() - before[f"{name}.weight"]
        assert delta.norm() > 0, name
        assert (delta @ module.null_guard.protected()).norm() <= 1e-4 * delta.norm(), name
