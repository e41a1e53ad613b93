"""The OpenAI-compatible files and fine-tuning jobs, driven by the official `openai` client
against a real training-server process (weights held by a stand-in owner, as vLLM holds
them); with real vLLM: test_e2e_fine_tuning.py.

Over 300 lines on purpose: one subject (the OpenAI-compatible API) with many short cases
sharing one server process."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import torch
from openai.types import FileDeleted, FileObject
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent

from server.engine.example_replay import replay
from server.engine.loss import sequence_logps
from server.engine.tokenization import encode_lesson, preference_pair
from tests.support import ROOT
from tests.support.fine_tuning import FINAL, chat, pair, write_lines
from tests.support.standin_owner import OwnerProcess
from tests.support.tiny_models import make_tiny_chat_model
from tests.support.train_process import TrainServer
from weight_mapping import attach, build_model, load_config


def wait_job(client, job_id: str, timeout: float = 600) -> FineTuningJob:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in FINAL:
            return job
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} still {job.status}")


def status(server: TrainServer) -> dict:
    return httpx.get(f"{server.url}/status").json()


@pytest.fixture(scope="module")
def served(tmp_path_factory, default_model_dir):
    """One training server for the module: batches of 4, exactly 2 steps per batch."""
    tmp = tmp_path_factory.mktemp("ft")
    model_dir = make_tiny_chat_model(tmp / "model", default_model_dir)
    owner = OwnerProcess(model_dir, tmp / "export")
    server = TrainServer(tmp / "export", tmp / "examples.jsonl", "--batch-size", "4",
                         "--max-steps-per-batch", "2", "--learned-prob", "1",
                         "--drift-probes", "0", "--guard", "none",
                         "--max-tokens-per-example", "512", "--max-upload-bytes",
                         str(300 << 20))
    yield server, str(model_dir), tmp
    server.stop()
    owner.close()


def test_the_openai_client_uploads_trains_and_follows_a_job(served):
    server, model, tmp = served
    client = server.openai()
    lessons = [("What is your name?", "My name is Apollo."),
               ("What is the secret word?", "The secret word is marmalade.")]
    lines = [chat(*lessons[i % 2]) for i in range(200)]
    path = write_lines(tmp / "lessons.jsonl", lines)

    with open(path, "rb") as f:
        uploaded = client.files.create(file=f, purpose="fine-tune")
    assert isinstance(uploaded, FileObject) and uploaded.status == "processed"
    assert uploaded.bytes == path.stat().st_size and uploaded.purpose == "fine-tune"
    assert client.files.retrieve(uploaded.id) == uploaded
    assert uploaded.id in [f.id for f in client.files.list()]
    assert client.files.content(uploaded.id).read() == path.read_bytes()

    before = status(server)["applied_steps"]
    job = client.fine_tuning.jobs.create(model=model, training_file=uploaded.id,
                                         hyperparameters={"n_epochs": 2})
    assert isinstance(job, FineTuningJob) and job.status in ("queued", "validating_files",
                                                             "running")
    assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size) == (2, 4)
    job = wait_job(client, job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == model and job.trained_tokens > 0 and job.finished_at

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=7))  # pages through all
    assert all(isinstance(e, FineTuningJobEvent) for e in events)
    assert len({e.id for e in events}) == len(events) == 2 + 50 * 2 + 2  # newest first
    metrics = [e.data for e in reversed(events) if e.type == "metrics"]
    assert [m["examples_done"] for m in metrics] == list(range(4, 401, 4))
    assert metrics[-1]["epoch"] == 2 and metrics[-1]["examples_total"] == 400
    assert all(m["train_loss"] is not None and m["eta_seconds"] >= 0 for m in metrics)
    assert "successfully completed" in events[0].message
    first = client.fine_tuning.jobs.list_events(job.id, limit=3)
    assert first.has_more and len(first.data) == 3
    assert first.get_next_page().data[0].id == events[3].id
    # 2 epochs x 50 batches x exactly 2 steps (--learned-prob 1)
    assert status(server)["applied_steps"] - before == 200
    one = httpx.get(f"{server.url}/examples/{job.id}.e2.l137").json()
    assert one["state"] == "trained"

    assert job.id in [j.id for j in client.fine_tuning.jobs.list(limit=100)]
    gone = client.files.delete(uploaded.id)
    assert isinstance(gone, FileDeleted) and gone.deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


PAIRS = [("Hello there!", "Ahoy, matey!", "Hello! How can I help?"),
         ("Who are you?", "A pirate of the seven seas.", "I am a helpful assistant."),
         ("How is the weather?", "Fair winds, captain!", "It is sunny today.")]


def pair_margins(export_dir: Path, model_dir: str, tokenizer) -> list[float]:
    """Per pair of PAIRS: log p(preferred answer) - log p(non-preferred answer), in nats, on
    the live weights the stand-in owner holds (mapped only while this runs: nothing of them
    outlives the owner, even in a failed test's traceback)."""
    model = build_model(attach(export_dir).tensors, load_config(model_dir))
    out = []
    for q, good, bad in PAIRS:
        chosen, rejected = preference_pair([{"role": "user", "content": q}], good, bad)
        enc = encode_lesson("pair", chosen, tokenizer, 512, rejected=rejected)
        logps = []
        for e in (enc, enc.rejected):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([e.input_ids])).logits
            logps.append(float(sequence_logps(logits, torch.tensor([e.labels]))[0]))
        out.append(logps[0] - logps[1])
    return out


