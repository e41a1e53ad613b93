"""The FastAPI application: routes, auth, lifespan."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import psutil
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from server.checkpointing import CheckpointService
from server.config import Settings
from server.journal import Journal
from server.runtime import Runtime, load_runtime
from server.schemas import (
    ChatExample,
    ExampleState,
    PromptExample,
    Status,
    TrainRequest,
    TrainResponse,
)
from server.tokenization import ExampleError, encode
from server.trainer import QueueFull, Trainer
from weight_mapping import shares_storage

router = APIRouter()
log = logging.getLogger("vllm_apollo.server")


def require_token(request: Request) -> None:
    key = request.app.state.settings.api_key
    if not key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), key.encode()):
        raise HTTPException(401, "missing or invalid bearer token",
                            headers={"WWW-Authenticate": "Bearer"})


def get_trainer(request: Request) -> Trainer:
    return request.app.state.trainer


TrainerDep = Annotated[Trainer, Depends(get_trainer)]


@router.get("/health")
def health(request: Request) -> dict:
    export = request.app.state.runtime.export
    if export is not None and not export.owner_alive():
        raise HTTPException(503, "the vLLM process that owns the weights has exited")
    return {"status": "ok"}


@router.get("/status", response_model=Status)
def status(request: Request, trainer: TrainerDep) -> Status:
    s = trainer.stats
    return Status(optimizer_steps=s.optimizer_steps, last_loss=s.last_loss,
                  examples_queued=trainer.queued, examples_trained=s.trained,
                  examples_failed=s.failed,
                  skipped_steps=getattr(trainer.optimizer, "skipped_steps", 0),
                  trained_tokens=s.trained_tokens,
                  model_path=request.app.state.runtime.model_path,
                  applied_steps=trainer.live.applied_steps(),
                  last_step_seconds=s.last_step_seconds,
                  last_write_seconds=s.last_write_seconds,
                  serving_stall_seconds=s.stall_seconds,
                  vllm_waited_seconds=trainer.live.vllm_stall_seconds(),
                  last_checkpoint=getattr(request.app.state.checkpoints, "last", None))


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(request: Request, trainer: TrainerDep) -> str:
    """Prometheus text format."""
    s = trainer.stats
    ckpt = getattr(request.app.state.checkpoints, "last", None) or {}
    rows = [
        ("examples_accepted_total", "counter", s.accepted),
        ("examples_trained_total", "counter", s.trained),
        ("examples_failed_total", "counter", s.failed),
        ("examples_queued", "gauge", trainer.queued),
        ("optimizer_steps_total", "counter", s.optimizer_steps),
        ("optimizer_skipped_steps_total", "counter",
         getattr(trainer.optimizer, "skipped_steps", 0)),
        ("loss", "gauge", s.last_loss if s.last_loss is not None else float("nan")),
        ("trained_tokens_total", "counter", s.trained_tokens),
        ("trained_tokens_per_second", "gauge",
         s.trained_tokens / s.train_seconds if s.train_seconds else 0.0),
        ("step_seconds", "gauge", s.last_step_seconds or 0.0),
        ("write_seconds", "gauge", s.last_write_seconds or 0.0),
        ("serving_stall_seconds_total", "counter", s.stall_seconds),
        ("vllm_waited_seconds_total", "counter", trainer.live.vllm_stall_seconds()),
        ("last_checkpoint_timestamp_seconds", "gauge", ckpt.get("at", 0.0)),
        ("last_checkpoint_bytes", "gauge", ckpt.get("bytes_written", 0)),
    ]
    return "".join(f"# TYPE vllm_apollo_{n} {t}\nvllm_apollo_{n} {float(v)!r}\n"
                   for n, t, v in rows)


@router.get("/memory")
def memory(request: Request) -> dict:
    """Proof that the trainer holds no copy of the weights: parameters whose memory lies in
    vLLM's exported tensors (by storage pointer), and this process's unique memory."""
    runtime = request.app.state.runtime
    params = list(runtime.model.parameters())
    tensors = runtime.export.tensors if runtime.export is not None else {}
    shared = sum(shares_storage(p, tensors) for p in params)
    return {"parameters": len(params), "parameters_in_vllm_memory": shared,
            "weight_bytes": sum(p.numel() * p.element_size() for p in params),
            "uss_bytes": psutil.Process().memory_full_info().uss}


@router.post("/train", response_model=TrainResponse, status_code=202,
             dependencies=[Depends(require_token)])
def train(body: TrainRequest, request: Request,
          trainer: TrainerDep) -> TrainResponse:
    """Validate and tokenize every example first: a request is queued whole or not at all."""
    settings: Settings = request.app.state.settings
    examples = body if isinstance(body, list) else [body]
    if not examples:
        raise HTTPException(422, "no examples in request")
    if len(examples) > settings.max_examples_per_request:
        raise HTTPException(413, f"{len(examples)} examples exceed the limit of "
                                 f"{settings.max_examples_per_request} per request")
    tokenizer = request.app.state.runtime.tokenizer
    encoded = []
    for i, ex in enumerate(examples):
        chat = ex.to_chat() if isinstance(ex, PromptExample) else ex
        assert isinstance(chat, ChatExample)
        try:
            encoded.append(encode(chat, tokenizer, settings.max_tokens_per_example))
        except ExampleError as exc:
            raise HTTPException(422, f"example {i}: {exc}") from None
    try:
        ids = trainer.submit(encoded)
    except QueueFull as exc:
        raise HTTPException(429, str(exc), headers={"Retry-After": "5"}) from None
    return TrainResponse(ids=ids, queued=trainer.queued)


@router.post("/checkpoint", dependencies=[Depends(require_token)])
def checkpoint(request: Request) -> dict:
    """Write the changed weights into the model's safetensors files, all or nothing."""
    service = request.app.state.checkpoints
    if service is None:
        raise HTTPException(409, "checkpointing is not available for this model")
    return service.sync()


