"""OpenAI's /v1/fine_tuning/jobs: create, list, retrieve, cancel, events. Every endpoint
needs the API key when one is configured.

A job trains the served model itself, in place (engine/jobs.py), so its `model` must name
that model: the path vLLM serves it under (its default name), the directory's base name, or a
name given with --served-model-name; `fine_tuned_model` is then that same name. "auto"
hyperparameters resolve when the job is created: n_epochs 1 (every batch is trained until
learned, up to --max-steps-per-batch), batch_size --batch-size (also the largest allowed),
learning_rate_multiplier 1 (times --lr), and a dpo job's beta --beta.

Method "dpo" trains a file of preference pairs with the DPO loss that /train's pairs get, at
the job's own beta (the trainer takes it per batch); "supervised" trains chat examples. The
method must match what the file holds.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query
from pydantic import ValidationError

from server.api.deps import EngineDep, SettingsDep, require_key
from server.api.openai_schemas import (
    DpoJobHyperparameters,
    FineTuningJob,
    JobCreate,
    JobError,
    JobEvent,
    JobHyperparameters,
    ListPage,
    MethodOut,
    OpenAIError,
    page,
)
from server.engine.jobs import Job, JobFinished, JobRunner, new_job_id

router = APIRouter(prefix="/v1/fine_tuning", dependencies=[Depends(require_key)])


def _runner(engine) -> JobRunner:
    if engine.jobs is None or engine.files is None:
        raise OpenAIError(503, "this server runs no fine-tuning jobs", kind="server_error")
    return engine.jobs


def _job(runner: JobRunner, job_id: str) -> Job:
    job = runner.jobs.get(job_id)
    if job is None:
        raise OpenAIError(404, f"No such fine-tuning job: {job_id}", "fine_tuning_job_id")
    return job


def job_object(job: Job) -> FineTuningJob:
    hp = JobHyperparameters(batch_size=job.batch_size, n_epochs=job.n_epochs,
                            learning_rate_multiplier=job.lr_multiplier)
    if job.method == "dpo":
        method = MethodOut(type="dpo", dpo={"hyperparameters": DpoJobHyperparameters(
            **hp.model_dump(), beta=job.beta)})
    else:
        method = MethodOut(type="supervised", supervised={"hyperparameters": hp})
    return FineTuningJob(
        id=job.id, created_at=job.created_at, error=JobError(**job.error) if job.error else None,
        fine_tuned_model=job.fine_tuned_model, finished_at=job.finished_at, hyperparameters=hp,
        model=job.model, seed=job.seed, status=job.status,
        trained_tokens=job.trained_tokens if job.finished_at else None,
        training_file=job.training_file, estimated_finish=job.estimated_finish,
        metadata=job.metadata, method=method, user_provided_suffix=job.suffix)


def model_names(engine, settings) -> list[str]:
    names = [engine.model_path, Path(engine.model_path).name]
    return names + [n.strip() for n in settings.served_model_name.split(",") if n.strip()]


def _invalid(exc: ValidationError) -> OpenAIError:
    first = exc.errors()[0]
    where = ".".join(str(x) for x in first["loc"])
    return OpenAIError(400, f"{where}: {first['msg']}", str(first["loc"][0])
                       if first["loc"] else None)


@router.post("/jobs", response_model=FineTuningJob)
def create_job(payload: Annotated[Any, Body()], engine: EngineDep, settings: SettingsDep
               ) -> FineTuningJob:
    runner = _runner(engine)
    if (reason := engine.problem()) is not None:
        raise OpenAIError(503, f"not accepting jobs: {reason}", kind="server_error")
    try:
        req = JobCreate.model_validate(payload)
    except ValidationError as exc:
        raise _invalid(exc) from None
    if req.model not in (names := model_names(engine, settings)):
        raise OpenAIError(400, f"model {req.model!r} is not served here: this server trains the "
                               f"model vLLM serves in place, named {' or '.join(names)}",
                          "model", "model_not_available")
    f = engine.files.get(req.training_file)
    if f is None:
        raise OpenAIError(400, f"no file with id {req.training_file!r}", "training_file",
                          "invalid_training_file")
    if req.validation_file or req.integrations:
        which = "validation_file" if req.validation_file else "integrations"
        raise OpenAIError(400, f"{which} is not supported by this server", which)
    method = req.method.type if req.method else "supervised"
    specific = getattr(req.method, method, None) if req.method else None
    if specific is not None and specific.hyperparameters and req.hyperparameters:
        raise OpenAIError(400, "give hyperparameters either at the top level or in method."
                               f"{method}, not both", "hyperparameters")
    if method == "reinforcement":
        raise OpenAIError(400, "method 'reinforcement' is not supported", "method")
    if f.kind != method:
        holds = "preference pairs (method dpo)" if f.kind == "dpo" else \
            "chat examples (method supervised)"
        raise OpenAIError(400, f"the training file holds {holds} but the job's method is "
                               f"{method}", "training_file", "invalid_training_file")
    hp = (specific.hyperparameters if specific is not None else None) or req.hyperparameters
    n_epochs, batch_size, multiplier = (hp.n_epochs, hp.batch_size,
                                        hp.learning_rate_multiplier) if hp else (None,) * 3
    beta = getattr(hp, "beta", None)  # only method.dpo.hyperparameters holds one
    if isinstance(batch_size, int) and batch_size > settings.batch_size:
        raise OpenAIError(400, f"batch_size {batch_size} is larger than this server's "
                               f"--batch-size {settings.batch_size}", "hyperparameters")
    job = Job(id=new_job_id(), created_at=int(time.time()), model=req.model,
              training_file=f.id,
              n_epochs=n_epochs if isinstance(n_epochs, int) else 1,
              batch_size=batch_size if isinstance(batch_size, int) else settings.batch_size,
              lr_multiplier=float(multiplier) if isinstance(multiplier, (int, float)) else 1.0,
              seed=req.seed if req.seed is not None else random.randrange(2**31),
              suffix=req.suffix, metadata=req.metadata, method=method,
              beta=(float(beta) if isinstance(beta, (int, float)) else settings.beta)
              if method == "dpo" else None)
    try:
        return job_object(runner.create(job))
    except OSError as exc:
        raise OpenAIError(507, f"the job could not be journaled: {exc.strerror or exc}",
                          kind="server_error") from None


@router.get("/jobs", response_model=ListPage[FineTuningJob])
def list_jobs(engine: EngineDep, after: str | None = None,
              limit: int = Query(20, ge=1, le=100)) -> dict:
    result = page(_runner(engine).newest_first(), after, limit, "fine-tuning job")
    result["data"] = [job_object(j) for j in result["data"]]
    return result


@router.get("/jobs/{job_id}", response_model=FineTuningJob)
def retrieve_job(job_id: str, engine: EngineDep) -> FineTuningJob:
    return job_object(_job(_runner(engine), job_id))


@router.post("/jobs/{job_id}/cancel", response_model=FineTuningJob)
def cancel_job(job_id: str, engine: EngineDep) -> FineTuningJob:
    """Stops the job at the next step boundary (waiting for it, within reason); the weights
    stay as trained so far."""
    runner = _runner(engine)
    _job(runner, job_id)
    try:
        return job_object(runner.cancel(job_id))
    except JobFinished as exc:
        raise OpenAIError(400, str(exc), "fine_tuning_job_id", "job_not_cancellable") from None


@router.get("/jobs/{job_id}/events", response_model=ListPage[JobEvent])
def list_events(job_id: str, engine: EngineDep, after: str | None = None,
                limit: int = Query(20, ge=1, le=100)) -> dict:
    runner = _runner(engine)
    _job(runner, job_id)
    events = [JobEvent(**e) for e in runner.events(job_id)]
    return page(events, after, limit, "event")