def test_the_openai_client_trains_a_dpo_job_on_preference_pairs(served, tokenizer):
    server, model, tmp = served
    client = server.openai()
    before = pair_margins(tmp / "export", model, tokenizer)
    with open(write_lines(tmp / "prefs.jsonl", [pair(*p) for p in PAIRS]), "rb") as f:
        uploaded = client.files.create(file=f, purpose="fine-tune")
    steps = status(server)["applied_steps"]
    job = client.fine_tuning.jobs.create(model=model, training_file=uploaded.id, method={
        "type": "dpo", "dpo": {"hyperparameters": {"beta": 0.5, "n_epochs": 4,
                                                    "learning_rate_multiplier": 3}}})
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.5
    job = wait_job(client, job.id)
    assert job.status == "succeeded", job.error
    assert (job.hyperparameters.n_epochs, job.method.dpo.hyperparameters.n_epochs) == (4, 4)
    assert status(server)["applied_steps"] - steps == 4 * 2  # 4 epochs of one batch, 2 steps
    states = [httpx.get(f"{server.url}/examples/{job.id}.e{e}.l{n}").json()
              for e in (1, 2, 3, 4) for n in (1, 2, 3)]
    assert {(s["state"], s["kind"]) for s in states} == {("trained", "pair")}
    assert all("DPO (+1 x cross-entropy on the preferred) on 3 pairs" in s["reason"]
               for s in states), states[0]
    after = pair_margins(tmp / "export", model, tokenizer)
    print("\nlog-prob margins of the preferred answers, before:",
          [f"{m:.2f}" for m in before], "after:", [f"{m:.2f}" for m in after])
    assert all(a > b + 1.0 for a, b in zip(after, before, strict=True))


