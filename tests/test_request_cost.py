"""Requests that cost more than their size: at the default limits every request shape is
answered within a stated bound (docs/service.md), the cheap limits before the chat template
or the tokenizer run. Times are printed (pytest -s)."""

from __future__ import annotations

import json
import time

import pytest

from tests.support.app import app_client

# On this project's 2-core test machine (docs/service.md): a request rejected by a cheap limit
# within REJECT_S, the largest valid requests within ACCEPT_S.
REJECT_S, ACCEPT_S = 1.0, 10.0


def _turns(n: int, content: str = "a") -> dict:
    return {"messages": [{"role": ("user", "assistant")[i % 2], "content": content}
                         for i in range(n)]}


SHAPES = {  # name: (body, expected status, bound in seconds)
    "4000 tiny turns": (_turns(4000), 422, REJECT_S),
    "one 4 MiB message": ({"prompt": "q", "completion": "a" * ((4 << 20) - 200)}, 422,
                          REJECT_S),
    "256 examples of 256 tiny turns": ([_turns(256)] * 256, 202, ACCEPT_S),
    "64 examples of 64k spaces": ([{"prompt": "q", "completion": " " * 65000}] * 64, 202,
                                  ACCEPT_S),
    "255 valid examples, then 4000 turns": ([_turns(256)] * 255 + [_turns(4000)], 422,
                                            ACCEPT_S),
}


@pytest.fixture(scope="module")
def client(tokenizer):
    c, _ = app_client(tokenizer, max_queue=100_000, max_queue_tokens=10**9)
    with c:
        c.app.state.engine.trainer.stop()  # the cost measured is the request's alone
        yield c


@pytest.mark.parametrize("shape", list(SHAPES))
def test_costly_request_shapes_are_answered_within_the_bound(client, shape):
    body, status, bound = SHAPES[shape]
    data = json.dumps(body).encode()
    assert len(data) <= 4 << 20  # within the default --max-body-bytes
    t0 = time.perf_counter()
    r = client.post("/train", content=data, headers={"content-type": "application/json"})
    seconds = time.perf_counter() - t0
    print(f"\n{shape}: {len(data) / 2**20:.2f} MiB -> {r.status_code} in {seconds:.2f} s")
    assert r.status_code == status, r.text[:300]
    assert seconds < bound


def test_the_chat_template_runs_twice_per_example_whatever_the_turns(tokenizer, monkeypatch):
    from server.engine.tokenization import encode

    calls = []
    render = tokenizer.apply_chat_template
    monkeypatch.setattr(tokenizer, "apply_chat_template",
                        lambda *a, **k: calls.append(1) or render(*a, **k))
    for n in (2, 200):
        calls.clear()
        encode(_turns(n)["messages"], tokenizer, 2048, max_messages=256)
        assert len(calls) == 2, (n, len(calls))


def test_a_template_that_rewrites_content_is_a_clear_422_not_a_guess(tokenizer):
    """Templates that trim content (Llama 3, Gemma) cannot have their targets located in the
    text when a message has surrounding whitespace: the example is refused, with the reason."""
    import copy

    from server.engine.tokenization import ExampleError, encode

    trimming = copy.deepcopy(tokenizer)
    trimming.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                              "{{ m['content'] | trim }}<|im_end|>\n{% endfor %}")
    ok = encode([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                trimming, 64)
    assert trimming.decode([t for t, lab in zip(ok.input_ids, ok.labels, strict=True)
                            if lab != -100]) == "yo<|im_end|>"
    with pytest.raises(ExampleError, match="cannot locate the targets"):
        encode([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " yo\n"}],
               trimming, 64)
