"""The training server in-process (FastAPI's TestClient) around a tiny random Llama: the HTTP
contract without vLLM. End-to-end tests use the real launcher instead (support/stack.py)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM

from checkpoint import Checkpointer
from server.app import create_app
from server.engine import drift
from server.engine.wiring import assemble, retention
from server.settings import Settings
from tests.support.tiny_models import CONFIGS

# Where app engines keep the drift reference and the null-space guard's bases made from the
# weights they started with (tests/conftest.py sets it per session; None: not kept). Answering
# the 230 probes and fitting the guard cost ~4 s per app; every app starts from the same tiny
# Llama, so all but the first load them, through the product's own cache (Monitor.shared).
MONITOR_CACHE: Path | None = None


def _cache_key(model: torch.nn.Module, settings: Settings) -> str:
    """The starting weights, bit for bit, and the settings the reference and guard depend
    on."""
    h = hashlib.sha256(repr((settings.guard, settings.guard_eps, settings.probe_file,
                             drift.PINNED_TOKENS)).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def tiny_llama(tokenizer) -> torch.nn.Module:
    """A tiny random Llama with the tokenizer's vocabulary (the same one every call)."""
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS["llama"](vocab_size=len(tokenizer)))


class _Client(TestClient):
    """Entered once the trainer's one-time preparation (drift reference, guard) is over: its
    work (a pacing chunk) then cannot land between two reads a test compares."""

    def __enter__(self):
        client = super().__enter__()
        trainer = self.app.state.engine.trainer
        assert trainer.prepared.wait(120), "the trainer never finished its preparation"
        return client


def app_client(tokenizer, model_dir=None, coordinator=None,
               **settings) -> tuple[TestClient, torch.nn.Module]:
    """A client of an app whose engine trains a tiny model in this process; with `model_dir`
    the model is saved there first and checkpoints write into it; `coordinator`: what it
    coordinates with (default: nothing, engine/coordination.Standalone)."""
    model = tiny_llama(tokenizer)
    s = Settings(export_dir="unused", **settings)
    checkpointer = None
    if model_dir is not None:
        model.save_pretrained(model_dir)
        checkpointer = Checkpointer(model_dir, dict(model.named_parameters()),
                                    history=retention(s))

    def build(settings: Settings):
        engine = assemble(settings, model, tokenizer, model_path=str(model_dir),
                          checkpointer=checkpointer, coordinator=coordinator)
        monitor = engine.trainer.monitor
        if MONITOR_CACHE is not None and monitor is not None and monitor.shared is None:
            key = _cache_key(model, settings)
            monitor.shared = MONITOR_CACHE / f"probe-reference-{key}.pt"
        return engine

    # a loopback Host, as a local client sends (the default "testserver" is refused)
    return _Client(create_app(s, build=build), base_url="http://localhost"), model


def wait_idle(client: TestClient, finished: int, timeout: float = 120) -> dict:
    """/status once `finished` examples are trained or failed and none is queued."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = client.get("/status").json()
        if st["examples_trained"] + st["examples_failed"] >= finished and \
                st["examples_queued"] == 0:
            return st
        time.sleep(0.05)
    raise AssertionError("trainer did not finish")
