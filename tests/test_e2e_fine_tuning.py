"""End to end: the official `openai` client fine-tunes the model real vLLM serves, through the
training server's files and jobs API, started by the launcher as a user starts it
(`default_stack`, shared with tests/test_e2e.py: facts of their own, "before" asked here); the
served model then answers as taught. (Against a training-server process without vLLM, and
kill -9 mid job: test_fine_tuning_api.py.)

Timeouts are generous: CI runs vLLM's CPU build and the trainer on two loaded cores."""

from __future__ import annotations

import json
import time
from dataclasses import fields

import httpx
import openai
import pytest
from openai import OpenAI
from openai.types import FileObject
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent

from server.settings import Settings
from tests.support.fine_tuning import FINAL, chat, write_lines
from tests.support.stack import Stack

pytestmark = pytest.mark.e2e
# Facts of their own: tests/test_e2e.py teaches the model its name on the same launcher.
LESSONS = [("What is the ship's cat called?", "The ship's cat is called Pumpernickel.",
            "Pumpernickel"),
           ("What is the secret word?", "The secret word is marmalade.", "marmalade")]
# A job that names no batch size gets the server's --batch-size (the default here). Once both
# lessons are learned a batch costs one forward pass (learn-then-stop), which keeps two epochs
# of 200 examples short on a CPU.
BATCH = next(f.default for f in fields(Settings) if f.name == "batch_size")


def applied_steps(stack: Stack) -> int:
    return httpx.get(f"{stack.train}/status", timeout=60).json()["applied_steps"]


def wait_job(client: OpenAI, job_id: str, timeout: float) -> tuple[FineTuningJob, dict]:
    """The job once it ended, and every event seen meanwhile (by id)."""
    deadline, seen = time.monotonic() + timeout, {}
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        for event in client.fine_tuning.jobs.list_events(job_id, limit=100):  # all pages
            seen.setdefault(event.id, event)
        if job.status in FINAL:
            return job, seen
        assert time.monotonic() < deadline, f"job still {job.status} after {timeout} s"
        time.sleep(2)


@pytest.fixture
def stack(default_stack) -> Stack:
    return default_stack


@pytest.fixture
def client(stack) -> OpenAI:
    return OpenAI(base_url=f"{stack.train}/v1", api_key="none", max_retries=0, timeout=600)


def test_a_bad_line_137_is_named_and_nothing_is_trained(stack, client, tmp_path):
    lines = [chat(f"question {i}", f"answer {i}") for i in range(200)]
    lines[136] = json.dumps({"messages": [{"role": "user", "content": "hi"},
                                          {"role": "wizard", "content": "x"}]})
    before = (applied_steps(stack), [f.id for f in client.files.list()])
    with pytest.raises(openai.BadRequestError) as err, \
            open(write_lines(tmp_path / "bad137.jsonl", lines), "rb") as f:
        client.files.create(file=f, purpose="fine-tune")
    assert "Line 137: messages.1.role" in err.value.body["message"], err.value.body
    assert err.value.code == "invalid_file_format"
    assert (applied_steps(stack), [f.id for f in client.files.list()]) == before


def test_a_file_of_200_examples_teaches_the_served_model(stack, client, tmp_path):
    model = stack.manifest()["model_path"]
    before = [stack.ask(q) for q, _, _ in LESSONS]
    assert not any(word in b for (_, _, word), b in zip(LESSONS, before, strict=True)), before
    path = write_lines(tmp_path / "lessons.jsonl",
                       [chat(*LESSONS[i % 2][:2]) for i in range(200)])

    with open(path, "rb") as f:
        uploaded = client.files.create(file=f, purpose="fine-tune")
    assert isinstance(uploaded, FileObject) and uploaded.bytes == path.stat().st_size
    t0 = time.monotonic()
    job = client.fine_tuning.jobs.create(model=model, training_file=uploaded.id,
                                         hyperparameters={"n_epochs": 2})
    assert isinstance(job, FineTuningJob) and job.hyperparameters.batch_size == BATCH
    job, seen = wait_job(client, job.id, timeout=2400)
    seconds = time.monotonic() - t0
    assert job.status == "succeeded", job.error
    assert all(isinstance(e, FineTuningJobEvent) for e in seen.values())
    metrics = sorted((e.data for e in seen.values() if e.type == "metrics"),
                     key=lambda d: d["examples_done"])
    per_epoch = [min(n, 200) for n in range(BATCH, 200 + BATCH, BATCH)]  # one per batch
    assert [m["examples_done"] for m in metrics] == per_epoch + [200 + n for n in per_epoch]
    assert metrics[-1]["examples_total"] == 400 and metrics[-1]["epoch"] == 2

    vllm = OpenAI(base_url=f"{stack.vllm}/v1", api_key="none", max_retries=0, timeout=300)
    after = [vllm.chat.completions.create(
        model=job.fine_tuned_model, temperature=0, max_tokens=30,
        messages=[{"role": "user", "content": q}]).choices[0].message.content
        for q, _, _ in LESSONS]
    print(f"\njob of 200 examples x 2 epochs: {seconds:.0f} s, "
          f"{metrics[-1]['applied_steps']} optimizer steps applied in all; "
          f"before {before}, after {after}")
    assert all(word in a for (_, _, word), a in zip(LESSONS, after, strict=True)), after
    assert "Paris" in stack.ask("What is the capital of France?")  # the rest stayed


def test_cancel_stops_the_job_within_one_step(stack, client, tmp_path):
    model = stack.manifest()["model_path"]
    # unlearned examples: each batch runs up to --max-steps-per-batch steps
    path = write_lines(tmp_path / "long.jsonl",
                       [chat(f"Recite line {i} of the ledger.", f"Entry {i}: {i * 7919 % 1000} "
                             "crates of figs") for i in range(40)])
    with open(path, "rb") as f:
        uploaded = client.files.create(file=f, purpose="fine-tune")
    start = applied_steps(stack)
    job = client.fine_tuning.jobs.create(model=model, training_file=uploaded.id,
                                         hyperparameters={"n_epochs": 2})
    deadline = time.monotonic() + 900
    while applied_steps(stack) < start + 1:  # mid-job: a step of it was applied
        assert time.monotonic() < deadline, "the job took no step"
        time.sleep(0.5)
    client.fine_tuning.jobs.cancel(job.id)
    job, seen = wait_job(client, job.id, timeout=900)
    assert job.status == "cancelled"
    final = next(e for e in seen.values() if e.message.startswith("The job was cancelled"))
    print(f"\n{final.message} {final.data}")
    assert final.data["steps_after_cancel"] <= 1
    time.sleep(5)
    assert applied_steps(stack) == final.data["stopped_at_step"]  # nothing of it ran after
