"""server/: the HTTP contract, with a small in-process model (the e2e test uses real vLLM)."""

import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient

from server.api.schemas import ChatExample
from server.engine.locality import Monitor
from server.engine.tokenization import IGNORE_INDEX, encode
from tests.support.app import app_client as _client
from tests.support.app import wait_idle as _wait_idle

CHAT = {"messages": [{"role": "user", "content": "What is your name?"},
                     {"role": "assistant", "content": "My name is Apollo."}]}


def test_targets_are_the_assistant_reply_only(tokenizer):
    enc = encode(ChatExample(**CHAT).to_messages(), tokenizer, max_tokens=512)
    target = tokenizer.decode([t for t, lab in zip(enc.input_ids, enc.labels, strict=True)
                               if lab != IGNORE_INDEX])
    assert target.startswith("My name is Apollo.")
    assert "What is your name" not in target and "assistant" not in target


@pytest.mark.parametrize("mode", ["standard", "layerwise"])
def test_train_accepts_both_forms_and_trains(tokenizer, mode):
    client, model = _client(tokenizer, max_steps_per_batch=1, optimizer_mode=mode)
    with client:
        before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
        r = client.post("/train", json=[CHAT, {"prompt": "Hi", "completion": "Hello!"}])
        assert r.status_code == 202, r.text
        ids = r.json()["ids"]
        assert len(ids) == 2
        st = _wait_idle(client, 2)
        assert st["examples_trained"] == 2 and st["optimizer_steps"] >= 1
        assert st["last_loss"] is not None
        assert client.get(f"/examples/{ids[0]}").json()["state"] == "trained"
        assert not torch.equal(before, model.model.layers[0].mlp.down_proj.weight)


