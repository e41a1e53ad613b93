"""End to end, one launcher start on the default model: every vLLM response names the weights
that produced it; teach A, checkpoint (v1), teach B, checkpoint (v2), teach C, then rollbacks
to the last checkpoint, to v1 and to the original answer as those versions did; the weight
version advances while training runs; after the launcher stops, `python -m checkpoint revert
DIR original` gives back the untouched files.

The tests share the launcher and run in order (each builds on what the one before taught).
Timeouts are generous: on a loaded 2-core machine vLLM alone takes minutes to start."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.support import ROOT
from tests.support.stack import Stack, model_copy

pytestmark = pytest.mark.e2e
# Three made-up facts (question, answer, key) the untouched model cannot know; the launcher's
# end-to-end test finds each learned from one POST.
A, B, C = [(x["question"], x["answer"], x["key"]) for x in map(json.loads, (
    ROOT / "bench/data/locality/lessons.jsonl").read_text().splitlines()[:3])]
PROMPTS = ["What is the capital of France?", "Say hello.", "What is 2 + 3?",
           "Name a fruit.", "What colour is the sky?"]
TRAINED_S = 900  # one lesson: ~10 s on an idle machine
# One trainer thread: vLLM's CPU worker keeps a core busy while it answers, and a trainer with
# an OpenMP thread on that core took 35-55 s per step (instead of ~1 s) while answers streamed.
TRAIN_ARGS = "--drift-probes 4 --threads 1"
HTTP_S = 600  # an answer, a checkpoint, a rollback


def ask(stack: Stack, question: str, max_tokens: int = 30, **extra) -> tuple[str, dict]:
    r = httpx.post(f"{stack.vllm}/v1/chat/completions", timeout=HTTP_S, json={
        "model": stack.manifest()["model_path"], "temperature": 0, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": question}], **extra})
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"], dict(r.headers)


def post(stack: Stack, path: str, **body) -> httpx.Response:
    return httpx.post(f"{stack.train}{path}", json=body or None, timeout=HTTP_S)


def train(stack: Stack, question: str, answer: str) -> str:
    r = post(stack, "/train", prompt=question, completion=answer)
    assert r.status_code == 202, r.text
    stack.wait_trained(r.json()["ids"], timeout=TRAINED_S)
    return r.json()["ids"][0]


def teach(stack: Stack, lesson) -> str:
    question, answer, _ = lesson
    example = train(stack, question, answer)
    assert answered(stack, lesson), ask(stack, question)[0]
    return example


def answered(stack: Stack, lesson) -> bool:
    return lesson[2] in ask(stack, lesson[0])[0]


def checkpoint(stack: Stack) -> dict:
    r = post(stack, "/checkpoint")
    assert r.status_code == 200, r.text
    out = r.json()
    print(f"checkpoint v{out['version']}: {out['bytes_changed'] / 2**20:.0f} MiB changed, "
          f"{out['history_bytes'] / 2**20:.0f} MiB kept, {out['seconds']:.2f} s")
    return out


def rollback(stack: Stack, to) -> dict:
    r = post(stack, "/rollback", to=to)
    assert r.status_code == 200, r.text
    out = r.json()
    print(f"rollback to {to}: version {out['version']}, {out['chunks']} chunks, "
          f"{out['bytes_read'] / 2**20:.0f} MiB read, serving stalled "
          f"{out['stall_seconds']:.2f} s, {out['seconds']:.2f} s in all")
    return out


def state(stack: Stack, example: str) -> str:
    return httpx.get(f"{stack.train}/examples/{example}", timeout=HTTP_S).json()["state"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, default_model_dir):
    """The launcher on a copy of the default model (checkpoints write into it), and the
    untouched model's greedy answers and headers, asked before anything is trained."""
    model_dir = tmp_path_factory.mktemp("versions") / "model"
    model_copy(default_model_dir, model_dir)
    s = Stack(tmp_path_factory.mktemp("run"), model_dir, train_args=TRAIN_ARGS)
    s.model_dir = model_dir
    try:
        s.baseline = [ask(s, p) for p in PROMPTS]
    except BaseException:
        s.stop()
        raise
    print(f"\nlauncher: healthy after {s.seconds_to_healthy:.1f} s")
    yield s
    if s.proc.poll() is None:
        s.stop()


def test_responses_name_the_untouched_weights(stack):
    headers = stack.baseline[0][1]
    assert headers["x-apollo-weight-version"] == "0"
    assert headers["x-apollo-checkpoint"] == "0"  # the files: the original


