"""The crash tests fill every tensor with one value per state (tensor i holds 10 k + i in
state k), so a mix of two states is visible: the one value a tensor holds."""

import torch


def one_value(t: torch.Tensor, name: str) -> float:
    """The value every element of `t` holds; fails naming `name` when it holds a mix.
    (Compared with the first element: `unique()` sorts, seconds per check on a 100 MB model.)"""
    flat = t.detach().reshape(-1)
    assert bool((flat == flat[0]).all()), \
        f"{name} holds a mix of versions: {flat.unique()[:5].tolist()}"
    return flat[0].item()
