"""When and how the server syncs the live weights to disk (on request and periodically).

One sync (or rollback) at a time: a caller that finds one in progress is refused at once
(CheckpointBusy) rather than queued behind it, so callers cannot pile up (each would hold a
thread); a periodic sync that finds one in progress is skipped (that one covers it).

Every sync that changes the files is a version (checkpoint/history.py); it records the
examples trained since the previous one, the optimizer steps and the drift (`meta`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict

from checkpoint import Checkpointer
from server.engine.trainer import Trainer

log = logging.getLogger("vllm_apollo.checkpoint")


class CheckpointBusy(RuntimeError):
    def __init__(self, what: str = "checkpoint") -> None:
        super().__init__(f"a {what} is in progress; nothing was done"
                         + ("; its result is /status's last_checkpoint"
                            if what == "checkpoint" else ""))


class CheckpointService:
    def __init__(self, checkpointer: Checkpointer, trainer: Trainer, every_steps: int = 0,
                 every_seconds: float = 0.0):
        # The optimizer's record of what it stepped narrows what the sync checksums.
        self._names_of: dict[int, list[str]] = {}
        for name, p in trainer.model.named_parameters(remove_duplicate=False):
            self._names_of.setdefault(id(p), []).append(name)
        self.checkpointer = checkpointer
        self.trainer = trainer
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.last: dict | None = None
        self._synced_step = trainer.stats.optimizer_steps
        self._synced_at = time.monotonic()
        self._lock = threading.Lock()  # one sync at a time (HTTP and the worker's schedule)
        self._busy = threading.Lock()  # held from a request's arrival to its result
        # The first sync scans everything: weights may have changed before this process
        # started (a trainer restarted while vLLM kept serving what it had learned).
        self._full_scan = True
        self._what = "checkpoint"  # what holds _busy
        self.trained_ids: list[str] = []  # trained since the last version, in order
        self._ids_lock = threading.Lock()
        trainer.on_trained.append(self._trained)
        self.meta: Callable[[], dict] = dict  # what a version records (engine/versions.py)
        self.on_synced: list[Callable[[dict], None]] = []  # with the weights still held
        self.rolled_back = False  # the live weights were rolled back since the last sync

    def _trained(self, ids: list[str]) -> None:
        with self._ids_lock:
            self.trained_ids.extend(ids)

    @contextlib.contextmanager
    def exclusive(self, what: str) -> Iterator[None]:
        """No sync while `what` (a rollback) runs; CheckpointBusy if one is under way."""
        if not self._busy.acquire(blocking=False):
            raise CheckpointBusy(self._what)
        self._what = what
        try:
            yield
        finally:
            self._what = "checkpoint"
            self._busy.release()

    def sync(self) -> dict:
        """Sync now; raises CheckpointBusy if a sync is already under way."""
        if not self._busy.acquire(blocking=False):
            raise CheckpointBusy(self._what)
        try:
            return self.trainer.run_in_worker(self._sync)
        finally:
            self._busy.release()

    def _sync(self) -> dict:
        with self._lock, self.trainer.weights_lock:
            step = self.trainer.stats.optimizer_steps
            names = None if self._full_scan else [
                n for pid in self.trainer.stepped for n in self._names_of.get(pid, [])]
            group = self.trainer.group
            if group is not None:  # the other ranks send their shards of the same tensors
                names = self.checkpointer.plan(names)
                group.broadcast(("checkpoint", names))
            with self._ids_lock:
                ids = list(self.trained_ids)
            meta = {**self.meta(), "examples": len(ids), "example_ids": ids,
                    "optimizer_steps": step - self._synced_step, "optimizer_steps_total": step}
            result = self.checkpointer.sync(names, meta=meta)
            self.trainer.stepped.clear()
            self._full_scan = False
            self.rolled_back = False
            self.last = {**asdict(result), "optimizer_step": step, "at": time.time()}
            if result.version is not None:
                with self._ids_lock:
                    del self.trained_ids[:len(ids)]
            for hook in self.on_synced:
                hook(self.last)
        self._synced_step, self._synced_at = step, time.monotonic()
        return self.last

    def unsaved_steps(self) -> int:
        """Optimizer steps applied to vLLM's weights since the last sync (this process's)."""
        return self.trainer.stats.optimizer_steps - self._synced_step

    def sync_on_exit(self) -> None:
        """The final sync of --checkpoint-on-exit (on the worker thread, after its last batch)."""
        if self.unsaved_steps() <= 0 and not self.rolled_back:
            return
        result = self._sync()
        log.info("checkpoint on exit: %d tensors, %d bytes in %.2f s", result["tensors"],
                 result["bytes_written"], result["seconds"])

    def maybe_sync(self) -> None:
        steps = self.unsaved_steps()
        if steps <= 0:
            return
        due_steps = self.every_steps and steps >= self.every_steps
        due_time = self.every_seconds and time.monotonic() - self._synced_at >= self.every_seconds
        if due_steps or due_time:
            try:
                self.sync()
            except CheckpointBusy:
                pass  # the sync under way covers these steps
