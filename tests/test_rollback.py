"""Live rollback and versions through the HTTP API, in this process (tiny model): the live
weights become exactly a version's, examples are marked, bad requests change nothing."""

import time

import pytest
import torch

from server.engine.example_log import ExampleLog
from server.engine.example_replay import ExampleLogCorrupt
from server.engine.tokenization import Encoded
from tests.support.app import app_client, wait_idle

FAST = dict(lr=1e-2, max_steps_per_batch=2, learned_prob=1.0, drift_probes=0, guard="none")


def _lesson(i):
    return {"prompt": f"Question number {i}?", "completion": f"Answer number {i}."}


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(model, weights):
    return all(torch.equal(p.detach(), weights[n]) for n, p in model.named_parameters())


def _teach(client, i, done):
    ids = client.post("/train", json=_lesson(i)).json()["ids"]
    wait_idle(client, done)
    return ids[0]


def _state(client, i):
    return client.get(f"/examples/{i}").json()["state"]


def test_rollback_to_each_version_is_bit_exact_and_marks_examples(tokenizer, tmp_path):
    client, model = app_client(tokenizer, model_dir=tmp_path / "model",
                               journal=str(tmp_path / "examples.jsonl"), **FAST)
    with client:
        w0 = _weights(model)
        a = _teach(client, "A", 1)
        assert client.post("/checkpoint").json()["version"] == 1
        w1 = _weights(model)
        b = _teach(client, "B", 2)
        assert client.post("/checkpoint").json()["version"] == 2
        w2 = _weights(model)
        c = _teach(client, "C", 3)
        st = client.get("/status").json()
        assert st["weight_checkpoint"] is None and st["weight_version"] == 6  # 3 x 2 steps
        assert not _same(model, w2)

        r = client.post("/rollback", json={"to": "last-checkpoint"})
        assert r.status_code == 200, r.text
        r = r.json()
        assert r["version"] == 2 and r["examples_rolled_back"] == 1 and r["stall_seconds"] > 0
        assert _same(model, w2)
        assert [_state(client, i) for i in (a, b, c)] == ["trained", "trained", "rolled back"]
        st = client.get("/status").json()
        assert (st["weight_version"], st["weight_checkpoint"]) == (7, 2)
        opt = client.app.state.engine.trainer.optimizer
        assert all(set(s) <= {"seed"} for s in opt.state.values())  # moments forgotten

        assert client.post("/rollback", json={"to": 1}).json()["version"] == 1
        assert _same(model, w1)
        assert [_state(client, i) for i in (a, b, c)] == ["trained", "rolled back",
                                                          "rolled back"]
        assert client.post("/rollback", json={"to": "original"}).json()["version"] == 0
        assert _same(model, w0)
        assert _state(client, a) == "rolled back"
        r = client.post("/rollback", json={"to": 2}).json()  # forward again
        assert r["examples_restored"] == 2 and _same(model, w2)
        assert [_state(client, i) for i in (a, b, c)] == ["trained", "trained", "rolled back"]
        assert "rolled back to version" in client.get(f"/examples/{c}").json()["reason"]

        _teach(client, "D", 4)  # trained on version 2: the next version says so
        v3 = client.post("/checkpoint").json()
        assert v3["version"] == 3
        listing = client.get("/versions").json()
        assert [v["n"] for v in listing["versions"]] == [0, 1, 2, 3]
        assert listing["versions"][3]["parent"] == 2 and listing["versions"][3]["examples"] == 1
        assert all(v["reachable"] for v in listing["versions"])
        assert listing["head"] == 3 and listing["weight_checkpoint"] == 3
        metrics = client.get("/metrics").text
        assert "vllm_apollo_rollbacks_total 4.0" in metrics
        assert "vllm_apollo_weight_checkpoint 3.0" in metrics
    # the example log keeps the marks across a restart
    state = ExampleLog(tmp_path / "examples.jsonl").restore(0)
    assert set(state.rolled_back) == {c}


