"""Endpoints that change the model or read what it was taught: /train, /examples, /checkpoint.
Each needs the API key when one is configured. (OpenAI's files and fine-tuning jobs:
openai_files.py, openai_jobs.py.)"""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException

from checkpoint import CheckpointRefused
from server.api.deps import EngineDep, SettingsDep, TrainerDep, require_key
from server.api.schemas import (
    CheckpointResult,
    DriftRebased,
    ExampleState,
    TrainRequest,
    TrainResponse,
)
from server.engine.checkpointing import CheckpointBusy
from server.engine.example_log import ExampleLogError, NotLogged
from server.engine.records import QueueFull, Unavailable
from server.engine.tokenization import ExampleError, encode_lesson

router = APIRouter(dependencies=[Depends(require_key)])


@router.post("/train", response_model=TrainResponse, status_code=202)
def train(body: TrainRequest, engine: EngineDep, settings: SettingsDep) -> TrainResponse:
    """Validate and tokenize every example first: a request is queued whole or not at all."""
    if (reason := engine.problem()) is not None:
        raise HTTPException(503, f"not accepting examples: {reason}")
    examples = body if isinstance(body, list) else [body]
    if not examples:
        raise HTTPException(422, "no examples in request")
    if len(examples) > settings.max_examples_per_request:
        raise HTTPException(413, f"{len(examples)} examples exceed the limit of "
                                 f"{settings.max_examples_per_request} per request")
    encoded = []
    for i, ex in enumerate(examples):
        lesson = ex.lesson()
        try:
            encoded.append(encode_lesson(lesson.kind, lesson.messages, engine.tokenizer,
                                         settings.max_tokens_per_example,
                                         rejected=lesson.rejected,
                                         max_messages=settings.max_messages_per_example,
                                         max_chars=settings.max_chars_per_example))
        except ExampleError as exc:
            raise HTTPException(422, f"example {i}: {exc}") from None
    try:
        ids = engine.trainer.submit(encoded)
    except QueueFull as exc:
        raise HTTPException(429, str(exc), headers={"Retry-After": "5"}) from None
    except NotLogged as exc:  # e.g. a full disk: nothing was accepted
        raise HTTPException(507, str(exc)) from None
    except (Unavailable, ExampleLogError) as exc:
        raise HTTPException(503, f"not accepting examples: {exc}") from None
    return TrainResponse(ids=ids, queued=engine.trainer.queued)


@router.get("/examples/{example_id}", response_model=ExampleState)
def example_state(example_id: str, trainer: TrainerDep) -> ExampleState:
    rec = trainer.records.get(example_id)
    if rec is None:
        raise HTTPException(404, f"no example with id {example_id!r} (of finished examples, "
                                 "the last --keep-finished-records are kept in memory)")
    return ExampleState(id=rec.id, state=rec.state, kind=rec.kind, step=rec.step,
                        reason=rec.reason, drift=rec.drift)


@router.delete("/examples/{example_id}", response_model=ExampleState)
def withdraw_example(example_id: str, trainer: TrainerDep) -> ExampleState:
    """Take back an example still waiting in the queue (journaled: it is never trained, even
    after a restart). One being trained, or finished, can no longer be taken back: 409."""
    rec = trainer.records.get(example_id)
    if rec is None:
        raise HTTPException(404, f"no example with id {example_id!r}")
    if rec.group is not None:
        raise HTTPException(409, f"example {example_id} belongs to fine-tuning job {rec.group}: "
                                 "cancel the job instead")
    if rec.state != "queued":
        raise HTTPException(409, f"example {example_id} is already {rec.state}")
    try:
        taken = trainer.withdraw([example_id], "withdrawn by DELETE /examples")
    except NotLogged as exc:
        raise HTTPException(507, str(exc)) from None
    except ExampleLogError as exc:
        raise HTTPException(503, str(exc)) from None
    if not taken:
        raise HTTPException(409, f"example {example_id} is being trained now (or just was): "
                                 "it can no longer be taken back")
    return ExampleState(id=rec.id, state=rec.state, reason=rec.reason)


@router.post("/drift/rebase", response_model=DriftRebased)
def rebase_drift(engine: EngineDep) -> DriftRebased:
    """The live model's answers to the probes become the reference drift is measured from
    (and the budget applies to). Runs between batches."""
    monitor = engine.trainer.monitor
    if monitor is None:
        raise HTTPException(409, "no drift monitor (--drift-probes 0, or tensor parallelism)")
    engine.trainer.run_in_worker(lambda: monitor.rebase(engine.model), always=True)
    return DriftRebased(probes=len(monitor.reference))


@router.post("/checkpoint", response_model=CheckpointResult)
def checkpoint(engine: EngineDep) -> CheckpointResult:
    """Write the changed weights into the model's safetensors files, all or nothing."""
    if engine.checkpoints is None:
        raise HTTPException(409, "checkpointing is disabled for this model directory: "
                                 f"{engine.checkpointing_disabled or 'no model directory'}")
    try:
        return CheckpointResult(**engine.checkpoints.sync())
    except CheckpointBusy as exc:
        raise HTTPException(409, str(exc)) from None
    except CheckpointRefused as exc:
        raise HTTPException(409, f"checkpoint refused, nothing written: {exc}") from None
    except Unavailable as exc:
        raise HTTPException(503, str(exc)) from None
