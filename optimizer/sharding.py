"""APOLLO on tensor-parallel matrices (DTensor parameters, one shard per rank).

Each rank steps its own shard in place; these collectives make the result equal to the
unsharded step (tests/test_tensor_parallel.py):

* the projection P is drawn whole from the seed on every rank (same numbers everywhere);
* sharded along the larger dimension (the channels): R = G P is row- (column-) sharded like
  G, computed locally; per-channel scaling is local; a per-tensor norm (of G, R, M/sqrt(V),
  or the update) is the square root of an all-reduced sum of squares;
* sharded along the smaller dimension (the one projected away): each rank's G_i P_i is a
  partial sum of R, all-reduced; R, its moments and the scaling factors are then replicated,
  and per-channel norms of G are all-reduced sums of squares;
* the step-valid flag comes from those all-reduced norms, so every rank skips the same steps.

Replicated parameters (norms) have identical gradients on every rank and need nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard


@dataclass(frozen=True)
class MatrixShard:
    """This rank holds [start, stop) of the full tensor along `dim`."""

    dim: int
    start: int
    stop: int
    group: dist.ProcessGroup


def local(t: Tensor) -> Tensor:
    """A DTensor's local shard (a view: writes reach the DTensor); other tensors as they are."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard_of(p: Tensor) -> MatrixShard | None:
    if not isinstance(p, DTensor) or not isinstance(p.placements[0], Shard):
        return None
    dim = p.placements[0].dim % p.dim()
    mesh = p.device_mesh
    chunk = -(-p.shape[dim] // mesh.size())
    start = min(mesh.get_local_rank() * chunk, p.shape[dim])
    return MatrixShard(dim, start, min(start + chunk, p.shape[dim]), mesh.get_group())


def projected_dim(shape: tuple[int, ...]) -> int:
    """The dimension R's projection removes: the smaller one (columns when m >= n)."""
    return 1 if shape[0] >= shape[1] else 0


def splits_projection(shape: tuple[int, ...], shard: MatrixShard | None) -> bool:
    """True if each rank's projection is a partial sum of R (sharded along the projected dim)."""
    return shard is not None and shard.dim == projected_dim(shape)


def local_projection(proj: Tensor, shape: tuple[int, ...], shard: MatrixShard | None) -> Tensor:
    """The part of the full P this rank's G multiplies: P (r x n) or P (m x r) sliced along
    the sharded dimension when that is the projected one."""
    if not splits_projection(shape, shard):
        return proj
    dim = 1 if shape[0] >= shape[1] else 0  # P's axis that runs along the projected dim
    return proj.narrow(dim, shard.start, shard.stop - shard.start).contiguous()


def local_low_rank_shape(low: tuple[int, int], shard: MatrixShard | None,
                         shape: tuple[int, ...]) -> tuple[int, int]:
    """R's local shape: sharded with G when G is sharded along its channels."""
    if shard is None or splits_projection(shape, shard):
        return low
    out = list(low)
    out[shard.dim] = shard.stop - shard.start
    return out[0], out[1]


def all_reduce_norms(norms: Tensor, group: dist.ProcessGroup) -> Tensor:
    """sqrt(sum over ranks of norms^2): the norm of the whole tensor from its shards' norms."""
    squares = norms.square()
    dist.all_reduce(squares, group=group)
    return squares.sqrt()


def all_reduce_sum_(t: Tensor, group: dist.ProcessGroup) -> Tensor:
    dist.all_reduce(t, group=group)
    return t