@router.get("/examples/{example_id}", response_model=ExampleState,
            dependencies=[Depends(require_token)])
def example_state(example_id: str, trainer: TrainerDep) -> ExampleState:
    rec = trainer.records.get(example_id)
    if rec is None:
        raise HTTPException(404, f"no example with id {example_id!r}")
    return ExampleState(id=rec.id, state=rec.state, step=rec.step, reason=rec.reason)


def create_app(settings: Settings,
               runtime_factory: Callable[[Settings], Runtime] = load_runtime) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime = runtime_factory(settings)
        journal = None
        if settings.journal != "off" and (settings.journal != "auto" or runtime.export):
            path = settings.journal if settings.journal != "auto" else \
                Path(runtime.model_path) / ".apollo" / "examples.jsonl"
            journal = Journal(path)
        trainer = Trainer(runtime.model, runtime.optimizer,
                          pad_id=runtime.pad_id,
                          batch_size=settings.batch_size,
                          steps_per_batch=settings.steps_per_batch,
                          max_queue=settings.max_queue, journal=journal, live=runtime.live,
                          layerwise=settings.optimizer_mode == "layerwise",
                          group=runtime.group)
        app.state.runtime, app.state.trainer = runtime, trainer
        app.state.checkpoints = None
        if runtime.checkpointer is not None:
            service = CheckpointService(runtime.checkpointer, trainer,
                                        settings.checkpoint_every_steps,
                                        settings.checkpoint_every_seconds)
            trainer.after_batch.append(service.maybe_sync)
            app.state.checkpoints = service
        trainer.start()
        yield
        service = app.state.checkpoints
        if service is not None and settings.checkpoint_on_exit:
            trainer.stop(timeout=600.0, last=service.sync_on_exit)
        else:
            trainer.stop()
            unsaved = service.unsaved_steps() if service is not None else 0
            if unsaved > 0:
                log.warning("%d optimizer steps since the last checkpoint live only in vLLM's "
                            "memory and are gone when vLLM stops (POST /checkpoint first, or "
                            "--checkpoint-on-exit)", unsaved)
        if journal is not None:
            journal.close()

    app = FastAPI(title="vLLM live co-training", lifespan=lifespan)
    app.state.settings = settings
    app.include_router(router)

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            return JSONResponse({"detail": f"request body of {length} bytes exceeds the limit "
                                           f"of {settings.max_body_bytes} (--max-body-bytes)"},
                                status_code=413)
        return await call_next(request)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code,
                            headers=exc.headers)

    return app
