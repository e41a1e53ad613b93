"""Torn-update test against real vLLM: can an engine step see a half-applied update?

A writer (this process, through the trainer's own VllmCoordinator) flips 30 layers' weights
between two sets A and B in two halves with a pause between them, so a half-applied update
lasts long enough to be seen. Meanwhile we ask vLLM for next-token logprobs of a fixed
prompt; each answer must match the answer under A or under B. With the step lock off some
answers match neither (torn); with it on, none do.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from server.engine.coordination import VllmCoordinator
from server.engine.distributed import free_port
from tests.support.health import wait_healthy
from weight_mapping import attach

pytestmark = pytest.mark.e2e
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def vllm(tmp_path_factory, default_model_dir):
    run = tmp_path_factory.mktemp("vllm")
    port = free_port()
    log = open(run / "vllm.log", "w")  # noqa: SIM115
    env = {**os.environ, "VLLM_APOLLO_EXPORT_DIR": str(run / "export"),
           "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "hooks", "serve", str(default_model_dir), "--dtype", "float32",
         "--enforce-eager", "--max-model-len", "512", "--no-enable-prefix-caching",
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout=900, proc=proc,
                     describe=lambda: (run / "vllm.log").read_text()[-3000:])
        holder = {"export": attach(run / "export", timeout=60)}
        yield url, holder, str(default_model_dir)
        # Unmap before vLLM (and its shared-memory manager) goes: torch aborts otherwise.
        holder.clear()
        gc.collect()
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(60)
        from hooks.leftovers import clean_export

        clean_export(run / "export")  # and vLLM's rendezvous file


def _signature(url: str, model: str) -> dict[str, float]:
    r = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "model": model, "prompt": PROMPT, "max_tokens": 1, "temperature": 0, "logprobs": 5})
    r.raise_for_status()
    return r.json()["choices"][0]["logprobs"]["top_logprobs"][0]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) < 2e-3 for k in a)


def _count_torn(url, holder, model, consistency: str, seconds: float = 8.0) -> tuple[int, int]:
    export = holder["export"]
    names = [n for n in export.tensors if n.endswith("mlp.down_proj.weight")]
    originals = {n: export.tensors[n].clone() for n in names}
    altered = {n: t * 1.3 for n, t in originals.items()}
    live = VllmCoordinator(export, consistency=consistency, prefix_cache_reset="never")
    sig_a = _signature(url, model)

    def write(target: dict):
        half = len(names) // 2
        with live.write():
            for n in names[:half]:
                export.tensors[n].copy_(target[n])
            time.sleep(0.2)  # a slow write: the half-applied state lasts 0.2 s
            for n in names[half:]:
                export.tensors[n].copy_(target[n])

    write(altered)
    sig_b = _signature(url, model)
    write(originals)
    assert not _same(sig_a, sig_b), "A and B must be distinguishable"

    stop = threading.Event()

    def flip():
        while not stop.is_set():
            write(altered)
            time.sleep(0.05)
            write(originals)
            time.sleep(0.05)

    flipper = threading.Thread(target=flip)
    flipper.start()
    torn = total = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            sig = _signature(url, model)
            total += 1
            torn += not (_same(sig, sig_a) or _same(sig, sig_b))
    finally:
        stop.set()
        flipper.join()
        with torch.no_grad():
            for n in names:
                export.tensors[n].copy_(originals[n])
    return torn, total


def test_without_the_step_lock_engine_steps_see_torn_updates(vllm):
    torn, total = _count_torn(*vllm, consistency="none")
    print(f"\nlock off: {torn} of {total} answers came from half-applied updates")
    assert torn > 0


def test_with_the_step_lock_no_engine_step_sees_a_torn_update(vllm):
    torn, total = _count_torn(*vllm, consistency="step")
    print(f"\nlock on: {torn} of {total} answers came from half-applied updates")
    assert total > 5 and torn == 0