def test_rollbacks_answer_as_each_version_did(stack):
    assert not answered(stack, A) and not answered(stack, B) and not answered(stack, C)
    a = teach(stack, A)
    v1 = checkpoint(stack)
    b = teach(stack, B)
    v2 = checkpoint(stack)
    assert (v1["version"], v2["version"]) == (1, 2)
    assert ask(stack, "Say hello.")[1]["x-apollo-checkpoint"] == "2"
    c = teach(stack, C)
    assert "x-apollo-checkpoint" not in ask(stack, "Say hello.")[1]  # trained since v2

    r = rollback(stack, "last-checkpoint")
    assert r["version"] == 2 and r["stall_seconds"] > 0
    assert answered(stack, A) and answered(stack, B) and not answered(stack, C)
    assert ask(stack, "Say hello.")[1]["x-apollo-checkpoint"] == "2"
    assert state(stack, c) == "rolled back"

    rollback(stack, 1)
    assert answered(stack, A) and not answered(stack, B) and not answered(stack, C)
    assert [state(stack, i) for i in (a, b, c)] == ["trained", "rolled back", "rolled back"]

    rollback(stack, "original")
    assert [ask(stack, p)[0] for p in PROMPTS] == [t for t, _ in stack.baseline]
    assert ask(stack, "Say hello.")[1]["x-apollo-checkpoint"] == "0"
    assert state(stack, a) == "rolled back"

    listing = httpx.get(f"{stack.train}/versions", timeout=HTTP_S).json()
    for v in listing["versions"]:
        print(f"version {v['n']}: {v.get('examples')} examples, "
              f"{v.get('optimizer_steps')} steps, drift {v.get('drift')}, "
              f"{(v.get('bytes_changed') or 0) / 2**20:.0f} MiB changed, "
              f"{(v.get('history_bytes') or 0) / 2**20:.0f} MiB kept")
    assert [v["n"] for v in listing["versions"]] == [0, 1, 2]
    assert all(v["reachable"] for v in listing["versions"])
    assert listing["versions"][1]["examples"] == 1 and listing["versions"][1]["drift"]
    status = httpx.get(f"{stack.train}/status", timeout=HTTP_S).json()
    assert status["weight_checkpoint"] == 0 and status["last_rollback"]["version"] == 0


def test_bad_rollbacks_change_nothing(stack):
    before = httpx.get(f"{stack.train}/status", timeout=HTTP_S).json()["weight_version"]
    r = post(stack, "/rollback", to=99)
    assert r.status_code == 404 and "99" in r.json()["detail"]
    assert post(stack, "/rollback", to="yesterday").status_code == 422
    assert httpx.get(f"{stack.train}/status", timeout=HTTP_S).json()["weight_version"] == before


def test_the_weight_version_advances_while_training_and_a_span_is_a_range(stack):
    """Long answers asked while two lessons train: each response reports the versions that
    produced it; at least one spans an update."""
    seen: list[str] = []
    done = threading.Event()
    failed: list[BaseException] = []

    def trainer():
        try:
            for q, a in [("Which season is best?", "Winter is best."),
                         ("Which number is lucky?", "Seven is lucky.")]:
                train(stack, q, a)
        except BaseException as exc:  # reported by the test thread
            failed.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=trainer, daemon=True)
    thread.start()
    deadline = time.monotonic() + 2 * TRAINED_S
    while not done.is_set() and time.monotonic() < deadline:
        seen.append(ask(stack, "Tell me a long story about a lighthouse.", max_tokens=160,
                        ignore_eos=True)[1]["x-apollo-weight-version"])
    thread.join(timeout=TRAINED_S)
    assert not failed, failed
    seen.append(ask(stack, "Say hello.")[1]["x-apollo-weight-version"])  # all trained
    print(f"versions reported while training: {seen}")
    first, last = (int(v.split("-")[0]) for v in (seen[0], seen[-1]))
    assert last > first, seen
    spans = [tuple(map(int, v.split("-"))) for v in seen if "-" in v]
    assert spans and all(lo < hi for lo, hi in spans), seen


def test_revert_to_the_original_gives_back_the_untouched_files(stack, default_model_dir):
    stack.stop()  # no --checkpoint-on-exit: the files stay version 2
    model_dir = stack.model_dir
    out = subprocess.run([sys.executable, "-m", "checkpoint", "revert", str(model_dir),
                          "original"], cwd=ROOT, capture_output=True, text=True, timeout=HTTP_S)
    assert out.returncode == 0, out.stderr
    print(f"revert to the original: {out.stdout.strip()}")
    files = [f for f in default_model_dir.iterdir() if f.is_file() and
             not f.name.startswith(".")]  # the model's files; not the lock beside them
    assert any(f.suffix == ".safetensors" for f in files)
    for f in files:
        assert (model_dir / f.name).read_bytes() == f.read_bytes(), f.name
    verify = subprocess.run([sys.executable, "-m", "checkpoint", "verify", str(model_dir)],
                            cwd=ROOT, capture_output=True, text=True, timeout=HTTP_S)
    assert verify.returncode == 0, verify.stdout + verify.stderr
