"""A stand-in for vLLM's worker where no vLLM runs (tests, bench/gpu_check.sh): holds a
model's weights in vLLM's fused layout on DEVICE and exports them through hooks.export, as
the real hook does. Reads commands on stdin: ``sum NAME`` prints the float64 sum of that
tensor as this process sees it; ``quit`` exits.

    python -m tests.support.standin_owner MODEL_DIR EXPORT_DIR [DEVICE]

`OwnerProcess` starts one and talks to it (tests, bench/gpu_check.py).
"""

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from hooks.export import export_parameters
from weight_mapping import fuse_state_dict

ROOT = Path(__file__).resolve().parents[2]


class OwnerProcess:
    """A stand-in owner in a child process: a real second process owning the weights.
    `zygote`: a tests.support.zygote.Zygote of this module, which forks the process instead
    of starting a new interpreter (seconds of imports less)."""

    def __init__(self, model_dir, export_dir, device: str = "cpu", log=None, zygote=None):
        if zygote is not None:
            assert log is None, "a zygote's children log where the zygote does"
            self.proc = zygote.spawn(str(model_dir), str(export_dir), device)
        else:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.support.standin_owner", str(model_dir),
                 str(export_dir), device], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=open(log, "w") if log else None, text=True, cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)})
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", f"owner failed to start: {line!r} (log: {log})"

    def tensor_sum(self, name: str) -> float:
        """The float64 sum of exported tensor `name`, as the owner sees it."""
        self.proc.stdin.write(f"sum {name}\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(60)


def main() -> None:
    model_dir, export_dir = sys.argv[1], sys.argv[2]
    device = sys.argv[3] if len(sys.argv) > 3 else "cpu"
    config = AutoConfig.from_pretrained(model_dir)
    tensors = fuse_state_dict(load_file(f"{model_dir}/model.safetensors"), config)
    tensors = {k: v.to(device).contiguous() for k, v in tensors.items()}
    export_parameters(tensors, export_dir, model_path=model_dir)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "sum":
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            print(repr(tensors[args[0]].double().sum().item()), flush=True)
        elif cmd == "quit":
            break


if __name__ == "__main__":
    with torch.no_grad():
        main()
