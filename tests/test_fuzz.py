"""Fuzz the training API with the trainer live: arbitrary and near-valid bodies (lone
surrogates and control characters included) never cause a 5xx; an accepted request trains
and leaves the service healthy; every rejected request changes nothing: the status and every
weight are compared before and after it, each time."""

import json
import time
from urllib.parse import quote

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.app import app_client as _client

# Any code point, lone surrogates (JSON's \ud800 escapes) and C0 controls made likely.
chars = st.characters() | st.integers(0xD800, 0xDFFF).map(chr) | st.integers(0, 0x1F).map(chr)
text = st.text(alphabet=chars, max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | text
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12)
roles = st.sampled_from(["system", "user", "assistant", "tool", "", "USER"])
message = st.fixed_dictionaries(
    {"role": roles, "content": text},
    optional={"weight": st.sampled_from([0, 1, 2, -1, None, "1", 0.5])})
chat = st.fixed_dictionaries({"messages": st.lists(message, max_size=4)},
                             optional={"extra": json_values})
prompt = st.fixed_dictionaries({}, optional={"prompt": text | json_values,
                                             "completion": text | json_values,
                                             "label": st.booleans() | json_values,
                                             "preferred_completion": text | json_values})
answers = st.lists(message, max_size=2) | json_values
pair = st.fixed_dictionaries({}, optional={
    "input": st.fixed_dictionaries({"messages": st.lists(message, max_size=3)}) | json_values,
    "preferred_output": answers, "non_preferred_output": answers})
bodies = chat | prompt | pair | st.lists(chat | prompt | pair, max_size=3) | json_values
JSON = {"content-type": "application/json"}


class Live:
    """The client, its model, and a copy of the weights as of the last time they changed."""

    def __init__(self, client, model):
        self.client, self.model = client, model
        self.steps, self.copy = -1, []

    def idle_status(self, timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st_ = self.client.get("/status").json()
            if st_["examples_queued"] == 0:
                return st_
            time.sleep(0.01)
        raise AssertionError("the trainer did not finish")

    def weights_copy(self, steps: int) -> list[torch.Tensor]:
        if steps != self.steps:
            self.steps, self.copy = steps, [p.detach().clone() for p in self.model.parameters()]
        return self.copy


@pytest.fixture(scope="module")
def live(tokenizer):
    client, model = _client(tokenizer, max_tokens_per_example=64, max_queue=100_000,
                            max_steps_per_batch=1)
    with client:
        yield Live(client, model)


@settings(max_examples=1200, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies)
def test_fuzzed_train_requests(live, body):
    client = live.client
    before = live.idle_status()  # nothing in flight: the weights change only by this request
    weights = live.weights_copy(before["optimizer_steps"])
    r = client.post("/train", content=json.dumps(body).encode(), headers=JSON)
    assert r.status_code < 500, r.text
    if r.status_code == 202:
        ids = r.json()["ids"]
        live.idle_status()
        states = {client.get(f"/examples/{i}").json()["state"] for i in ids}
        assert states <= {"trained", "failed"}
        assert client.get("/health").status_code == 200
        return
    assert 400 <= r.status_code < 500 and r.json()["detail"]
    assert client.get("/status").json() == before
    assert all(torch.equal(p, w) for p, w in zip(live.model.parameters(), weights,
                                                   strict=True))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(example_id=st.text(min_size=1, max_size=40).filter(lambda s: s not in (".", "..")))
def test_fuzzed_example_ids(live, example_id):
    client = live.client
    before = live.idle_status()
    r = client.get(f"/examples/{quote(example_id, safe='')}")
    assert r.status_code in (200, 404), r.text
    assert client.get("/status").json() == before
