"""Bounds on what one client can make the server hold or do: no 500 from text JSON allows, no
pile of checkpoints, a checkpoint never between two parameters' writes of one step, bounded
memory for finished examples, a queue bounded in tokens."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.app import app_client, wait_idle

CHAT = {"messages": [{"role": "user", "content": "What is your name?"},
                     {"role": "assistant", "content": "My name is Apollo."}]}
JSON = {"content-type": "application/json"}


@pytest.mark.parametrize("body", [
    {"prompt": "a\ud800b", "completion": "ok"},
    {"prompt": "q", "completion": "\udfff"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\ud83d"}]},
    [{"prompt": "q", "completion": "a"}, {"prompt": "\udc00", "completion": "a"}],
])
def test_a_lone_surrogate_is_a_422_not_a_500(tokenizer, body):
    client, _ = app_client(tokenizer)
    with client:
        before = client.get("/status").json()
        r = client.post("/train", content=json.dumps(body).encode(), headers=JSON)
        assert r.status_code == 422, r.text
        assert client.get("/status").json() == before


def test_concurrent_checkpoints_do_not_pile_up(tokenizer, tmp_path):
    client, _ = app_client(tokenizer, model_dir=tmp_path)
    with client:
        service = client.app.state.engine.checkpoints
        sync = service.checkpointer.sync

        def slow(*args, **kwargs):
            time.sleep(1.0)
            return sync(*args, **kwargs)

        service.checkpointer.sync = slow
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: client.post("/checkpoint"), range(4)))
        codes = sorted(r.status_code for r in answers)
        assert codes == [200, 409, 409, 409], [r.text for r in answers]
        assert all("in progress" in r.json()["detail"] for r in answers if r.status_code == 409)
        assert client.post("/checkpoint").status_code == 200  # free again


def test_a_checkpoint_never_sees_half_a_layerwise_step(tokenizer):
    """Layer-wise mode writes each parameter during backward; a checkpoint (which holds the
    trainer's weights lock) must come between two steps, never between two parameters."""
    client, model = app_client(tokenizer, optimizer_mode="layerwise", max_steps_per_batch=4,
                               learned_prob=1.0)
    with client:
        trainer = client.app.state.engine.trainer
        per_step = sum(p.requires_grad for p in model.parameters())
        writes, seen, stop = [0], [], threading.Event()
        original = trainer.coordinator.write

        def counting_write():
            writes[0] += 1
            return original()

        trainer.coordinator.write = counting_write

        def checkpoint_like():
            while not stop.is_set():
                with trainer.weights_lock:
                    seen.append(writes[0])
                time.sleep(0.0005)

        watcher = threading.Thread(target=checkpoint_like)
        watcher.start()
        client.post("/train", json=[CHAT] * 2)
        wait_idle(client, 2)
        stop.set()
        watcher.join()
        assert writes[0] == 4 * per_step
        torn = [n for n in seen if n % per_step]
        assert not torn, f"{len(torn)} of {len(seen)} looks saw part of a step: {torn[:5]}"


def test_finished_records_are_bounded_in_memory(tokenizer):
    client, _ = app_client(tokenizer, keep_finished_records=3, max_steps_per_batch=1)
    with client:
        ids = []
        for k in range(5):
            ids += client.post("/train", json=CHAT).json()["ids"]
            wait_idle(client, k + 1)
        assert [client.get(f"/examples/{i}").status_code for i in ids] == [404, 404, 200, 200,
                                                                            200]
        assert len(client.app.state.engine.trainer.records) == 3
        assert client.get("/status").json()["examples_trained"] == 5


def test_the_queue_is_bounded_in_tokens(tokenizer):
    client, _ = app_client(tokenizer, max_queue_tokens=100)
    with client:
        client.app.state.engine.trainer.stop()  # nothing leaves the queue
        assert client.post("/train", json=CHAT).status_code == 202  # ~50 tokens
        r = client.post("/train", json=[CHAT, CHAT])
        assert r.status_code == 429 and "tokens" in r.json()["detail"]
        assert client.get("/status").json()["examples_queued"] == 1
