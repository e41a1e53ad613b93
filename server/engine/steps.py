"""One batch on the live weights: learn, then stop; measure drift; undo what is over budget.

Forward and backward run without any lock; only the optimizer's write, the part that changes
vLLM's tensors, runs inside `coordinator.write()`, which excludes vLLM's engine steps (with
--strict-drift the window spans the whole batch and its drift measurement). Before each step
the batch's own forward pass says whether its targets are already learned; if so it stops. A
non-finite loss or gradient ends the batch with nothing written (standard mode).

The work runs in chunks (forward; backward with the step; the drift probes), and before each
one the `Pacer` may wait while vLLM is serving (--train-share, server/engine/pacing.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import nn

from server.engine.coordination import Standalone
from server.engine.drift import Drift
from server.engine.locality import Monitor, PreImage
from server.engine.objective import Objective, Weights
from server.engine.pacing import LoadMeter, Pacer
from server.engine.records import TrainerStats
from server.engine.tokenization import Encoded
from server.settings import Settings

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


@dataclass
class Outcome:
    """How a batch ended: `failed` says why it changed nothing (or, in layer-wise mode, what
    it left); otherwise `note` says how it was trained."""

    steps: int = 0
    failed: str | None = None
    note: str | None = None
    drift: Drift | None = None
    loss: float | None = None  # the batch's loss when it ended (its last forward pass)


class Stepper:
    """Runs a batch; counts its steps in `stats`; remembers which parameters it stepped (the
    checkpoint service writes only those)."""

    def __init__(self, model: nn.Module, optimizer: LiveOptimizer, settings: Settings, *,
                 pad_id: int, coordinator: Standalone, stats: TrainerStats,
                 monitor: Monitor | None = None):
        self.model, self.optimizer, self.pad_id = model, optimizer, pad_id
        self.coordinator, self.stats, self.monitor = coordinator, stats, monitor
        self.layerwise = settings.optimizer_mode == "layerwise"
        self.learned_prob = settings.learned_prob
        self.weights = Weights.of(settings)
        self.budget = settings.drift_budget
        self.probes_per_batch = settings.drift_probes
        self.strict = settings.strict_drift
        self.guard = settings.guard
        self.guard_probes, self.guard_weight = settings.guard_probes, settings.guard_weight
        self.device = next(model.parameters()).device
        cpu = self.device.type == "cpu"
        self.pacer = Pacer(LoadMeter(coordinator.serving_load), settings.train_share,
                           settings.train_max_wait,
                           busy_threads=settings.train_threads_busy if cpu else 0,
                           share_above=settings.train_share_above
                           if settings.train_share_above >= 0 else int(cpu))
        # Held while weights change (optimizer step) and while a checkpoint reads them, so a
        # checkpoint is a snapshot between two steps.
        self.weights_lock = threading.Lock()
        self.stepped: set[int] = set()  # id() of parameters stepped since the last checkpoint
        self._write_seconds = 0.0
        self._held = 0  # depth of the write window (strict mode holds it for a whole batch)
        # Set by the trainer per batch: true once the batch must stop at the next step
        # boundary (its fine-tuning job was cancelled); the steps applied stay.
        self.interrupt: Callable[[], bool] | None = None
        if self.layerwise:  # the optimizer steps each parameter during backward
            optimizer.layerwise(write_guard=self._param_window)

    @property
    def measure(self) -> bool:
        return self.monitor is not None and self.probes_per_batch > 0

    @contextlib.contextmanager
    def _window(self) -> Iterator[None]:
        """The write window: the weights lock and vLLM's exclusion; re-entrant."""
        if self._held:
            self._held += 1
            try:
                yield
            finally:
                self._held -= 1
            return
        with self.weights_lock, self.coordinator.write():
            self._held = 1
            t0 = time.perf_counter()
            try:
                yield
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
            finally:
                self._held = 0
                self._write_seconds += time.perf_counter() - t0

    @contextlib.contextmanager
    def _param_window(self) -> Iterator[None]:
        """Layer-wise mode: one parameter's write. The weights lock is already held around
        the whole backward (a checkpoint sees all of a step or none of it)."""
        if self._held:
            yield
            return
        t0 = time.perf_counter()
        with self.coordinator.write():
            yield
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        self._write_seconds += time.perf_counter() - t0

    def run(self, batch: list[Encoded], max_steps: int, beta: float | None = None) -> Outcome:
        """Up to `max_steps` optimizer steps on `batch`, fewer once it is learned; then the
        drift gate. `beta`: the preference loss's β for this batch (a DPO job's), else
        --beta."""
        if self.monitor is not None:  # no batch changes weights before the reference exists
            self.monitor.ensure_reference(self.model, self.pacer.chunk)
            self.monitor.ensure_guard(self.model, self.pacer.chunk)
            self.monitor.release([e.prompt_ids for e in batch])
        gated = self.budget > 0 and self.measure
        window: list[int] = []
        since, preimage = None, None

        def before_first_step() -> None:  # a batch that takes no step costs none of this
            nonlocal window, since, preimage
            if not self.measure:
                return
            window = self.monitor.window([e.prompt_ids for e in batch])
            if gated:  # the gate judges what this batch adds, not the drift before it
                preimage = PreImage(self.model, self.optimizer)
                with self.pacer.chunk(wait=not self._held):
                    since = self.monitor.snapshot(self.model, window)

        with self._window() if self.strict and gated else contextlib.nullcontext():
            outcome = self._steps(batch, max_steps, beta, before_first_step)
            if outcome.failed or outcome.steps == 0 or not self.measure:
                return outcome
            with self.pacer.chunk(wait=not self._held):
                outcome.drift = self.monitor.measure(self.model, window, since)
            if gated and not outcome.drift.batch_kl <= self.budget:
                with self._window():
                    preimage.restore()
                    self.coordinator.weights_restored()
                self.stats.undone_batches += 1
                outcome.failed = (f"drift {outcome.drift.batch_kl:.4f} nats per probe token "
                                  f"(this batch's, over {outcome.drift.probes} probes) exceeds "
                                  f"the budget {self.budget} (--drift-budget); the batch was "
                                  "undone, every weight is as before it")
        return outcome

    def _steps(self, batch: list[Encoded], max_steps: int, beta: float | None,
               before_first_step: Callable[[], None]) -> Outcome:
        weights = self.weights if beta is None else replace(self.weights, beta=beta)
        objective = Objective(batch, self.pad_id, self.device, weights)
        steps = restored = 0
        while True:
            if self.interrupt is not None and self.interrupt():
                if steps:
                    self.stats.trained_tokens += sum(e.num_targets for e in batch)
                return Outcome(steps, note=f"stopped after {steps} steps: cancelled")
            t0, waited0 = time.perf_counter(), self.pacer.stats.waited_seconds
            with self.pacer.chunk(wait=not self._held):
                loss, done = objective(self.model)
            if FAULT == "nan-loss":
                loss = loss * float("nan")
            value = float(loss.detach())
            if not math.isfinite(value):
                return Outcome(steps, failed=f"non-finite loss ({value}); "
                                             + self._changed(steps))
            restoring, keep_loss = [], None  # the kept answers this batch moved: checked
            if steps and (done or steps == max_steps or restored) \
                    and self.monitor is not None:  # once learned, then after every step
                with self.pacer.chunk(wait=not self._held):
                    restoring, keep_loss = self.monitor.unkept(self.model)
            if self.learned_prob < 1 and done and not restoring:
                note = f"learned in {steps} steps" if steps else \
                    "already answered as taught: no optimizer step" if objective.demos_only \
                    else "already learned: no optimizer step"
                break
            if steps == max_steps:
                left = ["not fully learned"] if not done or self.learned_prob >= 1 else []
                if restoring:
                    left.append(f"{len(restoring)} kept answer(s) not restored")
                note = f"{', '.join(left)} in {steps} steps (--max-steps-per-batch)"
                break
            if not steps:
                before_first_step()
            with self.pacer.chunk(wait=not self._held):
                if keep_loss is not None:  # the kept answers it moved, beside its targets
                    loss, restored = loss + keep_loss, restored + 1
                if self.guard == "distill" and self.monitor is not None:
                    loss = loss + self.guard_weight * self.monitor.guard_loss(
                        self.model, self.guard_probes)
                applied = self._backward_and_step(loss)
            self.optimizer.zero_grad(set_to_none=True)
            if not applied:
                return Outcome(steps, failed="non-finite gradient; " + (
                    "the parameters with finite gradients were updated (layer-wise mode)"
                    if self.layerwise else self._changed(steps)))
            steps += 1
            self.pacer.step_done()
            self.stats.optimizer_steps += 1
            self.stats.last_loss = value
            # the step's own time: what it waited for serving is not part of it
            self.stats.last_step_seconds = time.perf_counter() - t0 - (
                self.pacer.stats.waited_seconds - waited0)
            self.stats.train_seconds += self.stats.last_step_seconds
            log.info("step %d loss %.4f (%d examples, step %d of at most %d, %.2fs, write "
                     "%.1f ms)", self.stats.optimizer_steps, value, len(batch), steps,
                     max_steps, self.stats.last_step_seconds,
                     1e3 * self.stats.last_write_seconds)
        self.stats.last_loss = value
        if steps:
            self.stats.trained_tokens += sum(e.num_targets for e in batch)
        if restored:
            note = f"{note}, {restored} of them restoring kept answers"
        if how := objective.describe():
            note = f"{note} ({how})"
        return Outcome(steps, note=note, loss=value)

    @staticmethod
    def _changed(steps: int) -> str:
        return "no weight was changed" if not steps else \
            f"the batch's {steps} earlier steps stay applied"

    def _backward_and_step(self, loss: torch.Tensor) -> bool:
        self._write_seconds = 0.0
        if self.layerwise:  # the optimizer's hooks step each parameter during backward
            skipped = self.optimizer.skipped_params
            with self.weights_lock if not self._held else contextlib.nullcontext():
                loss.backward()  # a checkpoint sees all of the step's writes or none
                self.coordinator.step_applied()
                self.stepped.update(id(p) for p in self.model.parameters() if p.requires_grad)
            applied = self.optimizer.skipped_params == skipped
        else:
            loss.backward()
            if FAULT == "nan-grad":
                next(p for p in self.model.parameters() if p.grad is not None).grad[0] = \
                    float("nan")
            applied = self._apply()
        self.stats.last_write_seconds = self._write_seconds
        self.stats.stall_seconds += self._write_seconds
        return applied

    def _apply(self) -> bool:
        """The in-place write is the only part that excludes vLLM's engine steps: prepare()
        computes everything else before taking the lock. False if the step was skipped
        (non-finite gradient: nothing was written)."""
        ok = self.optimizer.prepare()  # a device flag: reading it keeps a bad step off the lock
        if ok is None or not bool(ok):
            return False
        with self._window():
            self.optimizer.apply()
            self.coordinator.step_applied()
            self.stepped.update(id(p) for g in self.optimizer.param_groups
                                for p in g["params"] if p.grad is not None)
        return True
