"""Fine-tuning jobs inside the engine, in-process around a tiny model: cancel within one step,
fairness with live examples, DELETE /examples/{id}, the guard's rules for uploads, and dpo
jobs' pairs and β."""

from __future__ import annotations

import json
import threading
import time

import pytest

from server.engine.example_log import ExampleLog
from server.engine.example_replay import ExampleLogCorrupt, replay
from server.engine.tokenization import Encoded
from tests.support.app import app_client, wait_idle

FAST = {"drift_probes": 0, "guard": "none", "learned_prob": 1.0}


def chat(q: str, a: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": q},
                                    {"role": "assistant", "content": a}]})


def upload(client, lines: list[str], **kw):
    return client.post("/v1/files", files={"file": ("data.jsonl", "\n".join(lines).encode())},
                       data={"purpose": "fine-tune"}, **kw)


def start_job(client, n: int, **hyper) -> str:
    r = upload(client, [chat(f"question {i}", f"answer {i}") for i in range(n)])
    assert r.status_code == 200, r.text
    r = client.post("/v1/fine_tuning/jobs", json={"model": "None", "training_file":
                                                  r.json()["id"], "hyperparameters": hyper})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def job_of(client, job_id: str) -> dict:
    return client.get(f"/v1/fine_tuning/jobs/{job_id}").json()


def wait_for(predicate, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := predicate()):
            return value
        time.sleep(0.01)
    raise TimeoutError


def test_cancel_stops_within_one_step_and_keeps_the_weights(tokenizer):
    client, _ = app_client(tokenizer, batch_size=2, max_steps_per_batch=400, **FAST)
    with client:
        job_id = start_job(client, 2, n_epochs=3)  # one batch per epoch
        # mid-batch: the first batch runs 400 steps
        wait_for(lambda: client.get("/status").json()["applied_steps"] >= 5)
        r = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
        final = client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"][0]
        print("\n" + final["message"], final["data"])
        assert final["data"]["steps_after_cancel"] <= 1
        st = wait_idle(client, 2)
        assert st["applied_steps"] == final["data"]["stopped_at_step"] < 400
        assert st["examples_queued"] == 0  # nothing more of the job is queued
        first = client.get(f"/examples/{job_id}.e1.l1").json()
        assert first["state"] == "trained" and "cancelled" in first["reason"], first
        assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").status_code == 400


def test_a_live_example_waits_behind_at_most_one_job_batch(tokenizer, tmp_path):
    journal = tmp_path / "examples.jsonl"
    client, _ = app_client(tokenizer, batch_size=2, max_steps_per_batch=20,
                           journal=str(journal), **FAST)
    with client:
        job_id = start_job(client, 30)
        wait_for(lambda: job_of(client, job_id)["status"] == "running")
        wait_for(lambda: client.get("/status").json()["applied_steps"] >= 3)  # mid-batch
        live = client.post("/train", json={"prompt": "Hi", "completion": "Hello!"})
        live_id = live.json()["ids"][0]
        wait_for(lambda: client.get(f"/examples/{live_id}").json()["state"] == "trained")
        assert job_of(client, job_id)["status"] == "running"  # overtook the rest of the job
        wait_for(lambda: job_of(client, job_id)["status"] == "succeeded")
    ops = [json.loads(line) for line in journal.read_text().splitlines()]
    accepted = next(k for k, op in enumerate(ops) if op["op"] == "accept"
                    and op["items"][0]["id"] == live_id)
    began = next(k for k, op in enumerate(ops) if op["op"] == "begin" and
                 op["batch"] == [live_id])
    between = [op for op in ops[accepted:began] if op["op"] == "begin"]
    print(f"\njob batches begun between the live example's acceptance and its batch: "
          f"{len(between)}")
    assert len(between) <= 1


