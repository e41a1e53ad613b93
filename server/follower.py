"""Trainer ranks 1..N-1 under tensor parallelism: attach to vLLM's rank r, then do what rank 0
says (server/distributed.py). They serve no HTTP and keep no journal; rank 0 does both."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from server.config import Settings
from server.distributed import gather_to_leader
from server.runtime import load_runtime
from server.trainer import Trainer

log = logging.getLogger("vllm_apollo.follower")


def exit_with_parent(parent: int) -> None:
    """Rank 0 gone without a "stop" (a crash, kill -9): this rank has nothing left to do."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def follower_main(settings: Settings, rank: int, port: int) -> None:
    # The launcher TERMs the training server's whole process group at once; rank 0 then
    # still needs this rank for a final checkpoint (--checkpoint-on-exit) and says "stop".
    # Rank 0's end, however it comes, ends this rank.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=exit_with_parent, args=(os.getppid(),), daemon=True).start()
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    runtime = load_runtime(settings, rank=rank, port=port)
    group = runtime.group
    trainer = Trainer(runtime.model, runtime.optimizer, pad_id=runtime.pad_id,
                      live=runtime.live, group=group)
    params = dict(runtime.model.named_parameters(remove_duplicate=False))
    while True:
        command = group.broadcast()
        if command[0] == "train":
            trainer.train_batch(*command[1:])
        elif command[0] == "checkpoint":
            for name in command[1]:
                gather_to_leader(params[name], group)
        elif command[0] == "stop":
            log.info("stopping")
            return
