"""Child of tests/test_checkpoint.py's crash test: syncs state k = 1, 2, ... into MODEL_DIR,
printing "begin k" before and "done k" after each sync, until killed. A second argument
"history" keeps the history store (the last two versions and the original).

State k: tensor i is filled with 10 * k + i, so any mix of two states is visible."""

import sys

import torch
from safetensors.torch import load_file

from checkpoint import Checkpointer, Retention


def main() -> None:
    model_dir = sys.argv[1]
    live = load_file(f"{model_dir}/model.safetensors")
    k = int(live["t0"][0].item()) // 10
    history = Retention(keep=2) if sys.argv[2:] == ["history"] else None
    ck = Checkpointer(model_dir, live, history=history)
    print("ready", flush=True)
    while True:
        k += 1
        for i in range(len(live)):
            live[f"t{i}"].fill_(10.0 * k + i)
        print(f"begin {k}", flush=True)
        ck.sync()
        print(f"done {k}", flush=True)


if __name__ == "__main__":
    with torch.no_grad():
        main()
