"""One trainer rank that joins the group (server.engine.distributed.join), does a barrier and
prints, as JSON, every address its process listens on (tests/test_tensor_parallel.py)."""

import json
import os

import psutil
import torch

from server.engine.distributed import join

if __name__ == "__main__":
    group = join(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                 int(os.environ["MASTER_PORT"]), torch.device("cpu"), timeout=60)
    group.barrier()
    listening = [c.laddr.ip for c in psutil.Process().net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    group.barrier()
    print(json.dumps({"listening": listening}), flush=True)
