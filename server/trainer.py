"""Background training worker: batches queued examples and steps the live model in place."""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import nn

from server.tokenization import IGNORE_INDEX, Encoded

log = logging.getLogger("vllm_apollo.trainer")


@dataclass
class Record:
    id: str
    encoded: Encoded
    state: str = "queued"
    step: int | None = None
    reason: str | None = None


@dataclass
class TrainerStats:
    optimizer_steps: int = 0
    last_loss: float | None = None
    trained: int = 0
    failed: int = 0
    trained_tokens: int = 0
    last_step_seconds: float | None = None
    started: float = field(default_factory=time.monotonic)


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
    """Owns the queue and the one thread that runs forward, backward and optimizer steps."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, pad_id: int,
                 batch_size: int = 8, steps_per_batch: int = 1, max_queue: int = 1024):
        self.model = model
        self.optimizer = optimizer
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.steps_per_batch = steps_per_batch
        self.max_queue = max_queue
        self.device = next(model.parameters()).device
        self.stats = TrainerStats()
        self.records: dict[str, Record] = {}
        self._queue: deque[Record] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._in_flight = 0  # examples taken from the queue, not yet finished
        self._thread = threading.Thread(target=self._run, name="trainer", daemon=True)
        # Held while weights change (optimizer step) and while a checkpoint reads them, so a
        # checkpoint is a snapshot between two steps.
        self.weights_lock = threading.Lock()
        self.after_batch: list = []  # callables run by the worker thread after each batch
        self.stepped: set[int] = set()  # id() of parameters stepped since the last checkpoint

    # --- producer side (HTTP handlers) ---
    def submit(self, examples: list[Encoded]) -> list[str]:
        """Queue all of `examples` or none (raises QueueFull)."""
        with self._cond:
            if len(self._queue) + len(examples) > self.max_queue:
                raise QueueFull(len(self._queue), self.max_queue)
            ids = []
            for e in examples:
                rec = Record(id=uuid.uuid4().hex[:16], encoded=e)
                self.records[rec.id] = rec
                self._queue.append(rec)
                ids.append(rec.id)
            self._cond.notify()
            return ids

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue) + self._in_flight

    def idle(self) -> bool:
        with self._cond:
            return not self._queue and not self._in_flight

    # --- lifecycle ---
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # --- worker ---
    def _next_batch(self) -> list[Record] | None:
        with self._cond:
            while not self._queue and not self._stop:
                self._cond.wait()
            if self._stop:
                return None
            batch = [self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))]
            self._in_flight = len(batch)
            return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self._train(batch)
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

    def _train(self, batch: list[Record]) -> None:
        ids, labels, mask = collate([r.encoded for r in batch], self.pad_id, self.device)
        for _ in range(self.steps_per_batch):
            t0 = time.perf_counter()
            loss = causal_lm_loss(self.model, ids, labels, mask)
            value = float(loss.detach())
            if not math.isfinite(value):
                self._finish(batch, failed=f"non-finite loss ({value}); no weight was changed")
                return
            loss.backward()
            skipped = getattr(self.optimizer, "skipped_steps", 0)
            with self.weights_lock:
                self.optimizer.step()
                self.stepped.update(id(p) for g in self.optimizer.param_groups
                                    for p in g["params"] if p.grad is not None)
            self.optimizer.zero_grad(set_to_none=True)
            if getattr(self.optimizer, "skipped_steps", 0) != skipped:
                self._finish(batch, failed="non-finite gradient; no weight was changed")
                return
            self.stats.optimizer_steps += 1
            self.stats.last_loss = value
            self.stats.last_step_seconds = time.perf_counter() - t0
            log.info("step %d loss %.4f (%d examples, %.2fs)", self.stats.optimizer_steps,
                     value, len(batch), self.stats.last_step_seconds)
        self.stats.trained_tokens += sum(r.encoded.num_targets for r in batch)
        self._finish(batch)

    def _finish(self, batch: list[Record], failed: str | None = None) -> None:
        with self._cond:
            for r in batch:
                if failed:
                    r.state, r.reason = "failed", failed
                    self.stats.failed += 1
                else:
                    r.state, r.step = "trained", self.stats.optimizer_steps
                    self.stats.trained += 1


class QueueFull(RuntimeError):
    def __init__(self, queued: int, limit: int):
        super().__init__(f"training queue is full ({queued} of {limit} queued)")
