"""Tensor parallelism in the training server: one trainer rank per vLLM rank.

Rank 0 is the server process: it serves HTTP, logs examples and leads. When vLLM's export
says world_size N > 1 it starts ranks 1..N-1 (spawned processes) and all N join a
torch.distributed group (NCCL on GPU, gloo on CPU) on loopback. Rank 0's trainer thread is the
only one that issues commands, over a gloo group of their own, so every rank runs the same
collectives in the same order:

* ("train", examples, steps, lr_scale, beta): every rank runs the same forward / backward /
  optimizer steps on its own shards (the DTensor model's and optimizer's collectives keep
  them equal);
* ("checkpoint", names): every rank sends its shards of `names`, one tensor at a time, to rank
  0, which writes the files (so peak extra memory is one full tensor plus changed chunks);
* ("stop",).

Ranks 1..N-1 run `follow`. The write of each step happens inside one consistency window for
all ranks: rank 0 takes vLLM's step lock (the one lock every vLLM rank's step depends on,
hooks/vllm_worker.py), then all ranks write between two barriers (engine/coordination.py).

Everything listens on loopback only: torch's TCPStore binds all interfaces whatever host it
is given, so rank 0 hands it a socket bound to 127.0.0.1; gloo and NCCL pick their
interfaces by name (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME, "lo" unless set). Commands are
pickles between these ranks (dist.broadcast_object_list): whoever could join the group could
run code in the trainer, and only local processes can reach it (docs/service.md).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard

log = logging.getLogger("vllm_apollo.distributed")
IDLE_TIMEOUT = timedelta(days=365)  # followers wait for commands as long as the server lives


@dataclass
class Group:
    """This process's place in the trainer's process group."""

    rank: int
    world: int
    mesh: DeviceMesh
    commands: dist.ProcessGroup  # gloo, rank 0 -> all

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def broadcast(self, command: tuple | None = None) -> tuple:
        """Rank 0 sends `command`; every rank returns it."""
        box = [command]
        dist.broadcast_object_list(box, src=0, group=self.commands)
        return box[0]

    def barrier(self) -> None:
        dist.barrier(group=self.commands)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(rank: int, world: int, port: int, device: torch.device,
         timeout: float = 600.0) -> Group:
    """Join the trainer's group; fails after `timeout` s if a rank never comes (e.g. it could
    not attach to its vLLM rank), rather than waiting forever."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):  # the loopback interface
        os.environ.setdefault(name, "lo")
    wait = timedelta(seconds=timeout)
    if rank == 0:
        listener = socket.create_server(("127.0.0.1", port)).detach()  # the store's now
        store = dist.TCPStore("127.0.0.1", port, world, is_master=True, timeout=wait,
                              wait_for_workers=False, master_listen_fd=listener)
    else:
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=wait)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=wait)
    mesh = init_device_mesh(device.type, (world,))
    commands = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    return Group(rank, world, mesh, commands)


def start_followers(target, settings, world: int, port: int) -> list:
    """Spawn ranks 1..world-1 running `target(settings, rank, port)`; they die with us."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=(settings, rank, port), daemon=True,
                         name=f"trainer-rank{rank}") for rank in range(1, world)]
    for p in procs:
        p.start()
    return procs


def gather_to_leader(t: Tensor, group: Group) -> Tensor | None:
    """The full tensor on rank 0 (None elsewhere) from each rank's Shard(d) piece; a
    replicated tensor as it is. Every rank must call it for the same tensors in order."""
    if not isinstance(t, DTensor) or not isinstance(t.placements[0], Shard):
        return t.to_local() if isinstance(t, DTensor) else t
    d = t.placements[0].dim % t.dim()
    piece = t.to_local().detach()
    chunk, _ = Shard.local_shard_size_and_offset(t.shape[d], group.world, 0)  # the longest
    if piece.shape[d] < chunk:  # the last rank's piece may be short
        pad = list(piece.shape)
        pad[d] = chunk - piece.shape[d]
        piece = torch.cat([piece, piece.new_zeros(pad)], d)
    piece = piece.contiguous()
    pieces = [torch.empty_like(piece) for _ in range(group.world)] if group.leader else None
    dist.gather(piece, pieces, dst=0, group=group.mesh.get_group())
    return torch.cat(pieces, d).narrow(d, 0, t.shape[d]) if group.leader else None


def follow(group: Group, trainer, params: dict[str, Tensor]) -> None:
    """A follower rank's life: do what rank 0 broadcasts until it says "stop"."""
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
