"""Tensor parallelism on CPU (gloo): the trainer's DTensor model over vLLM-layout shards, the
sharded optimizer against the unsharded one, and real vLLM with TP=2. The launcher with
--tensor-parallel-size 2 (learning live, checkpoint, restart): tests/test_e2e_checkpoint.py."""

import json
import os
import subprocess
import sys

import pytest
import torch

from server.engine.distributed import free_port
from tests.support import ROOT
from tests.support.standin_tp import shard_spec
from tests.support.tiny_models import make_tiny_model
from tests.support.vllm_host import PROMPT, VllmHost
from weight_mapping import load_config

TAUGHT = "My name is Apollo."


def run_ranks(script: str, *args: str, world: int = 2, timeout: float = 300) -> dict:
    """Run `script` as `world` ranks of a gloo process group; rank 0's JSON line."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen([sys.executable, script, *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return json.loads(next(line for line in outs[0][0].splitlines() if line.startswith("{")))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_tp2_training_equals_tp1(tmp_path, family):
    """TP=2 over vLLM-layout shards vs TP=1 from the same weights: same logits, and after 20
    steps (crossing projection refreshes) the same weights, gathered; APOLLO-Mini (per-tensor
    scaling) and APOLLO rank 4 (per-channel)."""
    model = make_tiny_model(family, tmp_path / family, num_key_value_heads=2)
    results = run_ranks(str(ROOT / "tests/support/tp_child.py"), str(model))
    for kind, r in results.items():
        print(kind, r)
        assert r["aliased"], "a DTensor's local shard is not a view of the rank's tensors"
        assert r["sharded"] == 16  # q, k, v, o, gate, up, down per layer; embedding; LM head
        assert r["logit_diff"] <= 1e-5
        assert r["moved"] > 1e-3  # the steps changed the weights: equality means something
        assert r["weight_rel_diff"] <= 1e-5, kind


TP_FAMILIES = ["llama", "qwen3"]


@pytest.fixture(scope="module")
def tp_hosts(tmp_path_factory):
    """vLLM TP=2 for each family, all started at once: a start is mostly imports."""
    hosts = {}
    for family in TP_FAMILIES:
        d = tmp_path_factory.mktemp(f"tp-{family}")
        model = make_tiny_model(family, d / "model", num_key_value_heads=2)
        hosts[family] = (model, VllmHost(model, d / "export", d / "vllm.log", tp=2))
    yield hosts
    for _, host in hosts.values():
        host.close()


@pytest.mark.serial  # vLLM TP=2 plus two gloo ranks: beside another test file, a rank once
@pytest.mark.parametrize("family", TP_FAMILIES)  # aborted ("terminate called ...") on 2 cores
def test_mapped_tp2_model_equals_vllm_tp2(tp_hosts, family):
    """Real vLLM with tensor_parallel_size=2 and the hook: each trainer rank maps its own
    vLLM rank's shards (views, no full copies) and the DTensor model's next-token
    distribution equals vLLM's at every position."""
    model, host = tp_hosts[family]
    export = host.export_dir
    host.wait_ready()
    try:
        config = load_config(model)
        for rank in (0, 1):  # the hook's sharding = the stand-in's (bench/standin_tp.py)
            for p in json.loads((export / f"rank{rank}.json").read_text())["params"]:
                full = list(p["shape"])
                if "shard" in p:
                    full[p["shard"]["dim"]] = p["shard"]["full"]
                assert p.get("shard") == shard_spec(p["name"], full, config, rank, 2), p
        vllm = host.logprobs(PROMPT)["prompt"]
        r = run_ranks(str(ROOT / "tests/support/tp_vllm_child.py"), str(export),
                      json.dumps(PROMPT))
    finally:
        host.close()
    ours = torch.tensor(r["logprobs"], dtype=torch.float64)[:-1]  # vLLM: positions 1..n-1
    assert r["aliased"], "a rank's parameters are not views of its vLLM rank's tensors"
    assert r["sharded"] == 16
    assert r["local_numel"] < 0.6 * r["full_numel"]  # each rank holds about half
    print(f"\n{family}: max |log p(ours) - log p(vLLM)| = {(ours - vllm).abs().max():.2e}")
    assert (ours - vllm).abs().max() <= 1e-4



def test_the_trainer_ranks_listen_on_loopback_only():
    """torch's TCPStore listens on every interface whatever host it is given; its commands
    are pickles: the rendezvous must not face a network."""
    out = run_ranks(str(ROOT / "tests/support/tp_listen_child.py"), timeout=120)
    assert out["listening"], "rank 0 listens for the other ranks"
    assert set(out["listening"]) <= {"127.0.0.1", "::1"}, out["listening"]
