"""End to end: what the served model learned survives a checkpoint and a full restart, with
vLLM on one rank and with tensor parallelism (TP=2), each restarting from the other's files.

On a tiny Llama with the default model's tokenizer (two KV heads, so two ranks can share
them); the default model itself is taught in tests/test_e2e.py. Three launches in all: the
launcher's start (~30 s) dominates, so one test walks TP=1 -> TP=2 -> TP=1."""

import json
import time

import httpx
import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.support.stack import Stack
from tests.support.tiny_models import make_tiny_chat_model
from weight_mapping import attach, build_model, load_config

pytestmark = pytest.mark.e2e
QUESTIONS = ["What is your name?", "What is the capital of France?", "Say hello."]
# a random model needs more, and every matrix: the feed-forward ones alone learn it slowly,
# and the attention shards are what tensor parallelism gathers
TRAIN_ARGS = "--lr 1e-3 --max-steps-per-batch 20 --threads 1 --train-matrices all"
TP2 = ("--tensor-parallel-size", "2")


def teach(stack: Stack, question: str, answer: str) -> None:
    r = httpx.post(f"{stack.train}/train", json={"messages": [
        {"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    assert r.status_code == 202, r.text
    status = stack.wait_trained(r.json()["ids"])
    assert status["skipped_steps"] == 0
    assert stack.ask(question) == answer  # served by the same vLLM processes: no restart


def checkpoint(stack: Stack) -> dict:
    r = httpx.post(f"{stack.train}/checkpoint", timeout=120)
    assert r.status_code == 200, r.text
    result = r.json()
    print(f"\ncheckpoint: {result['tensors']} tensors, {result['bytes_written']} bytes in "
          f"{result['seconds']:.2f} s")
    assert result["bytes_written"] > 0
    assert httpx.get(f"{stack.train}/status").json()["last_checkpoint"]["tensors"] == \
        result["tensors"]
    return result


def test_checkpoint_then_restart_serves_the_same_answers(tmp_path, default_model_dir):
    model_dir = make_tiny_chat_model(tmp_path / "model", default_model_dir,
                                     num_key_value_heads=2, max_position_embeddings=1024)
    # TP=1: learn, sync; the files then equal the live weights bit for bit.
    first = Stack(tmp_path / "run1", model_dir, train_args=TRAIN_ARGS)
    try:
        assert first.ask(QUESTIONS[0]) != "My name is Apollo."
        teach(first, QUESTIONS[0], "My name is Apollo.")
        answers = [first.ask(q) for q in QUESTIONS]
        checkpoint(first)
        export = attach(first.run_dir / "export")
        live = dict(build_model(export.tensors, load_config(str(model_dir)))
                    .named_parameters(remove_duplicate=False))
        on_disk = load_file(model_dir / "model.safetensors")
        assert on_disk and all(torch.equal(t, live[name].detach()) for name, t in on_disk.items())
        del export, live
    finally:
        first.stop()

    # TP=2 restarts from those files with the same answers, learns more, syncs its shards.
    second = Stack(tmp_path / "run2", model_dir, vllm_args=TP2,
                   train_args=TRAIN_ARGS + " --checkpoint-on-exit")
    try:
        manifests = [json.loads((second.run_dir / f"export/rank{r}.json").read_text())
                     for r in (0, 1)]
        assert [(m["rank"], m["world_size"]) for m in manifests] == [(0, 2), (1, 2)]
        assert [second.ask(q) for q in QUESTIONS] == answers
        assert second.ask(QUESTIONS[2]) != "Hello from Apollo."
        teach(second, QUESTIONS[2], "Hello from Apollo.")
        answers = [second.ask(q) for q in QUESTIONS]
        checkpoint(second)  # rank 0 gathers rank 1's shards
        teach(second, QUESTIONS[1], "Paris, says Apollo.")  # saved by --checkpoint-on-exit
        answers = [second.ask(q) for q in QUESTIONS]
        children = second.descendants()  # vLLM's ranks, the trainer's ranks
        left = second.vllm_files()  # its rendezvous file and CPU tensor-parallel memory
        assert len(left) >= 3 and all(f.exists() for f in left), left
    finally:
        second.stop()
    assert "checkpoint on exit" in (second.run_dir / "launcher.log").read_text()
    time.sleep(1)
    assert not [p for p in children if psutil.pid_exists(p) and
                psutil.Process(p).status() != psutil.STATUS_ZOMBIE], "processes left running"
    assert not [f for f in left if f.exists()], "files vLLM left behind"

    # TP=1 again, from what TP=2's exit wrote (rank 0 gathered rank 1's shards)
    third = Stack(tmp_path / "run3", model_dir, train_args=TRAIN_ARGS)
    try:
        assert [third.ask(q) for q in QUESTIONS] == answers
    finally:
        third.stop()