def test_delete_withdraws_a_queued_example_for_good(tokenizer, tmp_path):
    journal = tmp_path / "examples.jsonl"
    client, _ = app_client(tokenizer, max_steps_per_batch=1, journal=str(journal), **FAST)
    with client:
        gate = threading.Event()
        trainer = client.app.state.engine.trainer
        parked = threading.Thread(target=trainer.run_in_worker, args=(gate.wait,),
                                  kwargs={"always": True})
        parked.start()  # the worker waits: what is posted now stays queued
        ids = client.post("/train", json=[{"prompt": "a", "completion": "b"},
                                          {"prompt": "c", "completion": "d"}]).json()["ids"]
        r = client.delete(f"/examples/{ids[0]}")
        assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
        assert client.delete(f"/examples/{ids[0]}").status_code == 409
        assert client.delete("/examples/nope").status_code == 404
        assert client.get("/status").json()["examples_queued"] == 1
        gate.set()
        parked.join()
        wait_idle(client, 1)
        assert client.get(f"/examples/{ids[1]}").json()["state"] == "trained"
        assert client.delete(f"/examples/{ids[1]}").status_code == 409
        assert client.get(f"/examples/{ids[0]}").json()["state"] == "cancelled"
    state = replay(journal, applied_steps=1)
    assert ids[0] in state.cancelled and ids[0] not in state.pending and not state.pending
    # the compacted log still says so after a restart
    client, _ = app_client(tokenizer, journal=str(journal), **FAST)
    with client:
        assert client.get(f"/examples/{ids[0]}").json()["state"] == "cancelled"


def test_uploads_pass_the_guard_only_as_files_and_within_their_own_limit(tokenizer):
    client, _ = app_client(tokenizer, max_upload_bytes=2000, api_key="k", **FAST)
    key = {"authorization": "Bearer k"}
    with client:
        lines = [chat(f"q{i}", f"a{i}") for i in range(5)]
        assert upload(client, lines).status_code == 401
        assert upload(client, lines, headers=key).status_code == 200
        assert client.get("/v1/files").status_code == 401
        assert client.get("/v1/fine_tuning/jobs", headers=key).status_code == 200
        # over --max-upload-bytes, announced or streamed (chunked): 413, nothing kept
        big = [chat(f"q{i}", "a" * 50) for i in range(40)]
        assert upload(client, big, headers=key).status_code == 413

        def chunks():
            body = b"--b\r\ncontent-disposition: form-data; name=\"file\"; filename=\"x\"" \
                   b"\r\n\r\n" + "\n".join(big).encode()
            for k in range(0, len(body), 500):
                yield body[k:k + 500]
            yield b"\r\n--b--\r\n"

        r = client.post("/v1/files", content=chunks(), headers={
            **key, "content-type": "multipart/form-data; boundary=b"})
        assert r.status_code == 413 and "--max-upload-bytes" in r.text, r.text
        files = client.app.state.engine.files
        assert len(files.list()) == 1 and not list(files.directory.glob("*.part"))
        # a form anywhere else, a non-form upload, a cross-origin upload: refused
        r = client.post("/train", files={"file": ("x", b"{}")}, headers=key)
        assert r.status_code == 415
        r = client.post("/v1/files", content=b"x", headers={**key, "content-type": "text/plain"})
        assert r.status_code == 415
        r = upload(client, lines, headers={**key, "origin": "http://evil.example"})
        assert r.status_code == 403
        assert len(files.list()) == 1


def test_the_example_log_keeps_withdrawals_groups_learning_rate_scales_and_betas(
        tmp_path):
    e = Encoded([1, 2, 3], [-100, 2, 3])
    path = tmp_path / "j.jsonl"
    j = ExampleLog(path)
    j.accept([("a", e), ("b", e)], group="ftjob-x", lr_scale=0.5, beta=0.25)
    j.accept([("c", e)])
    j.cancel(["b"], "withdrawn")
    j.begin(["a"], steps=3, base=0)
    state = j.replay(applied_steps=1)
    assert state.cancelled == {"b": "withdrawn"} and state.pending == ["c"]
    assert state.options == {"a": ("ftjob-x", 0.5, 0.25), "b": ("ftjob-x", 0.5, 0.25)}
    assert state.unfinished == (["a"], 2)
    j.compact(state, applied_steps=1)
    after = replay(path, applied_steps=1)
    assert (after.cancelled, after.pending, after.unfinished) == \
        (state.cancelled, state.pending, state.unfinished)
    assert after.options["a"] == ("ftjob-x", 0.5, 0.25) and after.accepted["b"] is None
    j.cancel(["a"], "too late")  # never written by the trainer: a begun example
    with pytest.raises(ExampleLogCorrupt, match="already begun"):
        replay(path, applied_steps=1)
    j.close()


