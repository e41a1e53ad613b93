"""The FastAPI application: the engine's lifespan, the routers, and the request guard (Host,
Origin, content type and body size: server/api/guards.py) in front of them.

Every JSON answer escapes non-ASCII: an error that echoes the request's own text (a lone
surrogate, which JSON lets a client send) must still encode, as a 422, never a 500."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from server.api import chat, console, observe, openai_files, openai_jobs, training, versions
from server.api.guards import RequestGuard
from server.api.openai_schemas import OpenAIError
from server.api.timeline import Timeline
from server.engine.wiring import Engine, attach_engine
from server.settings import Settings


class AsciiJSON(JSONResponse):
    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False,
                          separators=(",", ":")).encode()


def create_app(settings: Settings,
               build: Callable[[Settings], Engine] = attach_engine) -> FastAPI:
    """`build` makes the engine when the app starts (tests pass one around a local model)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = app.state.engine = build(settings)
        engine.start()
        timeline = app.state.timeline = Timeline(engine.trainer)  # the console's charts
        timeline.start()
        yield
        timeline.stop()
        engine.stop()

    app = FastAPI(title="vLLM live co-training", lifespan=lifespan,
                  default_response_class=AsciiJSON)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> AsciiJSON:
        return AsciiJSON({"detail": jsonable_encoder(exc.errors())}, status_code=422)

    @app.exception_handler(HTTPException)
    async def _refused(request: Request, exc: HTTPException) -> AsciiJSON:
        return AsciiJSON({"detail": exc.detail}, status_code=exc.status_code,
                         headers=exc.headers)
    @app.exception_handler(OpenAIError)
    async def _openai(request: Request, exc: OpenAIError) -> AsciiJSON:
        return AsciiJSON(exc.body(), status_code=exc.status)
    app.state.settings = settings
    app.state.stopping = threading.Event()  # set when the server starts shutting down
    app.include_router(observe.router)
    app.include_router(training.router)
    app.include_router(versions.router)
    app.include_router(versions.changes)
    app.include_router(openai_files.router)
    app.include_router(openai_jobs.router)
    app.include_router(chat.router)
    app.include_router(console.router)
    app.add_middleware(RequestGuard, bind_host=settings.host,
                       allowed_hosts=settings.allowed_hosts,
                       max_body_bytes=settings.max_body_bytes,
                       max_upload_bytes=settings.max_upload_bytes)
    return app


class Server(uvicorn.Server):
    """uvicorn's server. A shutdown (SIGTERM, Ctrl-C) waits for open connections to finish
    their responses, and an open console page's event stream never finishes: it is told to
    end (app.state.stopping) first."""

    def __init__(self, config: uvicorn.Config, stopping: threading.Event):
        super().__init__(config)
        self.stopping = stopping

    def handle_exit(self, sig, frame) -> None:
        self.stopping.set()
        super().handle_exit(sig, frame)
