"""Worker-side patches: keep CPU linear weights trainable and export them after load.

Tensor parallelism: only rank 0's worker takes the step lock. A rank > 0 reads its weights
between the engine step's first collective and its last (the logits gather), and those
collectives complete only while rank 0 is inside the same step, holding the lock; so one lock
excludes the trainer's writes from every rank's step. Per-rank locks would deadlock: a
trainer rank holding rank 1's lock while vLLM's rank 0 waits inside a step for rank 1. The one
read before the first collective is the vocab-parallel embedding lookup, which the trainer
therefore does not train under tensor parallelism (server/runtime.py).
"""

from __future__ import annotations

import functools
import logging
import time

import torch

from hooks.compat import check_version
from hooks.consistency import STEP_LOCK_TIMEOUT, StepLock, UpdateCounter
from hooks.export import export_module
from hooks.leftovers import note_vllm_dist
from hooks.load import LoadRecord
from hooks.sharding import parameter_shards

logger = logging.getLogger("vllm_apollo.hooks")


def _keep_weight_gemm(original):
    """Replace vLLM's CPU GEMM dispatch for 2-D weights by F.linear on the original weight.

    vLLM's CPU backend repacks linear weights into an opaque layout at load time and empties
    ``layer.weight``; nothing could then train them in place. Computing with the original
    tensor keeps one copy that both serving and training see (for tied embeddings too: the
    embedding lookup and the logits then read the same tensor).
    """

    @functools.wraps(original)
    def dispatch(layer: torch.nn.Module, remove_weight: bool) -> None:
        if layer.weight.is_meta or layer.weight.ndim != 2:
            return original(layer, remove_weight)
        layer.cpu_linear = torch.nn.functional.linear

    dispatch.__apollo_patched__ = True
    return dispatch


def _exporting_load_model(original, export_dir: str):
    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        model = self.model_runner.model
        from vllm.distributed import (
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )

        rank, world = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        if rank == 0:  # the one lock for all ranks (module docstring)
            self._apollo_lock = StepLock(export_dir, rank)
            self._apollo_waited = UpdateCounter(export_dir, f"rank{rank}.stall_ns")
            self._apollo_unlocked = UpdateCounter(export_dir, f"rank{rank}.unlocked_steps")
            self._apollo_load = LoadRecord(export_dir, rank)  # for the trainer's pacing
            # vLLM leaves its rendezvous file and CPU shared memory behind: the launcher's
            # cleanup removes them by this note (hooks/leftovers.py)
            note_vllm_dist(export_dir, getattr(self, "distributed_init_method", None))
        self._apollo_cuda = next(model.parameters()).is_cuda
        path = export_module(model, export_dir, model_path=self.model_config.model, rank=rank,
                             world_size=world,
                             shards=parameter_shards(model) if world > 1 else None)
        logger.info("apollo: exported %d live parameters to %s",
                    sum(1 for _ in model.parameters()), path)
        return result

    load_model.__apollo_patched__ = True
    return load_model


def _release(worker) -> None:
    """End of an engine step: recorded in the load record, and the lock let go if held."""
    record = getattr(worker, "_apollo_load", None)
    if record is not None:
        record.step_ended(time.monotonic_ns())
    if not getattr(worker, "_apollo_held", False):
        return  # a step that ran without the lock (hooks/consistency.py)
    if worker._apollo_cuda:  # the step's kernels must finish before a writer may start
        torch.cuda.current_stream().synchronize()
    worker._apollo_held = False
    worker._apollo_lock.release_step()


def _step_size(scheduler_output) -> tuple[int, int] | None:
    """(tokens, requests) vLLM scheduled for this step; None if it does not say."""
    tokens = getattr(scheduler_output, "total_num_scheduled_tokens", None)
    per_request = getattr(scheduler_output, "num_scheduled_tokens", None)
    if not isinstance(tokens, int) or not isinstance(per_request, dict):
        return None
    return tokens, len(per_request)