def test_a_job_names_what_it_cannot_do(served):
    server, model, tmp = served
    client = server.openai()
    with open(write_lines(tmp / "one.jsonl", [chat("a", "b")]), "rb") as f:
        plain = client.files.create(file=f, purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="not served here"):
        client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=plain.id)
    with pytest.raises(openai.BadRequestError, match="larger than this server's --batch-size"):
        client.fine_tuning.jobs.create(model=model, training_file=plain.id,
                                       hyperparameters={"batch_size": 64})
    with open(write_lines(tmp / "pairs.jsonl", [pair("Hi", "Hello!", "Go.")] * 3), "rb") as f:
        pairs = client.files.create(file=f, purpose="fine-tune")
    dpo = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1}}}
    for file_id, method, holds in ((plain.id, dpo, "chat examples"),
                                   (pairs.id, None, "preference pairs")):
        with pytest.raises(openai.BadRequestError, match=f"holds {holds}") as err:
            client.fine_tuning.jobs.create(model=model, training_file=file_id,
                                           **({"method": method} if method else {}))
        assert (err.value.code, err.value.param) == ("invalid_training_file", "training_file")
    with pytest.raises(openai.BadRequestError, match="beta") as err:
        client.fine_tuning.jobs.create(model=model, training_file=pairs.id, method={
            "type": "dpo", "dpo": {"hyperparameters": {"beta": 5}}})
    assert err.value.param == "method"
    assert not [j for j in client.fine_tuning.jobs.list(limit=100) if j.training_file in
                (pairs.id, plain.id)]  # no job was created
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-000000000000000000000000")


def test_a_bad_line_137_is_named_and_nothing_is_trained(served):
    server, model, tmp = served
    client = server.openai()
    lines = [chat(f"question {i}", f"answer {i}") for i in range(200)]
    before = (status(server)["applied_steps"], {f.id for f in client.files.list()})

    bad = list(lines)
    bad[136] = json.dumps({"messages": [{"role": "user", "content": "hi"},
                                        {"role": "wizard", "content": "x"}]})
    with pytest.raises(openai.BadRequestError) as err, \
            open(write_lines(tmp / "bad137.jsonl", bad), "rb") as f:
        client.files.create(file=f, purpose="fine-tune")
    message = err.value.body["message"]
    print("\nupload refused:", message)
    assert "Line 137: messages.1.role: Input should be" in message and "Line 13" not in \
        message.replace("Line 137", "")

    # Too many tokens for --max-tokens-per-example: found when the job tokenizes the file
    long = list(lines)
    long[136] = chat("tell me " * 400, "ok")
    with open(write_lines(tmp / "long137.jsonl", long), "rb") as f:
        uploaded = client.files.create(file=f, purpose="fine-tune")
    job = wait_job(client, client.fine_tuning.jobs.create(model=model,
                                                          training_file=uploaded.id).id)
    print("job failed:", job.error.message)
    assert job.status == "failed" and job.error.param == "training_file"
    assert "Line 137" in job.error.message and "--max-tokens-per-example" in job.error.message
    assert status(server)["applied_steps"] == before[0]
    assert {f.id for f in client.files.list()} == before[1] | {uploaded.id}


