"""The training engine's front: the queue of accepted examples and the one worker thread.

The worker takes batches from the queue (or tasks that must run between batches, such as a
checkpoint under tensor parallelism), has the `Stepper` train them, records each example's
outcome in the example log, and runs the after-batch hooks.

A batch is a run of queued examples of one group (live examples have none; a fine-tuning job
is one), so a job's batches are its own: its batch size, learning-rate scale and β hold, and a
cancelled job's batch can stop at the next step without cutting a live example short.

Over 300 lines on purpose: the queue and its one worker thread are one concurrency unit
(submit, halt, drain, stop share one lock), read together or not at all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

from torch import nn

from server.engine.coordination import Standalone
from server.engine.distributed import Group
from server.engine.example_log import ExampleLog, ExampleLogError
from server.engine.example_replay import NO_OPTIONS
from server.engine.locality import Monitor
from server.engine.records import QueueFull, Record, TrainerStats, Unavailable
from server.engine.steps import LiveOptimizer, Outcome, Stepper
from server.engine.tokenization import Encoded
from server.settings import Settings

log = logging.getLogger("vllm_apollo.trainer")

__all__ = ["QueueFull", "Trainer", "Unavailable"]


class Trainer:
    """Owns the queue and the worker thread; batch size, steps per batch, queue limit and
    mode come from `settings`."""

    def __init__(self, model: nn.Module, optimizer: LiveOptimizer, settings: Settings, *,
                 pad_id: int, example_log: ExampleLog | None = None,
                 coordinator: Standalone | None = None, group: Group | None = None,
                 monitor: Monitor | None = None):
        self.model = model
        self.optimizer = optimizer
        self.batch_size = settings.batch_size
        self.max_steps = settings.max_steps_per_batch
        self.max_queue = settings.max_queue
        self.max_queue_tokens = settings.max_queue_tokens
        self._tokens = 0  # tokens of the examples queued or in flight
        self.example_log = example_log
        self.coordinator = coordinator or Standalone()
        self.stats = TrainerStats()
        self.monitor = monitor
        self.stepper = Stepper(model, optimizer, settings, pad_id=pad_id,
                               coordinator=self.coordinator, stats=self.stats, monitor=monitor)
        # Tensor parallelism: rank 0's worker thread sends each batch (and every other
        # collective work, see run_in_worker) to the other ranks first (engine/distributed.py)
        self.group = group
        self.records: dict[str, Record] = {}
        # finished examples kept in `records`, oldest first: the last N (the example log
        # keeps every outcome); the memory of a long-running server stays bounded
        self._finished: deque[str] = deque()
        self.keep_finished = settings.keep_finished_records
        self.nice = settings.train_nice
        self._queue: deque[Record] = deque()
        self._resume: tuple[list[Record], int] | None = None  # batch cut short by a crash
        self._cond = threading.Condition()
        # one submit at a time, from its checks to its enqueue: its fsync happens outside
        # _cond, so reads of the queue (/status) never wait for the disk
        self._admit = threading.Lock()
        self._stop = False
        self._last: Callable | None = None  # run by the worker when it stops
        self._in_flight = 0  # examples taken from the queue, not yet finished
        self._tasks: deque[tuple[Callable, Future]] = deque()
        self._thread = threading.Thread(target=self._run, name="trainer", daemon=True)
        # set once the worker's one-time preparation (drift reference, guard) is over, made
        # or failed: the work after it is the examples' and the tasks'
        self.prepared = threading.Event()
        self.after_batch: list[Callable[[], None]] = []  # run by the worker after each batch
        self.on_trained: list[Callable[[list[str]], None]] = []  # ids of each trained batch
        # Why the worker can no longer train (an outcome it could not log, an error that
        # ended the thread): the service reports it, and refuses examples, instead.
        self.fatal: str | None = None
        if example_log is not None:
            self._restore(example_log)

    @property
    def weights_lock(self) -> threading.Lock:
        """Held while weights change and while a checkpoint reads them."""
        return self.stepper.weights_lock

    @property
    def pacer(self):
        """How the trainer paces itself around serving (engine/pacing.py)."""
        return self.stepper.pacer

    @property
    def stepped(self) -> set[int]:
        """id() of the parameters stepped since the last checkpoint."""
        return self.stepper.stepped

    def _restore(self, example_log: ExampleLog) -> None:
        applied = self.coordinator.applied_steps()
        state = example_log.restore(applied)  # compacted: finished examples lose their tokens
        for i, enc in state.accepted.items():
            rec = self.records[i] = Record(i, enc, kind=enc.kind if enc is not None
                                           else state.kinds.get(i))
            rec.group, rec.lr_scale, rec.beta = state.options.get(i, NO_OPTIONS)
            if i in state.trained:
                rec.state, rec.step = "trained", state.trained[i]
                rec.reason = state.notes.get(i)
                if i in state.rolled_back:
                    rec.state, rec.reason = "rolled back", state.rolled_back[i]
                self._finished.append(i)
            elif i in state.failed:
                rec.state, rec.reason = "failed", state.failed[i]
                self._finished.append(i)
            elif i in state.cancelled:
                rec.state, rec.reason, rec.encoded = "cancelled", state.cancelled[i], None
                self._finished.append(i)
        self._forget_finished()
        self.stats.accepted = len(state.accepted)
        self.stats.trained, self.stats.failed = len(state.trained), len(state.failed)
        if state.unfinished is not None:
            ids, remaining = state.unfinished
            if remaining:
                self._resume = ([self.records[i] for i in ids], remaining)
            else:  # every step of it was applied before the crash
                self._finish([self.records[i] for i in ids], Outcome(note="finished before a "
                                                                     "restart"))
        self._queue.extend(self.records[i] for i in state.pending)
        self._tokens = sum(r.encoded.tokens for r in self._queue) + (
            sum(r.encoded.tokens for r in self._resume[0]) if self._resume else 0)
        if state.accepted:
            log.info("example log: %d examples (%d trained, %d failed, %d to train)",
                     len(state.accepted), len(state.trained), len(state.failed),
                     len(state.pending) + (len(state.unfinished[0]) if state.unfinished else 0))

    # --- producer side (HTTP handlers) ---
    def submit(self, examples: list[Encoded], *, ids: list[str] | None = None,
               group: str | None = None, lr_scale: float = 1.0,
               beta: float | None = None) -> list[str]:
        """Log (fsync) and queue all of `examples`, or none (raises QueueFull, Unavailable,
        or the example log's NotLogged / LogBroken). `ids`: the caller's own (a job's, which
        must be new), else random ones; `group`, `lr_scale`, `beta`: see Record."""
        with self._admit:
            with self._cond:  # the worker only takes from the queue meanwhile
                if self.fatal:
                    raise Unavailable(self.fatal)
                if ids is not None and (len(ids) != len(examples) or len(set(ids)) != len(ids)
                                        or any(i in self.records for i in ids)):
                    raise ValueError("example ids must be new and one per example")
                if len(self._queue) + self._in_flight + len(examples) > self.max_queue:
                    raise QueueFull(len(self._queue) + self._in_flight, self.max_queue)
                tokens = sum(e.tokens for e in examples)
                if self._tokens + tokens > self.max_queue_tokens:
                    raise QueueFull(self._tokens, self.max_queue_tokens, "tokens")
            recs = [Record(id=i, encoded=e, group=group, lr_scale=lr_scale, beta=beta,
                           kind=e.kind)
                    for i, e in zip(ids or [uuid.uuid4().hex[:16] for _ in examples], examples,
                                    strict=True)]
            if self.example_log is not None:  # accepted once logged: queued whatever follows
                self.example_log.accept([(r.id, r.encoded) for r in recs], group, lr_scale,
                                        beta)
            with self._cond:
                for r in recs:
                    self.records[r.id] = r
                    self._queue.append(r)
                self._tokens += tokens
                self.stats.accepted += len(recs)
                self._cond.notify()
            return [r.id for r in recs]

    def withdraw(self, ids: list[str], reason: str) -> list[str]:
        """Take those of `ids` still waiting in the queue out of it, journaled as cancelled
        (raises the example log's errors, and then changes nothing). Examples being trained,
        finished or unknown are left as they are. Returns the ids withdrawn."""
        with self._cond:
            wanted = set(ids)
            taken = [r for r in self._queue if r.id in wanted]
            if not taken:
                return []
            if self.example_log is not None:
                self.example_log.cancel([r.id for r in taken], reason)
            gone = {r.id for r in taken}
            self._queue = deque(r for r in self._queue if r.id not in gone)
            for r in taken:
                self._tokens -= r.encoded.tokens
                r.encoded, r.state, r.reason = None, "cancelled", reason
                self._finished.append(r.id)
            self._forget_finished()
            return [r.id for r in taken]

    def halt(self, ids: list[str]) -> None:
        """Stop the batch holding `ids` at its next step boundary, if every example in it is
        halted (the steps applied stay). Not under tensor parallelism, where all ranks must
        run the same steps: there the batch runs to its end."""
        with self._cond:
            for i in ids:
                if (rec := self.records.get(i)) is not None and rec.state == "queued":
                    rec.stop = True

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue) + self._in_flight

    # --- lifecycle ---
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0, last: Callable | None = None) -> None:
        """Finish the batch in progress (queued examples stay in the example log for the next
        start), run `last` on the worker thread (a final checkpoint: under tensor parallelism its
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

    def run_in_worker(self, fn: Callable, always: bool = False):
        """fn() on the worker thread, between batches; its result. Under tensor parallelism
        all collectives must come from one thread in one order: a checkpoint goes through
        here. Without it, fn runs on the calling thread."""
        if (self.group is None and not always) or threading.current_thread() is self._thread:
            return fn()
        future: Future = Future()
        with self._cond:
            if self.fatal:
                raise Unavailable(self.fatal)
            if self._stop or not self._thread.is_alive():
                raise RuntimeError("the trainer is not running")
            self._tasks.append((fn, future))
            self._cond.notify()
        return future.result()

    def train_batch(self, examples: list[Encoded], steps: int, lr_scale: float = 1.0,
                    beta: float | None = None) -> None:
        """A follower rank's part of a batch that rank 0 sent: the same steps, no example log."""
        with self._scaled_lr(lr_scale):
            self.stepper.run(examples, steps, beta=beta)
        self.optimizer.zero_grad(set_to_none=True)

    @contextlib.contextmanager
    def _scaled_lr(self, scale: float):
        """Every group's learning rate times `scale` for one batch (a job's multiplier)."""
        saved = [g["lr"] for g in self.optimizer.param_groups]
        for g in self.optimizer.param_groups:
            g["lr"] = g["lr"] * scale
        try:
            yield
        finally:
            for g, lr in zip(self.optimizer.param_groups, saved, strict=True):
                g["lr"] = lr

    # --- worker ---
    def _next_batch(self) -> tuple[list[Record], int] | tuple[Callable, Future] | None:
        with self._cond:
            if self._resume is not None:
                batch, steps = self._resume
                self._resume = None
            else:
                while not self._queue and not self._stop and not self._tasks:
                    if not self._cond.wait(timeout=1.0):
                        # an interval policy's reset may be due
                        self.coordinator.flush_prefix_cache_reset()
                if self._stop:
                    for _, future in self._tasks:
                        future.set_exception(RuntimeError("the trainer stopped"))
                    return None
                if self._tasks:
                    return self._tasks.popleft()
                head = self._queue[0]
                key = (head.group, head.lr_scale, head.beta)
                batch, steps = [], self.max_steps
                while self._queue and len(batch) < self.batch_size and \
                        (self._queue[0].group, self._queue[0].lr_scale,
                         self._queue[0].beta) == key:
                    batch.append(self._queue.popleft())
            self._in_flight = len(batch)
            return batch, steps

    def problem(self) -> str | None:
        """Why this trainer cannot train (None: it can)."""
        if self.fatal:
            return self.fatal
        if self._thread.ident is not None and not self._thread.is_alive() and not self._stop:
            return "the trainer thread has ended"
        return None

    def _die(self, reason: str) -> None:
        log.critical("%s; the service is unhealthy until restarted", reason)
        with self._cond:
            self.fatal = reason
            for _, future in self._tasks:
                future.set_exception(Unavailable(reason))
            self._tasks.clear()

    def _run(self) -> None:
        if self.nice:  # Linux: a thread's own nice value, inherited by the threads it starts
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
        if self.monitor is not None:  # before the first batch changes anything
            try:  # paced like training, a chunk per batch of probes or basis: one thread
                # while vLLM serves, all in its gaps (engine/pacing.py)
                self.monitor.ensure_reference(self.model, self.pacer.chunk)
                self.monitor.ensure_guard(self.model, self.pacer.chunk)
            except Exception:  # the stepper tries again before each batch, which fails
                log.exception("the drift reference or the guard could not be made")
        self.prepared.set()
        try:
            self._serve()
        except BaseException as exc:  # nothing ends the worker silently (see self.fatal)
            why = "the example log failed" if isinstance(exc, ExampleLogError) else \
                "the trainer failed"
            self._die(f"{why}: {type(exc).__name__}: {exc}")
            return
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
                if self.example_log is not None:
                    self.example_log.begin([r.id for r in batch], steps,
                                           self.coordinator.applied_steps())
                scale, beta = batch[0].lr_scale, batch[0].beta
                if self.group is not None:
                    self.group.broadcast(("train", [r.encoded for r in batch], steps, scale,
                                          beta))
                self.stepper.interrupt = None if self.group is not None else \
                    (lambda b=batch: all(r.stop for r in b))
                with self._scaled_lr(scale):
                    outcome = self.stepper.run([r.encoded for r in batch], steps, beta=beta)
                self._finish(batch, outcome)
            except ExampleLogError:
                raise  # an outcome that cannot be logged: the log and counter resolve it later
            except Exception as exc:  # isolate: mark the batch failed, keep serving
                log.exception("training batch failed")
                self._finish(batch, Outcome(failed=f"{type(exc).__name__}: {exc}"))
            finally:
                self.optimizer.zero_grad(set_to_none=True)
                with self._cond:
                    self._in_flight = 0
            for hook in self.after_batch:
                try:
                    hook()
                except Exception:
                    log.exception("after-batch hook failed")

    def _finish(self, batch: list[Record], outcome: Outcome) -> None:
        ids, step = [r.id for r in batch], self.coordinator.applied_steps()
        failed, drift = outcome.failed, outcome.drift.as_dict() if outcome.drift else None
        if self.example_log is not None:
            if failed:
                self.example_log.fail(ids, failed)
            else:
                self.example_log.done(ids, step, outcome.note)
        with self._cond:
            for r in batch:
                self._tokens -= r.encoded.tokens if r.encoded is not None else 0
                r.encoded = None  # memory stays bounded by what is still to train
                r.drift, r.loss = drift, outcome.loss
                if failed:
                    r.state, r.reason = "failed", failed
                    self.stats.failed += 1
                else:
                    r.state, r.step, r.reason = "trained", step, outcome.note
                    self.stats.trained += 1
                self._finished.append(r.id)
            if not failed and outcome.steps == 0 and not all(r.stop for r in batch):
                self.stats.learned_without_steps += len(batch)
            self._forget_finished()
        if not failed:
            for hook in self.on_trained:
                hook(ids)

    def _forget_finished(self) -> None:
        while len(self._finished) > self.keep_finished:
            self.records.pop(self._finished.popleft(), None)
