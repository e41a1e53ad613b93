"""The step's collectives behind one small interface, so that the algorithm has no sharded
branches and this is the only module that knows DTensor. `Reductions` is the unsharded case,
where every reduction is the identity; `TensorParallel` makes a step on DTensor shards (one
per rank) equal to the unsharded step (tests/test_tensor_parallel.py; the collectives are
derived in docs/scaling.md). The optimizer picks one at construction (`reductions_for`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

from optimizer.maths import low_rank_shape, projection


@dataclass(frozen=True)
class MatrixShard:
    """This rank holds [start, stop) of the full tensor along `dim`."""

    dim: int
    start: int
    stop: int
    group: dist.ProcessGroup


class Reductions:
    """Parameters held whole by this rank: local tensors are the parameters, P and R have the
    matrix's shapes, and every reduction returns its input."""

    sharded = False

    def local(self, t: Tensor) -> Tensor:
        """The part of `t` (a parameter or its gradient) this rank holds and writes."""
        return t

    def shard(self, p: Tensor) -> MatrixShard | None:
        return None

    def low_rank_shape(self, p: Tensor, rank: int) -> tuple[int, int]:
        """The shape of this rank's R (and of its moments)."""
        return low_rank_shape(tuple(p.shape), rank)

    def projection(self, p: Tensor, rank: int, seed: int) -> Tensor:
        """The part of P, drawn from `seed`, that this rank's G multiplies."""
        return projection(tuple(p.shape), rank, seed, p.device)

    def sum_partials_(self, p: Tensor, low: Tensor) -> None:
        """Completes R in place where each rank's G P is a partial sum of it."""

    def grad_norms(self, params: list[Tensor], norms: list[Tensor]) -> list[Tensor]:
        """||G|| of each parameter (0-d, or per channel) from this rank's shards' norms."""
        return norms

    def low_norms(self, params: list[Tensor], norms: Tensor) -> Tensor:
        """Norms of R-sized tensors over the whole matrix: `norms` holds k entries per
        parameter of `params`, in order, repeated k times."""
        return norms


class TensorParallel(Reductions):
    """DTensor parameters, each Shard()-placed one sharded along one dim across one process
    group (a tensor-parallel mesh's). P is drawn whole on every rank and sliced. Sharded along
    the channels (the larger dim), R is sharded like G and per-tensor norms are all-reduced;
    sharded along the projected dim, each rank's G P is a partial sum of R, all-reduced, and
    per-channel norms of G are all-reduced. The step-valid flag comes from all-reduced norms,
    so every rank skips the same steps. Replicated parameters need nothing."""

    sharded = True

    def __init__(self, shards: dict[Tensor, MatrixShard]):
        self._shards = shards

    def local(self, t: Tensor) -> Tensor:
        return local(t)

    def shard(self, p: Tensor) -> MatrixShard | None:
        return self._shards.get(p)

    def low_rank_shape(self, p: Tensor, rank: int) -> tuple[int, int]:
        low = super().low_rank_shape(p, rank)
        shard = self.shard(p)
        if shard is None or splits_projection(tuple(p.shape), shard):
            return low
        out = list(low)
        out[shard.dim] = shard.stop - shard.start
        return out[0], out[1]

    def projection(self, p: Tensor, rank: int, seed: int) -> Tensor:
        proj, shard = super().projection(p, rank, seed), self.shard(p)
        if not splits_projection(tuple(p.shape), shard):
            return proj
        dim = 1 if p.shape[0] >= p.shape[1] else 0  # P's axis along the projected dim
        return proj.narrow(dim, shard.start, shard.stop - shard.start).contiguous()

    def sum_partials_(self, p: Tensor, low: Tensor) -> None:
        shard = self.shard(p)
        if splits_projection(tuple(p.shape), shard):
            dist.all_reduce(low, group=shard.group)

    def grad_norms(self, params: list[Tensor], norms: list[Tensor]) -> list[Tensor]:
        """One all-reduce for every per-tensor norm, one per channel-norm vector whose
        channels are split across ranks."""
        norms = list(norms)
        whole = [i for i, (p, n) in enumerate(zip(params, norms, strict=True))
                 if self.shard(p) is not None and n.dim() == 0]
        if whole:
            reduced = all_reduce_norms(torch.stack([norms[i] for i in whole]),
                                       self.shard(params[whole[0]]).group)
            for i, n in zip(whole, reduced.unbind(0), strict=True):
                norms[i] = n
        for i, (p, n) in enumerate(zip(params, norms, strict=True)):
            if n.dim() and splits_projection(tuple(p.shape), self.shard(p)):
                norms[i] = all_reduce_norms(n, self.shard(p).group)
        return norms

    def low_norms(self, params: list[Tensor], norms: Tensor) -> Tensor:
        """Only R sharded with G (along the channels) needs it: a replicated R (partial sums
        completed) has its whole norm on every rank."""
        sharded = [i for i, p in enumerate(params) if self.shard(p) is not None and
                   not splits_projection(tuple(p.shape), self.shard(p))]
        if not sharded:
            return norms
        index = torch.tensor([i + k * len(params) for k in range(len(norms) // len(params))
                              for i in sharded], device=norms.device)
        reduced = all_reduce_norms(norms[index], self.shard(params[sharded[0]]).group)
        return norms.index_copy(0, index, reduced)


UNSHARDED = Reductions()


def reductions_for(params: Iterable[Tensor]) -> Reductions:
    """TensorParallel if any parameter is a DTensor, else the identity."""
    params = list(params)
    if not any(isinstance(p, DTensor) for p in params):
        return UNSHARDED
    return TensorParallel({p: s for p in params if (s := shard_of(p)) is not None})


def local(t: Tensor) -> Tensor:
    """A DTensor's local shard (a view: writes reach the DTensor); other tensors as they are."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard_of(p: Tensor) -> MatrixShard | None:
    if not isinstance(p, DTensor) or not isinstance(p.placements[0], Shard):
        return None
    dim = p.placements[0].dim % p.dim()
    mesh = p.device_mesh
    size, start = Shard.local_shard_size_and_offset(p.shape[dim], mesh.size(),
                                                    mesh.get_local_rank())  # DTensor's rule
    return MatrixShard(dim, start, start + size, mesh.get_group())


def projected_dim(shape: tuple[int, ...]) -> int:
    """The dimension R's projection removes: the smaller one (columns when m >= n)."""
    return 1 if shape[0] >= shape[1] else 0


def splits_projection(shape: tuple[int, ...], shard: MatrixShard | None) -> bool:
    """True if each rank's projection is a partial sum of R (sharded along the projected dim)."""
    return shard is not None and shard.dim == projected_dim(shape)


def all_reduce_norms(norms: Tensor, group: dist.ProcessGroup) -> Tensor:
    """sqrt(sum over ranks of norms^2): the norm of the whole tensor from its shards' norms."""
    squares = norms.square()
    dist.all_reduce(squares, group=group)
    return squares.sqrt()