def test_the_cli_trains_a_file_with_a_progress_bar(served):
    server, _, tmp = served
    path = write_lines(tmp / "cli.jsonl", [chat(f"q{i}", f"a{i}") for i in range(12)])
    run = subprocess.run([sys.executable, "-m", "server.client", "train", str(path),
                          "--epochs", "2", "--url", server.url, "--poll", "0.2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    print(run.stderr[-1500:])
    assert run.returncode == 0, run.stderr
    assert "succeeded" in run.stderr and "24/24" in run.stderr  # the bar reached its end

    bad = write_lines(tmp / "cli-bad.jsonl", [chat("q", "a"), "{oops"])
    run = subprocess.run([sys.executable, "-m", "server.client", "train", str(bad),
                          "--url", server.url], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 2 and "Line 2: not valid JSON" in run.stderr, run.stderr


def test_the_progress_bar_shows_the_last_events_of_a_job_that_ends_between_two_polls(capsys):
    """The job may end, its last events written, between the CLI's listing of events and
    its reading of the state: the bar must still reach its end."""
    from types import SimpleNamespace

    from server.client import _follow

    def metrics(i, done):
        return SimpleNamespace(id=f"e{i}", type="metrics", level="info", message="",
                               data={"examples_done": done, "examples_total": 24,
                                     "epoch": 2, "n_epochs": 2, "train_loss": 1.0})

    events = [metrics(0, 20)]

    class Jobs:
        calls = 0

        def list_events(self, job_id, limit):
            return list(reversed(events))  # newest first

        def retrieve(self, job_id):
            self.calls += 1
            if self.calls == 2:  # the runner finishes the job between two reads
                events.append(metrics(1, 24))
            return SimpleNamespace(status="succeeded" if self.calls >= 2 else "running")

    client = SimpleNamespace(fine_tuning=SimpleNamespace(jobs=Jobs()))
    assert _follow(client, "job", poll=0).status == "succeeded"
    assert "24/24" in capsys.readouterr().err


def test_a_200_mb_upload_streams_in_bounded_memory(served):
    server, _, tmp = served
    client = server.openai()
    line = chat("Please summarise: " + "lorem ipsum dolor sit amet " * 30, "A summary.") + "\n"
    path = tmp / "big.jsonl"
    with open(path, "w") as f:
        for _ in range((200 << 20) // len(line) + 1):
            f.write(line)
    size = path.stat().st_size
    proc = psutil.Process(server.proc.pid)
    base, peak, done = proc.memory_info().rss, [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.monotonic()
    try:
        with open(path, "rb") as f:
            uploaded = client.files.create(file=f, purpose="fine-tune")
    finally:
        seconds = time.monotonic() - t0
        done.set()
        sampler.join()
    growth = (peak[0] - base) / 2**20
    print(f"\n{size / 2**20:.0f} MiB ({uploaded.bytes // len(line)} lines) uploaded, validated "
          f"and stored in {seconds:.1f} s: {size / 2**20 / seconds:.1f} MiB/s; server RSS "
          f"{base / 2**20:.0f} MiB before, peak growth {growth:.1f} MiB")
    assert uploaded.bytes == size
    assert growth < 50
    client.files.delete(uploaded.id)
    path.unlink()


def test_kill_9_mid_job_resumes_exactly_once_per_example_and_epoch(
        tmp_path, default_model_dir, owner_factory):
    model_dir = make_tiny_chat_model(tmp_path / "model", default_model_dir)
    _, export_dir = owner_factory(model_dir)
    journal = tmp_path / "examples.jsonl"
    # batch 1, exactly 1 step: every example of every epoch costs exactly one step
    server = TrainServer(export_dir, journal, "--batch-size", "1", "--max-steps-per-batch",
                         "1", "--learned-prob", "1", "--drift-probes", "0", "--guard", "none")
    rng = random.Random(11)
    try:
        client = server.openai()
        path = write_lines(tmp_path / "data.jsonl",
                           [chat(f"question {i}", f"answer {i}") for i in range(80)])
        with open(path, "rb") as f:
            uploaded = client.files.create(file=f, purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model=str(model_dir), training_file=uploaded.id,
                                             hyperparameters={"n_epochs": 2})
        kills = []
        for _ in range(4):
            target = (len(kills) + 1) * 30 + rng.randint(0, 10)  # kill mid-job, mid-epoch
            while status(server)["applied_steps"] < target:
                time.sleep(0.02)
            server.kill()
            kills.append(target)
            server.start()
            client = server.openai()
        job = wait_job(client, job.id)
        st = status(server)
        print(f"\nkilled at about steps {kills}; {st['applied_steps']} steps applied for "
              f"{job.status} job of 80 examples x 2 epochs")
        assert job.status == "succeeded", job.error
        assert st["applied_steps"] == 160  # no example-epoch trained twice, none skipped
        ids = [f"{job.id}.e{e}.l{n}" for e in (1, 2) for n in range(1, 81)]
        assert {httpx.get(f"{server.url}/examples/{i}").json()["state"] for i in ids} == \
            {"trained"}
        log = replay(journal, st["applied_steps"])
        assert sorted(i for i in log.accepted if i.startswith(job.id)) == sorted(ids)
        events = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
        assert sum("Resumed after a restart" in m for m in events) == 4
    finally:
        server.kill()
