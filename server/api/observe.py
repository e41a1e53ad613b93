"""Read-only endpoints for people and monitors: /health, /status, /metrics, /memory."""

from __future__ import annotations

import psutil
from fastapi import APIRouter, HTTPException
from fastapi.responses import PlainTextResponse

from server.api.deps import EngineDep
from server.api.schemas import Health, Memory, PacingState, ServingLoadState, Status
from weight_mapping import shares_storage

router = APIRouter()


@router.get("/health", response_model=Health)
def health(engine: EngineDep) -> Health:
    """200, or 503 with the reason the service cannot train (it then refuses /train too)."""
    if (reason := engine.problem()) is not None:
        raise HTTPException(503, reason)
    return Health(status="ok")


@router.get("/status", response_model=Status)
def status(engine: EngineDep) -> Status:
    trainer, s, monitor = engine.trainer, engine.trainer.stats, engine.trainer.monitor
    return Status(optimizer_steps=s.optimizer_steps, last_loss=s.last_loss,
                  preparing=not trainer.prepared.is_set(),
                  examples_queued=trainer.queued, examples_trained=s.trained,
                  examples_failed=s.failed, skipped_steps=trainer.optimizer.skipped_steps,
                  trained_tokens=s.trained_tokens, model_path=engine.model_path,
                  applied_steps=trainer.coordinator.applied_steps(),
                  last_step_seconds=s.last_step_seconds,
                  last_write_seconds=s.last_write_seconds,
                  serving_stall_seconds=s.stall_seconds,
                  vllm_waited_seconds=trainer.coordinator.vllm_stall_seconds(),
                  vllm_unlocked_steps=trainer.coordinator.vllm_unlocked_steps(),
                  last_checkpoint=engine.checkpoints.last if engine.checkpoints else None,
                  checkpointing_disabled=engine.checkpointing_disabled,
                  drift=_drift(engine), drift_budget=engine.settings.drift_budget or None,
                  pinned_probes=monitor.pinned_questions() if monitor is not None else [],
                  kept_probes=monitor.kept_questions() if monitor is not None else [],
                  undone_batches=s.undone_batches,
                  learned_without_steps=s.learned_without_steps,
                  **_weights(engine), **_pacing(engine))


def _pacing(engine) -> dict:
    pacer = engine.trainer.pacer
    now = pacer.meter.sample() if pacer.meter is not None else None
    last = pacer.last
    return {"pacing": PacingState(
                train_share=pacer.share, share_above=pacer.share_above,
                max_wait_seconds=pacer.max_wait,
                threads_busy=pacer.busy_threads,
                last_seen=ServingLoadState(**last.as_dict()) if last else None,
                **vars(pacer.stats)),
            "serving_load": ServingLoadState(**now.as_dict()) if now else None}


def _weights(engine) -> dict:
    version, checkpoint = engine.trainer.coordinator.version.get()
    return {"weight_version": version, "weight_checkpoint": checkpoint,
            "last_rollback": engine.versions.last_rollback if engine.versions else None}


def _drift(engine) -> dict | None:
    monitor = engine.trainer.monitor
    return monitor.last.as_dict() if monitor is not None and monitor.last else None


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(engine: EngineDep) -> str:
    """Prometheus text format."""
    trainer, s = engine.trainer, engine.trainer.stats
    ckpt = (engine.checkpoints.last if engine.checkpoints else None) or {}
    rows = [
        ("examples_accepted_total", "counter", s.accepted),
        ("examples_trained_total", "counter", s.trained),
        ("examples_failed_total", "counter", s.failed),
        ("examples_queued", "gauge", trainer.queued),
        ("optimizer_steps_total", "counter", s.optimizer_steps),
        ("optimizer_skipped_steps_total", "counter", trainer.optimizer.skipped_steps),
        ("loss", "gauge", s.last_loss if s.last_loss is not None else float("nan")),
        ("trained_tokens_total", "counter", s.trained_tokens),
        ("trained_tokens_per_second", "gauge",
         s.trained_tokens / s.train_seconds if s.train_seconds else 0.0),
        ("step_seconds", "gauge", s.last_step_seconds or 0.0),
        ("write_seconds", "gauge", s.last_write_seconds or 0.0),
        ("serving_stall_seconds_total", "counter", s.stall_seconds),
        ("vllm_waited_seconds_total", "counter", trainer.coordinator.vllm_stall_seconds()),
        ("vllm_unlocked_steps_total", "counter", trainer.coordinator.vllm_unlocked_steps()),
        ("last_checkpoint_timestamp_seconds", "gauge", ckpt.get("at", 0.0)),
        ("last_checkpoint_bytes", "gauge", ckpt.get("bytes_written", 0)),
        ("undone_batches_total", "counter", s.undone_batches),
        ("learned_without_steps_total", "counter", s.learned_without_steps),
        ("weight_version", "gauge", trainer.coordinator.version.get()[0]),
        ("weight_checkpoint", "gauge", -1 if (named := trainer.coordinator.version.get()[1])
         is None else named),
        ("rollbacks_total", "counter", engine.versions.rollbacks if engine.versions else 0),
    ]
    pacer = trainer.pacer
    rows += [("train_share", "gauge", pacer.share),
             ("trainer_waited_seconds_total", "counter", pacer.stats.waited_seconds),
             ("trainer_waits_total", "counter", pacer.stats.waits),
             ("trainer_capped_waits_total", "counter", pacer.stats.capped_waits),
             ("trainer_busy_chunks_total", "counter", pacer.stats.busy_chunks),
             ("trainer_busy_train_seconds_total", "counter", pacer.stats.busy_train_seconds),
             ("trainer_light_chunks_total", "counter", pacer.stats.light_chunks)]
    if pacer.meter is not None and (load := pacer.meter.sample()) is not None:
        rows += [("serving_busy", "gauge", load.busy),
                 ("serving_engine_steps_total", "counter", load.engine_steps),
                 ("serving_engine_steps_per_second", "gauge", load.engine_steps_per_second),
                 ("serving_busy_share", "gauge", load.busy_share),
                 ("serving_tokens_per_second", "gauge", load.tokens_per_second),
                 ("serving_requests", "gauge", load.requests),
                 ("serving_lock_wait_seconds_total", "counter", load.lock_wait_seconds)]
    drift = _drift(engine)
    if drift is not None:
        rows += [("drift_mean_kl", "gauge", drift["mean_kl"]),
                 ("drift_max_kl", "gauge", drift["max_kl"]),
                 ("drift_changed_share", "gauge", drift["changed_share"])]
        if drift.get("batch_kl") is not None:
            rows.append(("drift_batch_kl", "gauge", drift["batch_kl"]))
    return "".join(f"# TYPE vllm_apollo_{n} {t}\nvllm_apollo_{n} {float(v)!r}\n"
                   for n, t, v in rows)


@router.get("/memory", response_model=Memory)
def memory(engine: EngineDep) -> Memory:
    """Proof that the trainer holds no copy of the weights: parameters whose memory lies in
    vLLM's exported tensors (by storage pointer), and this process's unique memory."""
    params = list(engine.model.parameters())
    tensors = engine.export.tensors if engine.export is not None else {}
    return Memory(parameters=len(params),
                  parameters_in_vllm_memory=sum(shares_storage(p, tensors) for p in params),
                  weight_bytes=sum(p.numel() * p.element_size() for p in params),
                  uss_bytes=psutil.Process().memory_full_info().uss)
