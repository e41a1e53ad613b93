"""kill -9 at random moments, 30 times each, on a 112 MB model: during `revert`, and during
syncs that keep history. After recovery the files hold one whole version and verify passes.
(A live rollback's kill -9 test is in tests/test_rollback_crash.py.)"""

import random
import signal
import time

import torch
from safetensors.torch import load_file, save_file

from checkpoint import Checkpointer, Retention, recover
from checkpoint.__main__ import main as checkpoint_cli
from tests.support.states import one_value
from tests.support.zygote import Zygote

N = 4


def _state(model_dir) -> int:
    """The one state k all tensors hold (tensor i == 10 k + i everywhere)."""
    on_disk = load_file(model_dir / "model.safetensors")
    states = set()
    for i in range(N):
        states.add(int(one_value(on_disk[f"t{i}"], f"t{i}") - i) // 10)
    assert len(states) == 1, f"tensors from different versions: {states}"
    return states.pop()


def _kills(model_dir, args, rng, check) -> dict:
    """30 children (fresh processes forked from one that imported the child module once:
    tests/support/zygote.py), each killed at a random moment, then recovery."""
    outcomes = {"before": 0, "after": 0}
    with Zygote(args[0]) as zygote:
        for _ in range(30):
            child = zygote.spawn(str(model_dir), *args[1:])
            assert child.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.0, 1.5))
            child.send_signal(signal.SIGKILL)
            lines = child.stdout.read().splitlines()
            child.wait()
            recover(model_dir)
            begun = [ln.split()[1:] for ln in lines if ln.startswith("begin")]
            done = lines[-1].startswith("done") if lines else True
            if begun and not done:
                outcomes[check(_state(model_dir), begun[-1])] += 1
            else:
                _state(model_dir)
    print(f"\nkill -9 outcomes: {outcomes}")
    assert checkpoint_cli(["verify", str(model_dir)]) == 0
    return outcomes


def test_kill_9_during_reverts_leaves_one_version(tmp_path):
    tensors = {f"t{i}": torch.full((7_000_000,), float(i)) for i in range(N)}  # 112 MB
    save_file(tensors, tmp_path / "model.safetensors")
    ck = Checkpointer(tmp_path, tensors, history=Retention(keep=2), durable=False)
    for k in (1, 2):
        for i in range(N):
            tensors[f"t{i}"].fill_(10.0 * k + i)
        ck.sync(meta={"state": k})
    del ck
    from checkpoint.history import Store

    store = Store(tmp_path)
    versions = store.load()
    versions.entries[0]["state"] = 0
    store.save(versions)

    def check(state: int, begun: list[str]) -> str:
        before, to = map(int, begun)
        assert state in (before, to), (state, begun)
        return "after" if state == to else "before"

    outcomes = _kills(tmp_path, ["tests.support.crash_revert_child"], random.Random(7), check)
    assert outcomes["before"] + outcomes["after"] >= 15  # most kills landed inside a revert


def test_kill_9_during_syncs_that_keep_history(tmp_path):
    """As tests/test_checkpoint.py's crash test, with the undo log instead of the redo log."""
    tensors = {f"t{i}": torch.full((7_000_000,), float(i)) for i in range(N)}
    save_file(tensors, tmp_path / "model.safetensors")

    def check(state: int, begun: list[str]) -> str:
        k = int(begun[0])
        assert state in (k - 1, k), (state, k)
        return "after" if state == k else "before"

    outcomes = _kills(tmp_path, ["tests.support.crash_sync_child", "history"],
                      random.Random(99), check)
    assert outcomes["before"] + outcomes["after"] >= 15
    assert checkpoint_cli(["revert", str(tmp_path), "original"]) == 0  # still exact
    assert _state(tmp_path) == 0
