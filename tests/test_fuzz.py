"""Fuzz the training API: arbitrary and near-valid bodies never cause a 5xx, and a rejected
request changes nothing (no queued example, no weight)."""

import hashlib
from urllib.parse import quote

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.app import app_client as _client

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=12)
roles = st.sampled_from(["system", "user", "assistant", "tool", "", "USER"])
message = st.fixed_dictionaries(
    {"role": roles, "content": st.text(max_size=40)},
    optional={"weight": st.sampled_from([0, 1, 2, -1, None, "1", 0.5])})
chat = st.fixed_dictionaries({"messages": st.lists(message, max_size=4)},
                             optional={"extra": json_values})
prompt = st.fixed_dictionaries({}, optional={"prompt": st.text(max_size=30) | json_values,
                                             "completion": st.text(max_size=30) | json_values})
bodies = chat | prompt | st.lists(chat | prompt, max_size=3) | json_values


def _weights_digest(model) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def fuzz_client(tokenizer):
    client, model = _client(tokenizer, max_tokens_per_example=64, max_queue=100_000)
    with client:
        # weights hold still: any change would be the request's
        client.app.state.engine.trainer.stop()
        yield client, model


@settings(max_examples=1200, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies)
def test_fuzzed_train_requests(fuzz_client, body):
    client, model = fuzz_client
    before = client.get("/status").json()
    digest = _weights_digest(model) if torch.rand(1).item() < 0.02 else None
    r = client.post("/train", json=body)
    assert r.status_code < 500, r.text
    after = client.get("/status").json()
    if r.status_code == 202:
        assert after["examples_queued"] == before["examples_queued"] + len(r.json()["ids"])
    else:
        assert 400 <= r.status_code < 500 and r.json()["detail"]
        assert after == before
    if digest is not None:
        assert _weights_digest(model) == digest


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(example_id=st.text(min_size=1, max_size=40).filter(lambda s: s not in (".", "..")))
def test_fuzzed_example_ids(fuzz_client, example_id):
    client, _ = fuzz_client
    before = client.get("/status").json()
    r = client.get(f"/examples/{quote(example_id, safe='')}")
    assert r.status_code in (200, 404), r.text
    assert client.get("/status").json() == before
