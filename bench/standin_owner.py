"""A stand-in for vLLM's worker where no vLLM runs (tests, bench/gpu_check.sh): holds a
model's weights in vLLM's fused layout on DEVICE and exports them through hooks.export, as
the real hook does. Reads commands on stdin: ``sum NAME`` prints the float64 sum of that
tensor as this process sees it; ``quit`` exits.

    python -m bench.standin_owner MODEL_DIR EXPORT_DIR [DEVICE]
"""

import sys

import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from hooks.export import export_parameters
from weight_mapping import fuse_state_dict


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
