"""The FastAPI application: the engine's lifespan, the routers and the body-size limit."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from server.api import observe, training
from server.engine.wiring import Engine, attach_engine
from server.settings import Settings


def create_app(settings: Settings,
               build: Callable[[Settings], Engine] = attach_engine) -> FastAPI:
    """`build` makes the engine when the app starts (tests pass one around a local model)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = app.state.engine = build(settings)
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="vLLM live co-training", lifespan=lifespan)
    app.state.settings = settings
    app.include_router(observe.router)
    app.include_router(training.router)

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            return JSONResponse({"detail": f"request body of {length} bytes exceeds the limit "
                                           f"of {settings.max_body_bytes} (--max-body-bytes)"},
                                status_code=413)
        return await call_next(request)

    return app
