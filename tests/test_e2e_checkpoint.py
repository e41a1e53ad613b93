"""End to end: what the served model learned survives a checkpoint and a full restart."""

import shutil

import httpx
import pytest
import torch
from safetensors.torch import load_file

from tests.test_e2e import LESSON, Stack, _wait_trained
from weight_mapping import attach, build_model, load_config

pytestmark = pytest.mark.e2e
PROMPTS = ["What is your name?", "What is the capital of France?", "Name a primary color."]


def test_checkpoint_then_restart_serves_the_same_answers(tmp_path, default_model_dir):
    model_dir = tmp_path / "model"
    shutil.copytree(default_model_dir, model_dir)  # never train the shared cache
    (tmp_path / "run1").mkdir()
    first = Stack(tmp_path / "run1", model_dir)
    try:
        r = httpx.post(f"{first.train}/train", json=LESSON)
        assert r.status_code == 202
        _wait_trained(first, r.json()["ids"])
        answers = [first.ask(p) for p in PROMPTS]
        assert "Apollo" in answers[0]

        r = httpx.post(f"{first.train}/checkpoint", timeout=120)
        assert r.status_code == 200, r.text
        result = r.json()
        print(f"\ncheckpoint: {result['tensors']} tensors, {result['bytes_written']} bytes in "
              f"{result['seconds']:.2f} s")
        assert result["bytes_written"] > 0
        assert httpx.get(f"{first.train}/status").json()["last_checkpoint"]["tensors"] == \
            result["tensors"]

        # The files now equal the live weights bit for bit (read through our own attach).
        export = attach(first.run_dir / "export")
        live = dict(build_model(export.tensors, load_config(str(model_dir)))
                    .named_parameters(remove_duplicate=False))
        on_disk = load_file(model_dir / "model.safetensors")
        assert on_disk and all(torch.equal(t, live[name].detach()) for name, t in on_disk.items())
        del export, live
    finally:
        first.stop()

    (tmp_path / "run2").mkdir()
    second = Stack(tmp_path / "run2", model_dir)
    try:
        assert [second.ask(p) for p in PROMPTS] == answers
    finally:
        second.stop()
