"""How the null-space guard applies its protected subspaces: per distinct input, x ↦ x
with the protected span removed, inside backward (`_ProjectedLinear`), from a projector kept
in whichever form is smaller and, on a GPU, in host memory unless asked otherwise.

On a GPU the projectors of a large model are GiBs (5.6 GiB for Llama-3-8B's MLP matrices in
fp16); kept beside the weights they are extra GPU memory for as long as the server runs, so
by default they stay in pinned host memory and each layer's is copied in one layer ahead of
backward (bench/RESULTS.md "GPU check": no GPU memory between steps, ~+40-65 ms a step at 8B).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F


def orth(m: torch.Tensor, tol: float = 1e-3) -> torch.Tensor:
    """An orthonormal basis of the span of m's columns (d x k, k small), directions along
    which they reach less than `tol` dropped. From the k x k Gram matrix in fp64: an SVD of
    m fails to converge when its singular values are all 0 or 1, as a projected basis's are."""
    if m.shape[1] == 0:
        return m.float()
    m64 = m.double()
    values, vectors = torch.linalg.eigh(m64.T @ m64)
    keep = values > tol * tol
    u = (m64 @ vectors[:, keep]) / values[keep].sqrt()
    return torch.linalg.qr(u)[0].float().contiguous()


def complement_of(m: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of what m's (orthonormal) columns do not span (d x (d − k))."""
    return torch.linalg.qr(m.float(), mode="complete")[0][:, m.shape[1]:].contiguous()


class Projector:
    """x ↦ x − B Bᵀ x for one distinct input: its protected span B (d x r) removed.

    Held as whichever of B or its orthogonal complement C (d x (d − r)) is narrower, since
    x − B Bᵀ x = C Cᵀ x: the default model protects 70% of its input directions, so C is
    less to hold, copy and multiply. On a GPU it is kept in pinned host memory unless asked
    for on the device (`place`), and copied in by `Staging` when backward needs it.
    """

    def __init__(self, held: torch.Tensor, complement: bool):
        """`held`: orthonormal columns (d x k), C if `complement`, else B."""
        self.dim, self.complement = held.shape[0], complement
        self.rank = self.dim - held.shape[1] if complement else held.shape[1]
        self.held = held.float().contiguous()
        self.before: Projector | None = None  # the projector backward is expected to need next
        self.staging: Staging | None = None
        self.pinned: dict[str, torch.Tensor] = {}  # pinned probe -> its directions (d x k, ⊥ S)
        self._home: torch.Tensor | None = None  # the weight it was placed beside

    @classmethod
    def of_vectors(cls, vectors: torch.Tensor, r: int) -> Projector:
        """`vectors`: an orthonormal basis of the whole input space (d x d) whose first `r`
        columns span the protected subspace; the narrower part is held."""
        complement = r > vectors.shape[0] - r
        return cls(vectors[:, r:] if complement else vectors[:, :r], complement)

    @classmethod
    def of_basis(cls, basis: torch.Tensor) -> Projector:
        """From B alone (d x r, orthonormal up to fp16 rounding): a complete QR gives the whole
        space with B's span first, orthonormal to fp32 precision (a basis kept in fp16 is
        orthonormal to ~1e-3 only, and I − B Bᵀ then let ~0.1% of an update into its span)."""
        return cls.of_vectors(torch.linalg.qr(basis.float(), mode="complete")[0],
                              basis.shape[1])

    @classmethod
    def of_held(cls, held: torch.Tensor, complement: bool) -> Projector:
        """From what a projector held, kept in fp16 on disk: a reduced QR makes it orthonormal
        to fp32 precision again (no complete QR: it is held in the form it was saved in)."""
        return cls(torch.linalg.qr(held.float())[0], complement)

    def protected(self) -> torch.Tensor:
        """B: an orthonormal basis of the protected span (d x r, fp32)."""
        return complement_of(self.held) if self.complement else self.held.float()

    def place(self, weight: torch.Tensor, staging: Staging | None) -> None:
        """Keep the held vectors beside `weight`, or with `staging` (a CUDA weight) in pinned
        host memory, from where each backward copies them in. A 16-bit weight on a GPU gets
        the complement in fp16: half the memory and copying, and tensor-core products (the
        guard's cost on 8B shapes fell from ~+160 to ~+20-45 ms a step). Its gradient is rounded
        to 16 bits anyway, and C Cᵀ u of unit rows u errs by fp16's 5e-4 relative to what it
        keeps, where x − B Bᵀ x would err relative to all of x."""
        self._home = weight
        low = weight.device.type == "cuda" and weight.dtype in (torch.bfloat16, torch.float16)
        if low and self.held.dtype != torch.float16:
            if not self.complement:
                self.held = self.protected_complement()
                self.complement = True
            self.held = self.held.half()
        if staging is not None and weight.device.type == "cuda":
            if not self.held.is_pinned():
                self.held = self.held.to("cpu").pin_memory()
            self.staging = staging
        else:
            self.held = self.held.to(weight.device)
            self.staging = None

    def protected_complement(self) -> torch.Tensor:
        """C: an orthonormal basis of what is not protected (d x (d − r), fp32)."""
        return self.held.float() if self.complement else complement_of(self.held)

    def release(self, probe: str) -> None:
        """Stop protecting the directions only `probe` was pinned by (they lie outside S and
        outside the other pins' span, so S and the other pins stay protected exactly)."""
        own = self.pinned.pop(probe, None)
        if own is None:
            return
        rest = orth(torch.cat(list(self.pinned.values()), 1)) if self.pinned else None
        if rest is not None:
            own = own - rest @ (rest.T @ own)
        own = orth(own)
        if own.shape[1] == 0:
            return
        held = self.held.to("cpu", torch.float32)
        if self.complement:  # C grows by them
            held = torch.linalg.qr(torch.cat([held, own], 1))[0]
        else:  # B loses them
            held = orth(held - own @ (own.T @ held), tol=0.5)
        self.rank -= own.shape[1]
        self.held = held.contiguous()
        if self.staging is not None:
            self.staging.on.pop(id(self), None)
        if self._home is not None:
            self.place(self._home, self.staging)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (N x d, fp32) with its protected component removed."""
        held = self.held if self.staging is None else self.staging.fetch(self, x.device)
        if held.dtype == torch.float16:  # unit rows: fp16 keeps them at full relative precision
            norm = x.norm(dim=1, keepdim=True)
            u = (x / norm.clamp_min(1e-30)).half()
            return ((u @ held) @ held.T).float() * norm
        if self.complement:
            return (x @ held) @ held.T
        return x - (x @ held) @ held.T


class Staging:
    """Copies host-kept projectors to the GPU one layer ahead of backward: the projector a
    layer's backward needs was sent while the layer after it ran its backward, on a side
    stream. At most two layers' projectors are on the device at a time (the one in use and
    the next); a projector not sent ahead (backward in another order) is copied when needed."""

    def __init__(self):
        self.stream: torch.cuda.Stream | None = None
        self.on: OrderedDict[int, tuple[torch.Tensor, torch.cuda.Event | None]] = OrderedDict()

    def fetch(self, p: Projector, device: torch.device) -> torch.Tensor:
        current = torch.cuda.current_stream(device)
        held, ready = self.on.pop(id(p), (None, None))
        if held is None:
            held = p.held.to(device, non_blocking=True)
        elif ready is not None:  # sent ahead on the side stream
            current.wait_event(ready)
            held.record_stream(current)
        self.on[id(p)] = (held, None)
        if p.before is not None and id(p.before) not in self.on:
            if self.stream is None:
                self.stream = torch.cuda.Stream(device)
            with torch.cuda.stream(self.stream):
                ahead = p.before.held.to(device, non_blocking=True)
                sent = torch.cuda.Event()
                sent.record(self.stream)
            self.on[id(p.before)] = (ahead, sent)
        while len(self.on) > 2:
            self.on.popitem(last=False)
        if p.before is None:  # backward's last layer: nothing stays on the device after it
            self.on.clear()
        return held


class _ProjectedLinear(torch.autograd.Function):
    """F.linear whose weight gradient sees the input with its protected component removed."""

    @staticmethod
    def forward(ctx, x, weight, bias, projector):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.projector = projector
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = dy @ weight if ctx.needs_input_grad[0] else None
        dw = db = None
        if ctx.needs_input_grad[1]:
            flat_x = ctx.projector(x.reshape(-1, x.shape[-1]).float())
            dw = dy.reshape(-1, dy.shape[-1]).T @ flat_x.to(dy.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.reshape(-1, dy.shape[-1]).sum(0)
        return dx, dw, db, None


def projected_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled() or not self.weight.requires_grad:
        return F.linear(x, self.weight, self.bias)
    return _ProjectedLinear.apply(x, self.weight, self.bias, self.null_guard)