def test_bad_rollbacks_change_nothing(tokenizer, tmp_path):
    client, model = app_client(tokenizer, model_dir=tmp_path / "model", history_keep="off",
                               **FAST)
    with client:
        _teach(client, "A", 1)
        client.post("/checkpoint")
        _teach(client, "B", 2)
        before = _weights(model)
        version = client.get("/status").json()["weight_version"]
        for body, code, words in [({"to": 7}, 404, "no version 7"),
                                  ({"to": "latest"}, 422, ""), ({"to": -1}, 422, ""),
                                  ({}, 422, ""), ({"to": 0}, 409, "no longer reachable")]:
            r = client.post("/rollback", json=body)
            assert r.status_code == code and words in r.text, (body, r.text)
        service = client.app.state.engine.checkpoints
        with service.exclusive("checkpoint"):  # as if a checkpoint were running
            r = client.post("/rollback", json={"to": "last-checkpoint"})
            assert r.status_code == 409 and "checkpoint is in progress" in r.text
        assert _same(model, before)
        assert client.get("/status").json()["weight_version"] == version
        # history off still rolls back to the last checkpoint (the files)
        assert client.post("/rollback", json={"to": "last-checkpoint"}).status_code == 200
        assert not _same(model, before)

    damaged, model = app_client(tokenizer, model_dir=tmp_path / "m2", **FAST)
    with damaged:
        _teach(damaged, "A", 1)
        damaged.post("/checkpoint")
        _teach(damaged, "B", 2)
        damaged.post("/checkpoint")
        pack = tmp_path / "m2/.apollo/history/v00001/pre.bin"  # what "original" needs
        data = bytearray(pack.read_bytes())
        data[-1] ^= 0xFF
        pack.write_bytes(data)
        before = _weights(model)
        r = damaged.post("/rollback", json={"to": "original"})
        assert r.status_code == 409 and "damaged" in r.text
        assert _same(model, before)

    no_dir, _ = app_client(tokenizer, **FAST)
    with no_dir:
        r = no_dir.post("/rollback", json={"to": "original"})
        assert r.status_code == 409 and "checkpointing is disabled" in r.text
        assert no_dir.get("/versions").status_code == 409


def test_the_example_log_records_rollbacks(tmp_path):
    path = tmp_path / "examples.jsonl"
    log = ExampleLog(path)
    log.accept([("a", Encoded([1, 2], [-100, 2])), ("b", Encoded([1, 3], [-100, 3]))])
    log.begin(["a", "b"], 1, 0)
    log.done(["a", "b"], 1)
    log.rollback(["a", "b"], [], "rolled back to version 0")
    log.rollback([], ["b"], "rolled back to version 1")
    state = log.restore(1)  # compacts
    log.close()
    assert state.rolled_back == {"a": "rolled back to version 0"}
    assert ExampleLog(path).replay(1).rolled_back == state.rolled_back  # after compaction
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"op":"rollback","rolled_back":["zz"],"restored":[],"reason":"x"}\n')
    with pytest.raises(ExampleLogCorrupt, match="never trained"):
        ExampleLog(bad).replay(0)


def test_weight_version_counts_changes_and_names_checkpoints(tokenizer, tmp_path):
    client, _ = app_client(tokenizer, model_dir=tmp_path / "model", **FAST)
    with client:
        st = client.get("/status").json()
        assert (st["weight_version"], st["weight_checkpoint"]) == (0, 0)  # the files
        _teach(client, "A", 1)
        st = client.get("/status").json()
        assert (st["weight_version"], st["weight_checkpoint"]) == (2, None)
        client.post("/checkpoint")
        deadline = time.monotonic() + 10
        while client.get("/status").json()["weight_checkpoint"] != 1:
            assert time.monotonic() < deadline
        assert client.get("/status").json()["weight_version"] == 2  # named, not changed
