"""Small optimizer problems shared by the optimizer tests: matrices of both orientations and a
vector, with fixed targets; parameter groups in the shape the server uses."""

import torch


def problem(seed: int = 0):
    """Matrices of both orientations (m > n, m < n) plus a vector, and a fixed quadratic."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(48, 16, generator=g), torch.randn(12, 40, generator=g),
              torch.randn(40, generator=g)]
    targets = [torch.randn(p.shape, generator=g) for p in params]
    return params, targets


def groups(params, apollo_key: bool, **hp):
    matrices, vectors = params[:2], params[2:]
    apollo_group = {"params": matrices, **hp}
    if not apollo_key:
        return [apollo_group, {"params": vectors}]
    return [apollo_group, {"params": vectors, "apollo": False}]
