"""A stand-in for vLLM's worker: holds a model's weights in vLLM's fused layout and exports
them through hooks.export, as the real hook does. Reads commands on stdin:
``sum NAME`` prints the float64 sum of that tensor; ``quit`` exits."""

import sys

import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from hooks.export import export_parameters
from weight_mapping import fuse_state_dict


def main() -> None:
    model_dir, export_dir = sys.argv[1], sys.argv[2]
    config = AutoConfig.from_pretrained(model_dir)
    tensors = fuse_state_dict(load_file(f"{model_dir}/model.safetensors"), config)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    export_parameters(tensors, export_dir, model_path=model_dir)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "sum":
            print(repr(tensors[args[0]].double().sum().item()), flush=True)
        elif cmd == "quit":
            break


if __name__ == "__main__":
    with torch.no_grad():
        main()