def _acquire(worker, lock: StepLock, scheduler_output=None) -> None:
    """The step lock for this engine step, waiting at most STEP_LOCK_TIMEOUT s; past it the
    step (and the next ones, until the holder lets go) run without it, counted and logged."""
    was_bypassing = lock.bypassing
    t0 = time.perf_counter_ns()
    held = lock.acquire_step(STEP_LOCK_TIMEOUT)
    waited = time.perf_counter_ns() - t0
    if waited <= 20_000:  # count real waits (for a writer), not the syscalls' cost
        waited = 0
    else:
        worker._apollo_waited.add(waited)
    worker._apollo_held = held
    record = getattr(worker, "_apollo_load", None)
    size = _step_size(scheduler_output)
    # an empty step (vLLM runs one to retire finished requests) is no serving load
    if record is not None and size != (0, 0):
        tokens, requests = size or (0, 0)
        record.step_started(time.monotonic_ns(), tokens=tokens, requests=requests,
                            lock_wait_ns=waited)
    if not held:
        worker._apollo_unlocked.bump()
        if not was_bypassing:
            logger.error("apollo: the trainer has held the step lock for more than %.0f s "
                         "(stopped or hung?): serving goes on without it, and a step may see "
                         "a partly applied update until it lets go (docs/service.md)",
                         STEP_LOCK_TIMEOUT)
    elif was_bypassing:
        logger.warning("apollo: the step lock is free again; engine steps exclude the "
                       "trainer's writes again (%d ran without it in all)",
                       worker._apollo_unlocked.read())


def _locked_execute_model(original):
    """Hold the step lock from execute_model until the step's tokens are sampled."""

    @functools.wraps(original)
    def execute_model(self, *args, **kwargs):
        lock = getattr(self, "_apollo_lock", None)
        if lock is None:
            return original(self, *args, **kwargs)
        if not getattr(self, "_apollo_held", False):
            _acquire(self, lock, args[0] if args else kwargs.get("scheduler_output"))
        try:
            out = original(self, *args, **kwargs)
        except BaseException:
            _release(self)
            raise
        if out is not None:  # finished here; otherwise sample_tokens completes the step
            _release(self)
        return out

    execute_model.__apollo_patched__ = True
    return execute_model


def _locked_sample_tokens(original):
    @functools.wraps(original)
    def sample_tokens(self, *args, **kwargs):
        try:
            return original(self, *args, **kwargs)
        finally:
            if getattr(self, "_apollo_lock", None) is not None:
                _release(self)  # ends the step (a no-op for the lock when not held)

    sample_tokens.__apollo_patched__ = True
    return sample_tokens


def _resetting_schedule(original, export_dir: str):
    """Drop the prefix cache once the trainer signals applied updates (UpdateCounter)."""

    @functools.wraps(original)
    def schedule(self, *args, **kwargs):
        counter = getattr(self, "_apollo_counter", None)
        if counter is None:
            counter = self._apollo_counter = UpdateCounter(export_dir)
            self._apollo_seen = counter.read()
        current = counter.read()
        # Fails (returns False) while running requests hold blocks: retried next schedule().
        if current != self._apollo_seen and self.reset_prefix_cache():
            self._apollo_seen = current
        return original(self, *args, **kwargs)

    schedule.__apollo_patched__ = True
    return schedule


def install(export_dir: str) -> None:
    """Patch vLLM in this process (idempotent: register() runs once per plugin load)."""
    import vllm
    from vllm.platforms import current_platform

    check_version(vllm.__version__)  # the patches below assume the tested internals

    if current_platform.is_cpu():
        from vllm.model_executor.layers import utils

        if not getattr(utils.dispatch_cpu_unquantized_gemm, "__apollo_patched__", False):
            utils.dispatch_cpu_unquantized_gemm = _keep_weight_gemm(
                utils.dispatch_cpu_unquantized_gemm)

    # CPUWorker inherits load_model from the GPU Worker: one patch covers both.
    from vllm.v1.worker.gpu_worker import Worker

    if not getattr(Worker.load_model, "__apollo_patched__", False):
        Worker.load_model = _exporting_load_model(Worker.load_model, export_dir)
        Worker.execute_model = _locked_execute_model(Worker.execute_model)
        Worker.sample_tokens = _locked_sample_tokens(Worker.sample_tokens)

    from vllm.v1.core.sched.scheduler import Scheduler

    if not getattr(Scheduler.schedule, "__apollo_patched__", False):
        Scheduler.schedule = _resetting_schedule(Scheduler.schedule, export_dir)
