"""The FastAPI application: the engine's lifespan, the routers, and the request guard (Host,
Origin, content type and body size: server/api/guards.py) in front of them.

Every JSON answer escapes non-ASCII: an error that echoes the request's own text (a lone
surrogate, which JSON lets a client send) must still encode, as a 422, never a 500."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from server.api import observe, openai_files, openai_jobs, training, versions
from server.api.guards import RequestGuard
from server.api.openai_schemas import OpenAIError
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
        yield
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
    app.include_router(observe.router)
    app.include_router(training.router)
    app.include_router(versions.router)
    app.include_router(versions.changes)
    app.include_router(openai_files.router)
    app.include_router(openai_jobs.router)
    app.add_middleware(RequestGuard, bind_host=settings.host,
                       allowed_hosts=settings.allowed_hosts,
                       max_body_bytes=settings.max_body_bytes,
                       max_upload_bytes=settings.max_upload_bytes)
    return app
