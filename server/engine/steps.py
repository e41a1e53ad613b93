"""One batch's optimizer steps on the live weights, and the one lock that guards them.

Forward and backward run without any lock; only the optimizer's write, the part that changes
vLLM's tensors, runs inside `coordinator.write()`, which excludes vLLM's engine steps. A
non-finite loss or gradient ends the batch with nothing written (standard mode).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol

import torch
from torch import nn

from server.engine.coordination import Standalone
from server.engine.loss import causal_lm_loss, collate
from server.engine.records import TrainerStats
from server.engine.tokenization import Encoded

log = logging.getLogger("vllm_apollo.trainer")
# Fault injection for tests of the NaN guarantees against live weights: "nan-loss" or
# "nan-grad" makes every step's loss or first gradient non-finite. Never set it in production.
FAULT = os.environ.get("VLLM_APOLLO_FAULT_INJECT", "")


class LiveOptimizer(Protocol):
    """What the trainer needs of an optimizer (optimizer.Apollo provides it): the step split
    into `prepare` (reads gradients; returns the device flag "every gradient finite", or None
    when nothing has a gradient) and `apply` (the in-place write), skip counters, and
    layer-wise stepping during backward."""

    param_groups: list[dict]

    def prepare(self) -> torch.Tensor | None: ...
    def apply(self) -> None: ...
    def zero_grad(self, set_to_none: bool = True) -> None: ...
    def layerwise(self, write_guard: Callable) -> list: ...
    @property
    def skipped_steps(self) -> int: ...
    @property
    def skipped_params(self) -> int: ...


class Stepper:
    """Runs the steps of a batch; counts them in `stats`; remembers which parameters it
    stepped (the checkpoint service writes only those)."""

    def __init__(self, model: nn.Module, optimizer: LiveOptimizer, *, pad_id: int,
                 coordinator: Standalone, layerwise: bool, stats: TrainerStats):
        self.model, self.optimizer, self.pad_id = model, optimizer, pad_id
        self.coordinator, self.layerwise, self.stats = coordinator, layerwise, stats
        self.device = next(model.parameters()).device
        # Held while weights change (optimizer step) and while a checkpoint reads them, so a
        # checkpoint is a snapshot between two steps.
        self.weights_lock = threading.Lock()
        self.stepped: set[int] = set()  # id() of parameters stepped since the last checkpoint
        self._write_seconds = 0.0
        if layerwise:  # the optimizer steps each parameter during backward
            optimizer.layerwise(write_guard=self._param_write)

    @contextlib.contextmanager
    def _param_write(self) -> Iterator[None]:
        # weights_lock is held around the whole backward (_backward_layerwise)
        with self.coordinator.write():
            t0 = time.perf_counter()
            yield
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._write_seconds += time.perf_counter() - t0

    def run(self, batch: list[Encoded], steps: int) -> str | None:
        """`steps` optimizer steps on `batch`; None, or why the batch failed."""
        ids, labels, mask = collate(batch, self.pad_id, self.device)
        for k in range(steps):
            t0 = time.perf_counter()
            loss = causal_lm_loss(self.model, ids, labels, mask)
            if FAULT == "nan-loss":
                loss = loss * float("nan")
            value = float(loss.detach())
            if not math.isfinite(value):
                return f"non-finite loss ({value}); no weight was changed"
            if self.layerwise:
                applied = self._backward_layerwise(loss)
            else:
                loss.backward()
                if FAULT == "nan-grad":
                    next(p for p in self.model.parameters() if p.grad is not None).grad[0] = \
                        float("nan")
                applied = self._apply()
            self.optimizer.zero_grad(set_to_none=True)
            if not applied:
                return "non-finite gradient; " + (
                    "the parameters with finite gradients were updated (layer-wise mode)"
                    if self.layerwise else "no weight was changed")
            self.stats.optimizer_steps += 1
            self.stats.last_loss = value
            self.stats.last_step_seconds = time.perf_counter() - t0
            self.stats.train_seconds += self.stats.last_step_seconds
            log.info("step %d loss %.4f (%d examples, step %d/%d of batch, %.2fs, write "
                     "%.1f ms)", self.stats.optimizer_steps, value, len(batch), k + 1, steps,
                     self.stats.last_step_seconds, 1e3 * self.stats.last_write_seconds)
        self.stats.trained_tokens += sum(e.num_targets for e in batch)
        return None

    def _apply(self) -> bool:
        """The in-place write is the only part that excludes vLLM's engine steps: prepare()
        computes everything else before taking the lock. False if the step was skipped
        (non-finite gradient: nothing was written)."""
        ok = self.optimizer.prepare()  # a device flag: reading it keeps a bad step off the lock
        if ok is None or not bool(ok):
            return False
        with self.weights_lock, self.coordinator.write():
            t0 = time.perf_counter()
            self.optimizer.apply()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.coordinator.step_applied()
            self.stepped.update(id(p) for g in self.optimizer.param_groups
                                for p in g["params"] if p.grad is not None)
            self.stats.last_write_seconds = time.perf_counter() - t0
        self.stats.stall_seconds += self.stats.last_write_seconds
        return True

    def _backward_layerwise(self, loss: torch.Tensor) -> bool:
        """Backward with the optimizer's per-parameter hooks: weights change during it, each
        parameter's write atomic for vLLM, the step as a whole not."""
        skipped = self.optimizer.skipped_params
        self._write_seconds = 0.0
        with self.weights_lock:  # a checkpoint sees all of the step's writes or none
            loss.backward()
            self.coordinator.step_applied()
            self.stepped.update(id(p) for p in self.model.parameters() if p.requires_grad)
        self.stats.last_write_seconds = self._write_seconds
        self.stats.stall_seconds += self._write_seconds
        return self.optimizer.skipped_params == skipped
