"""The FastAPI application: the engine's lifespan, the routers, and the request guard (Host,
Origin, content type and body size: server/api/guards.py) in front of them."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server.api import observe, training
from server.api.guards import RequestGuard
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
    app.add_middleware(RequestGuard, bind_host=settings.host,
                       allowed_hosts=settings.allowed_hosts,
                       max_body_bytes=settings.max_body_bytes)
    return app