def test_the_learning_rate_multiplier_scales_the_jobs_steps(tokenizer):
    moved = {}
    for multiplier in (1.0, 0.01):  # the same tiny model each time
        client, model = app_client(tokenizer, max_steps_per_batch=1, **FAST)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with client:
            job_id = start_job(client, 2, learning_rate_multiplier=multiplier)
            job = wait_for(lambda j=job_id, c=client: (x := job_of(c, j))["status"] ==
                           "succeeded" and x)
            assert job["hyperparameters"]["learning_rate_multiplier"] == multiplier
        moved[multiplier] = sum(float((p.detach() - before[n]).norm())
                                for n, p in model.named_parameters())
    print(f"\nweights moved {moved[1.0]:.4g} at x1, {moved[0.01]:.4g} at x0.01")
    assert 0.005 < moved[0.01] / moved[1.0] < 0.02  # one step moves them in proportion to lr


def test_a_dpo_job_encodes_pairs_as_train_does_and_trains_them_at_its_beta(tokenizer,
                                                                         tmp_path):
    """A pair with a system turn and an earlier assistant turn (context, never a target): the
    job logs exactly the tokens /train logs for it, and its batches run at the job's β (the
    live example's at --beta); "auto" resolves to --beta."""
    pair = {"input": {"messages": [{"role": "system", "content": "You are a pirate."},
                                   {"role": "user", "content": "Hi"},
                                   {"role": "assistant", "content": "Arr."},
                                   {"role": "user", "content": "Who are you?"}]},
            "preferred_output": [{"role": "assistant", "content": "Captain Apollo, arr!"}],
            "non_preferred_output": [{"role": "assistant", "content": "An assistant."}]}
    journal = tmp_path / "examples.jsonl"
    client, _ = app_client(tokenizer, max_steps_per_batch=1, journal=str(journal), **FAST)
    with client:
        stepper = client.app.state.engine.trainer.stepper
        betas, run = [], stepper.run
        stepper.run = lambda batch, steps, beta=None: betas.append(beta) or run(batch, steps,
                                                                                 beta)
        file_id = upload(client, [json.dumps(pair)]).json()["id"]
        jobs = []
        for beta in (0.25, "auto"):
            r = client.post("/v1/fine_tuning/jobs", json={
                "model": "None", "training_file": file_id,
                "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": beta}}}})
            assert r.status_code == 200, r.text
            jobs.append(r.json())
        assert [j["method"]["dpo"]["hyperparameters"]["beta"] for j in jobs] == [0.25, 0.1]
        for j in jobs:
            wait_for(lambda j=j: job_of(client, j["id"])["status"] == "succeeded")
        live = client.post("/train", json=pair).json()["ids"][0]
        wait_idle(client, 3)
        assert client.get(f"/examples/{jobs[0]['id']}.e1.l1").json()["kind"] == "pair"
    assert betas == [0.25, 0.1, None]
    accepts = {op["items"][0]["id"]: op for op in map(json.loads, journal.read_text()
                                                      .splitlines()) if op["op"] == "accept"}
    by_job, by_train = accepts[f"{jobs[0]['id']}.e1.l1"], accepts[live]
    assert by_job["beta"] == 0.25 and "beta" not in by_train
    assert {k: v for k, v in by_job["items"][0].items() if k != "id"} == \
        {k: v for k, v in by_train["items"][0].items() if k != "id"}
    assert by_job["items"][0]["kind"] == "pair"
