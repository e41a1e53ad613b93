"""Background training worker: batches queued examples and steps the live model in place."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from torch import nn

from server.distributed import Group
from server.journal import Journal
from server.live import LocalWeights
from server.tokenization import IGNORE_INDEX, Encoded

log = logging.getLogger("vllm_apollo.trainer")
# Fault injection for tests of the NaN guarantees against live weights: "nan-loss" or
# "nan-grad" makes every step's loss or first gradient non-finite. Never set it in production.
FAULT = os.environ.get("VLLM_APOLLO_FAULT_INJECT", "")


@dataclass
class Record:
    id: str
    encoded: Encoded | None  # dropped once the example is finished
    state: str = "queued"
    step: int | None = None
    reason: str | None = None


@dataclass
class TrainerStats:
    optimizer_steps: int = 0
    last_loss: float | None = None
    accepted: int = 0
    trained: int = 0
    failed: int = 0
    trained_tokens: int = 0
    train_seconds: float = 0.0
    last_step_seconds: float | None = None
    last_write_seconds: float | None = None
    stall_seconds: float = 0.0  # total time vLLM's engine steps were excluded by writes
    started: float = field(default_factory=time.monotonic)


class QueueFull(RuntimeError):
    def __init__(self, queued: int, limit: int):
        super().__init__(f"training queue is full ({queued} of {limit} queued); retry later")


def collate(batch: list[Encoded], pad_id: int, device: torch.device):
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return ids.to(device), labels.to(device), mask.to(device)


def causal_lm_loss(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over target tokens (labels shifted by one, as in HF models)."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    return nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


class Trainer:
    """Owns the queue and the one thread that runs forward, backward and optimizer steps.

    Forward and backward run without any lock; only optimizer.step() — the in-place write —
    runs inside `live.write()`, which excludes vLLM's engine steps.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, pad_id: int,
                 batch_size: int = 8, steps_per_batch: int = 1, max_queue: int = 1024,
                 journal: Journal | None = None, live: LocalWeights | None = None,
                 layerwise: bool = False, group: Group | None = None):
        self.model = model
        self.optimizer = optimizer
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.steps_per_batch = steps_per_batch
        self.max_queue = max_queue
        self.journal = journal
        self.live = live or LocalWeights()
        self.device = next(model.parameters()).device
        self.stats = TrainerStats()
        self.records: dict[str, Record] = {}
        self._queue: deque[Record] = deque()
        self._resume: tuple[list[Record], int] | None = None  # batch cut short by a crash
        self._cond = threading.Condition()
        self._stop = False
        self._last: Callable | None = None  # run by the worker when it stops
        self._in_flight = 0  # examples taken from the queue, not yet finished
        self._thread = threading.Thread(target=self._run, name="trainer", daemon=True)
        # Held while weights change (optimizer step) and while a checkpoint reads them, so a
        # checkpoint is a snapshot between two steps.
        self.weights_lock = threading.Lock()
        self.after_batch: list = []  # callables run by the worker thread after each batch
        self.stepped: set[int] = set()  # id() of parameters stepped since the last checkpoint
        self.layerwise = layerwise
        # Tensor parallelism: rank 0's worker thread sends each batch (and every other
        # collective work, see run_in_worker) to the other ranks first (server/distributed.py)
        self.group = group
        self._tasks: deque[tuple[Callable, Future]] = deque()
        if layerwise:  # the optimizer steps each parameter during backward, lock per write
            self._hooks = optimizer.layerwise(write_guard=self._param_write)
        if journal is not None:
            self._restore(journal)

    @contextlib.contextmanager
    def _param_write(self):
        with self.weights_lock, self.live.write():
            t0 = time.perf_counter()
            yield
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._write_seconds += time.perf_counter() - t0

    def _restore(self, journal: Journal) -> None:
        applied = self.live.applied_steps()
        state = journal.replay(applied)
        journal.compact(state, applied)  # finished examples keep their outcome, not tokens
        for i, enc in state.accepted.items():
            rec = self.records[i] = Record(i, enc)
            if i in state.trained:
                rec.state, rec.step = "trained", state.trained[i]
            elif i in state.failed:
                rec.state, rec.reason = "failed", state.failed[i]
        self.stats.accepted = len(state.accepted)
        self.stats.trained, self.stats.failed = len(state.trained), len(state.failed)
        if state.unfinished is not None:
            ids, remaining = state.unfinished
            if remaining:
                self._resume = ([self.records[i] for i in ids], remaining)
            else:  # every step of it was applied before the crash
                self._finish([self.records[i] for i in ids])
        self._queue.extend(self.records[i] for i in state.pending)
        if state.accepted:
            log.info("journal: %d examples (%d trained, %d failed, %d to train)",
                     len(state.accepted), len(state.trained), len(state.failed),
                     len(state.pending) + (len(state.unfinished[0]) if state.unfinished else 0))

    # --- producer side (HTTP handlers) ---
    def submit(self, examples: list[Encoded]) -> list[str]:
        """Journal (fsync) and queue all of `examples`, or none (raises QueueFull)."""
        with self._cond:
            if len(self._queue) + self._in_flight + len(examples) > self.max_queue:
                raise QueueFull(len(self._queue) + self._in_flight, self.max_queue)
            recs = [Record(id=uuid.uuid4().hex[:16], encoded=e) for e in examples]
            if self.journal is not None:
                self.journal.accept([(r.id, r.encoded) for r in recs])
            for r in recs:
                self.records[r.id] = r
                self._queue.append(r)
            self.stats.accepted += len(recs)
            self._cond.notify()
            return [r.id for r in recs]

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue) + self._in_flight

    # --- lifecycle ---
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0, last: Callable | None = None) -> None:
        """Finish the batch in progress (queued examples stay journaled for the next start),
        run `last` on the worker thread (a final checkpoint: under tensor parallelism its
        collectives follow the batch's), then end the worker and the other ranks."""
        with self._cond:
            self._stop = True
            self._last = last
            self._cond.notify_all()
        self._thread.join(timeout)
        if self.group is not None and self.group.leader and not self._thread.is_alive():
            try:
                self.group.broadcast(("stop",))
            except Exception:  # a follower already gone: nothing left to stop
                log.warning("could not tell the other trainer ranks to stop", exc_info=True)

    def run_in_worker(self, fn: Callable):
        """fn() on the worker thread, between batches; its result. Under tensor parallelism
        all collectives must come from one thread in one order: a checkpoint goes through
        here. Without it, fn runs on the calling thread."""
        if self.group is None or threading.current_thread() is self._thread:
            return fn()
        future: Future = Future()
        with self._cond:
            if self._stop or not self._thread.is_alive():
                raise RuntimeError("the trainer is not running")
            self._tasks.append((fn, future))
            self._cond.notify()
        return future.result()

    def train_batch(self, examples: list[Encoded], steps: int) -> None:
        """A follower rank's part of a batch that rank 0 sent: the same steps, no journal."""
        self._train([Record(id=str(i), encoded=e) for i, e in enumerate(examples)], steps)
        self.optimizer.zero_grad(set_to_none=True)

    # --- worker ---
    def _next_batch(self) -> tuple[list[Record], int] | tuple[Callable, Future] | None:
        with self._cond:
            if self._resume is not None:
                batch, steps = self._resume
                self._resume = None
            else:
                while not self._queue and not self._stop and not self._tasks:
                    if not self._cond.wait(timeout=1.0):
                        self.live.flush_prefix_cache_reset()  # an interval policy's due reset
                if self._stop:
                    for _, future in self._tasks:
                        future.set_exception(RuntimeError("the trainer stopped"))
                    return None
                if self._tasks:
                    return self._tasks.popleft()
                n = min(self.batch_size, len(self._queue))
                batch, steps = [self._queue.popleft() for _ in range(n)], self.steps_per_batch
            self._in_flight = len(batch)
            return batch, steps

    def _run(self) -> None:
        self._serve()
        if self._last is not None:
            try:
                self._last()
            except Exception:
                log.exception("the final task before stopping failed")

    def _serve(self) -> None:
        while (item := self._next_batch()) is not None:
            if isinstance(item[1], Future):
                fn, future = item
                try:
                    future.set_result(fn())
                except Exception as exc:
                    future.set_exception(exc)
                continue
            batch, steps = item
            try:
                if self.journal is not None:
                    self.journal.begin([r.id for r in batch], steps, self.live.applied_steps())
                if self.group is not None:
                    self.group.broadcast(("train", [r.encoded for r in batch], steps))
                self._train(batch, steps)
            except Exception as exc:  # isolate: mark the batch failed, keep serving
                log.exception("training batch failed")
                self._finish(batch, failed=f"{type(exc).__name__}: {exc}")
            finally:
                self.optimizer.zero_grad(set_to_none=True)
                with self._cond:
                    self._in_flight = 0
            for hook in self.after_batch:
                try:
                    hook()
                except Exception:
                    log.exception("after-batch hook failed")

    def _train(self, batch: list[Record], steps: int) -> None:
        ids, labels, mask = collate([r.encoded for r in batch], self.pad_id, self.device)
        for k in range(steps):
            t0 = time.perf_counter()
            loss = causal_lm_loss(self.model, ids, labels, mask)
            if FAULT == "nan-loss":
                loss = loss * float("nan")
            value = float(loss.detach())
            if not math.isfinite(value):
                self._finish(batch, failed=f"non-finite loss ({value}); no weight was changed")
                return
            if self.layerwise:
                applied = self._backward_layerwise(loss)
            else:
                loss.backward()
                if FAULT == "nan-grad":
                    next(p for p in self.model.parameters() if p.grad is not None).grad[0] = \
                        float("nan")
                applied = self._apply_step()
            self.optimizer.zero_grad(set_to_none=True)
            if not applied:
                self._finish(batch, failed="non-finite gradient; " + (
                    "the parameters with finite gradients were updated (layer-wise mode)"
                    if self.layerwise else "no weight was changed"))
                return
            self.stats.optimizer_steps += 1
            self.stats.last_loss = value
            self.stats.last_step_seconds = time.perf_counter() - t0
            self.stats.train_seconds += self.stats.last_step_seconds
            log.info("step %d loss %.4f (%d examples, step %d/%d of batch, %.2fs, write "
                     "%.1f ms)", self.stats.optimizer_steps, value, len(batch), k + 1, steps,
                     self.stats.last_step_seconds, 1e3 * self.stats.last_write_seconds)
        self.stats.trained_tokens += sum(r.encoded.num_targets for r in batch)
        self._finish(batch)

    def _apply_step(self) -> bool:
        """The in-place write is the only part that excludes vLLM's engine steps: an
        optimizer with prepare()/apply() (ours) computes everything else before taking the
        lock. False if the step was skipped (non-finite gradient: nothing was written)."""
        skipped = getattr(self.optimizer, "skipped_steps", 0)
        prepare = getattr(self.optimizer, "prepare", None)
        if prepare is not None:
            ok = prepare()  # a device flag; reading it here keeps a skipped step off the lock
            if ok is None or not bool(ok):
                return False
        with self.weights_lock, self.live.write():
            t0 = time.perf_counter()
            self.optimizer.apply() if prepare is not None else self.optimizer.step()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            applied = getattr(self.optimizer, "skipped_steps", 0) == skipped
            if applied:
                self.live.step_applied()
                self.stepped.update(id(p) for g in self.optimizer.param_groups
                                    for p in g["params"] if p.grad is not None)
            self.stats.last_write_seconds = time.perf_counter() - t0
        self.stats.stall_seconds += self.stats.last_write_seconds
        return applied

    def _backward_layerwise(self, loss: torch.Tensor) -> bool:
        """Backward with the optimizer's per-parameter hooks: weights change during it, each
        parameter's write atomic for vLLM, the step as a whole not."""
        skipped = self.optimizer.skipped_params
        self._write_seconds = 0.0
        loss.backward()
        with self.weights_lock:
            self.live.step_applied()
            self.stepped.update(id(p) for p in self.model.parameters() if p.requires_grad)
        self.stats.last_write_seconds = self._write_seconds
        self.stats.stall_seconds += self._write_seconds
        return self.optimizer.skipped_params == skipped

    def _finish(self, batch: list[Record], failed: str | None = None) -> None:
        ids, step = [r.id for r in batch], self.live.applied_steps()
        if self.journal is not None:
            if failed:
                self.journal.fail(ids, failed)
            else:
                self.journal.done(ids, step)
        with self._cond:
            for r in batch:
                r.encoded = None  # memory stays bounded by what is still to train
                if failed:
                    r.state, r.reason = "failed", failed
                    self.stats.failed += 1
                else:
                    r.state, r.step = "trained", step
                    self.stats.trained += 1
