"""kill -9 at random moments during live rollbacks (30 times, a 120 MB model held by a
stand-in for vLLM's worker): the files stay one whole version and verify passes; the next
training server on the export finishes the interrupted rollback before anything else, so the
live weights hold one whole version too, the one asked for."""

import json
import random
import signal
import time

import torch
from safetensors.torch import save_file

from checkpoint import Checkpointer, Retention
from checkpoint.__main__ import main as checkpoint_cli
from tests.support.states import one_value
from tests.support.tiny_models import make_tiny_model
from tests.support.zygote import Zygote
from weight_mapping import attach, build_model, load_config

BIG = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
           num_key_value_heads=4, head_dim=64, vocab_size=512)


def _fill(params, k):
    """State k: the i-th parameter holds 10 k + i everywhere (any mix is visible)."""
    with torch.no_grad():
        for i, p in enumerate(params.values()):
            p.fill_(10.0 * k + i)


def _live_state(params) -> int:
    states = set()
    for i, (name, p) in enumerate(params.items()):
        states.add(round((one_value(p, name) - i) / 10))
    assert len(states) == 1, f"parameters of different versions: {states}"
    return states.pop()


def test_kill_9_during_live_rollbacks(tmp_path, owner_factory):
    model_dir = make_tiny_model("llama", tmp_path / "model", **BIG)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    params = dict(model.named_parameters())
    _fill(params, 0)  # the original: state 0
    save_file({n: p.detach().contiguous() for n, p in params.items()},
              model_dir / "model.safetensors", metadata={"format": "pt"})
    assert (model_dir / "model.safetensors").stat().st_size >= 100e6
    del model, params
    _, export_dir = owner_factory(model_dir)
    export = attach(export_dir, timeout=60)
    live = dict(build_model(export.tensors, load_config(str(model_dir)))
                .named_parameters(remove_duplicate=False))
    live = {n: p for n, p in live.items() if n != "lm_head.weight" or
            "model.embed_tokens.weight" not in live or p is not live["model.embed_tokens.weight"]}
    ck = Checkpointer(model_dir, live, history=Retention(), durable=False)
    for k in (1, 2):  # versions 1 and 2; the files hold version 2
        _fill(live, k)
        ck.sync()
    del ck
    file_bytes = (model_dir / "model.safetensors").read_bytes()

    marker = export_dir / "rollback.json"
    rng = random.Random(5)
    outcomes = {"finished at restart": 0, "whole": 0}
    expected = None
    # At least 30 kills, and more (up to 90) until 10 landed inside a rollback: how many do
    # depends on the machine's speed, what the test checks does not. Each child is a fresh
    # process forked from one that imported the child's modules once (tests/support/zygote.py).
    kills = 0
    with Zygote("tests.support.crash_rollback_child") as zygote:
        while True:
            last = kills >= 30 and (outcomes["finished at restart"] >= 10 or kills >= 90)
            child = zygote.spawn(str(model_dir), str(export_dir))
            assert child.stdout.readline().strip() == "ready"
            state = _live_state(live)  # the child finished what its predecessor left
            if expected is not None:
                assert state == expected, (state, expected)
            if last:  # one more start has checked the last kill
                child.kill()
                child.wait()
                break
            child.stdin.write("go\n")
            child.stdin.flush()
            time.sleep(rng.uniform(0.5, 3.0))
            child.send_signal(signal.SIGKILL)
            child.wait()
            kills += 1
            expected = None
            if marker.exists():  # killed inside a rollback: the next child completes it
                to = json.loads(marker.read_text())["to"]
                expected = {"original": 0}.get(to, to)
                outcomes["finished at restart"] += 1
            else:
                outcomes["whole"] += 1
                _live_state(live)
            assert (model_dir / "model.safetensors").read_bytes() == file_bytes  # never written
            assert checkpoint_cli(["verify", str(model_dir)]) == 0
    print(f"\nkill -9 outcomes: {outcomes}")
    assert outcomes["finished at restart"] >= 10
    # The owner is closed by its fixture, after this frame's views into its memory are gone:
    # freeing them once it has exited aborts the process.
