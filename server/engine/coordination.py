"""How the trainer's in-place writes meet vLLM's engine steps: the step lock, the
prefix-cache policy, the applied-step counter (hooks/consistency.py is vLLM's side) and the
serving load vLLM's worker publishes (hooks/load.py; the trainer paces itself by it).

`Standalone` is the same interface with nothing to coordinate with (unit tests, a model
trained on its own); `VllmCoordinator` talks to vLLM's export."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from server.engine.distributed import Group
from server.engine.weight_version import WeightVersion
from weight_mapping import WEIGHT_VERSION, Export, LoadSnapshot


class Standalone:
    """No vLLM to coordinate with."""

    def __init__(self) -> None:
        self._steps = 0
        self.version = WeightVersion()  # bumped with every change of the live weights

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        yield

    def applied_steps(self) -> int:
        return self._steps

    def step_applied(self) -> None:
        self._steps += 1
        self.version.bump()

    def weights_restored(self) -> None:
        """Call inside write(): the weights were put back as they were (an undone batch, a
        rollback)."""
        self.version.bump()

    def vllm_stall_seconds(self) -> float:
        return 0.0

    def serving_load(self) -> LoadSnapshot | None:
        """vLLM's load record, read now; None: no serving to pace against."""
        return None

    def vllm_unlocked_steps(self) -> int:
        return 0

    def flush_prefix_cache_reset(self) -> None:
        pass


class VllmCoordinator(Standalone):
    """vLLM's exported tensors: writes exclude engine steps (unless consistency == "none"), and
    applied updates drop vLLM's prefix cache per `prefix_cache_reset`:
    "always", "never", or a number of seconds (at most one reset per interval)."""

    def __init__(self, export: Export, consistency: str = "step",
                 prefix_cache_reset: str = "always", group: Group | None = None):
        super().__init__()
        if consistency not in ("step", "none"):
            raise ValueError(f"consistency must be 'step' or 'none', got {consistency!r}")
        # Tensor parallelism: rank 0 holds the one lock for all vLLM ranks and keeps the
        # counters; every rank writes between two barriers, inside rank 0's lock.
        self._group = group
        self._leader = export.rank == 0
        self._lock = export.step_lock() if consistency == "step" and self._leader else None
        self._updates = export.update_counter("updates")
        self._steps_counter = export.update_counter("steps")
        self._vllm_waited = export.update_counter(f"rank{export.manifest['rank']}.stall_ns")
        self._vllm_unlocked = export.update_counter("rank0.unlocked_steps")
        if self._leader:  # read by vLLM's response header (hooks/version_header.py)
            self.version = WeightVersion(export.update_counter(WEIGHT_VERSION))
        # rank 0's worker keeps it; the other trainer ranks follow rank 0's pace anyway
        self._load = export.serving_load() if self._leader else None
        self._policy = prefix_cache_reset
        self._interval = None if prefix_cache_reset in ("always", "never") \
            else float(prefix_cache_reset)
        self._last_reset = 0.0
        self._pending_reset = False

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        if self._group is not None:
            # every rank ready before rank 0 takes the lock: it is held for the write and
            # its two barriers, never while a slower rank still computes
            self._group.barrier()
        with self._lock.write() if self._lock is not None else contextlib.nullcontext():
            if self._group is None:
                yield
                return
            self._group.barrier()  # every rank's write starts inside rank 0's lock ...
            try:
                yield
            finally:
                self._group.barrier()  # ... and ends before it is released

    def applied_steps(self) -> int:
        return self._steps_counter.read()

    def vllm_stall_seconds(self) -> float:
        """Time vLLM's worker actually waited for writes, as it measured it."""
        return self._vllm_waited.read() / 1e9

    def serving_load(self) -> LoadSnapshot | None:
        return self._load.read() if self._load is not None else None

    def vllm_unlocked_steps(self) -> int:
        """Engine steps vLLM ran without the step lock because a writer held it past the
        hook's timeout (hooks/consistency.py)."""
        return self._vllm_unlocked.read()

    def step_applied(self) -> None:
        """Call inside write(): the step counts as applied once this returns."""
        if not self._leader:
            return
        self._steps_counter.bump()
        self.version.bump()
        self._pending_reset = True
        self.flush_prefix_cache_reset()

    def weights_restored(self) -> None:
        """KV computed while the undone batch was live must not be reused either."""
        if self._leader:
            self.version.bump()
            self._pending_reset = True
            self.flush_prefix_cache_reset()

    def flush_prefix_cache_reset(self) -> None:
        if not self._pending_reset or self._policy == "never" or not self._leader:
            return
        now = time.monotonic()
        if self._interval is not None and now - self._last_reset < self._interval:
            return  # the trainer calls again after later steps/batches
        self._updates.bump()
        self._last_reset, self._pending_reset = now, False