BAD = {
    "invalid json": (b"{not json", 422),
    "missing fields": (b'{"messages": [{"role": "user"}]}', 422),
    "unknown role": (b'{"messages": [{"role": "wizard", "content": "x"}]}', 422),
    "no target": (b'{"messages": [{"role": "user", "content": "hi"}]}', 422),
    "empty completion": (b'{"prompt": "hi", "completion": ""}', 422),
    "too long": (b'{"prompt": "' + b"word " * 600 + b'", "completion": "ok"}', 422),
    "one bad in a list": (b'[{"prompt": "a", "completion": "b"}, {"prompt": "a"}]', 422),
    "empty list": (b"[]", 422),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_rejected_and_changes_nothing(case, tokenizer):
    body, code = BAD[case]
    client, model = _client(tokenizer, max_tokens_per_example=256)
    with client:
        before = client.get("/status").json()
        r = client.post("/train", content=body, headers={"content-type": "application/json"})
        assert r.status_code == code, r.text
        assert r.json()["detail"]  # a message that says what is wrong
        assert client.get("/status").json() == before


def test_too_long_names_the_limit(tokenizer):
    client, _ = _client(tokenizer, max_tokens_per_example=16)
    with client:
        r = client.post("/train", json=CHAT)
        assert r.status_code == 422
        assert "limit of 16" in r.json()["detail"]


def test_api_key_guards_training_but_not_health(tokenizer):
    client, _ = _client(tokenizer, api_key="s3cret")
    with client:
        assert client.get("/health").status_code == 200
        assert client.post("/train", json=CHAT).status_code == 401
        bad = {"Authorization": "Bearer wrong"}
        assert client.post("/train", json=CHAT, headers=bad).status_code == 401
        assert client.post("/checkpoint").status_code == 401
        assert client.post("/checkpoint", headers=bad).status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert client.post("/train", json=CHAT, headers=good).status_code == 202


def test_non_finite_loss_marks_examples_failed_and_keeps_weights(tokenizer):
    client, model = _client(tokenizer, max_steps_per_batch=1)
    with client:
        with torch.no_grad():
            model.model.norm.weight.fill_(float("nan"))
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        ids = client.post("/train", json=CHAT).json()["ids"]
        st = _wait_idle(client, 1)
        assert st["examples_failed"] == 1 and st["optimizer_steps"] == 0
        state = client.get(f"/examples/{ids[0]}").json()
        assert state["state"] == "failed" and "non-finite" in state["reason"]
        for n, p in model.named_parameters():
            assert torch.equal(p.detach().nan_to_num(7.0), weights[n].nan_to_num(7.0)), n


def test_periodic_checkpoint_writes_what_was_trained(tokenizer, tmp_path):
    from safetensors.torch import load_file

    client, model = _client(tokenizer, model_dir=tmp_path, max_steps_per_batch=1,
                            checkpoint_every_steps=1)
    with client:
        client.post("/train", json=CHAT)
        _wait_idle(client, 1)
        for _ in range(200):
            last = client.get("/status").json()["last_checkpoint"]
            if last:
                break
            time.sleep(0.05)
        assert last and last["bytes_written"] > 0 and last["optimizer_step"] == 1
        on_disk = load_file(tmp_path / "model.safetensors")
        params = dict(model.named_parameters())
        assert all(torch.equal(t, params[n].detach()) for n, t in on_disk.items())
        assert client.post("/checkpoint").json()["bytes_written"] == 0  # nothing new


def test_metrics_are_prometheus_text(tokenizer):
    client, _ = _client(tokenizer, max_steps_per_batch=1)
    with client:
        client.post("/train", json=CHAT)
        _wait_idle(client, 1)
        text = client.get("/metrics").text
        values = dict(line.split(" ", 1) for line in text.splitlines()
                      if not line.startswith("#"))
        assert float(values["vllm_apollo_examples_trained_total"]) == 1
        assert float(values["vllm_apollo_optimizer_steps_total"]) == 1
        assert float(values["vllm_apollo_serving_stall_seconds_total"]) > 0


def test_body_size_and_queue_limits(tokenizer):
    client, _ = _client(tokenizer, max_body_bytes=1000, max_queue=1)
    with client:
        r = client.post("/train", content=b"[" + b" " * 2000 + b"]",
                        headers={"content-type": "application/json"})
        assert r.status_code == 413 and "max-body-bytes" in r.json()["detail"]
        r = client.post("/train", json=[CHAT, CHAT])
        assert r.status_code == 429 and r.headers["retry-after"]


def test_training_error_fails_the_batch_and_the_server_keeps_working(tokenizer):
    # no drift monitor, no guard: the first forward pass is the batch's
    client, model = _client(tokenizer, max_steps_per_batch=1, drift_probes=0, guard="none")
    forward = model.forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("simulated out of memory")
        return forward(*args, **kwargs)

    model.forward = flaky
    with client:
        first = client.post("/train", json=CHAT).json()["ids"][0]
        _wait_idle(client, 1)
        state = client.get(f"/examples/{first}").json()
        assert state["state"] == "failed" and "out of memory" in state["reason"]
        second = client.post("/train", json=CHAT).json()["ids"][0]
        _wait_idle(client, 2)
        assert client.get(f"/examples/{second}").json()["state"] == "trained"


def test_status_says_preparing_until_the_reference_and_guard_are_ready(tokenizer, monkeypatch):
    """A first start makes (or loads) the drift reference and the guard before any batch
    trains; /status says so meanwhile, then says it is done."""
    release, real = threading.Event(), Monitor.ensure_reference

    def held(self, model, pace=None):
        release.wait(60)
        return real(self, model) if pace is None else real(self, model, pace)

    monkeypatch.setattr(Monitor, "ensure_reference", held)
    client, _ = _client(tokenizer)
    TestClient.__enter__(client)  # not the support client's __enter__: it waits for this
    try:
        assert client.get("/status").json()["preparing"] is True
        release.set()
        assert client.app.state.engine.trainer.prepared.wait(120)
        assert client.get("/status").json()["preparing"] is False
    finally:
        release.set()
        client.__exit__(None, None, None)
