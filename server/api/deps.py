"""Dependencies shared by the routers: the engine of this process and the API key check."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from server.engine.trainer import Trainer
from server.engine.wiring import Engine
from server.settings import Settings


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


EngineDep = Annotated[Engine, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_trainer(engine: EngineDep) -> Trainer:
    return engine.trainer


TrainerDep = Annotated[Trainer, Depends(get_trainer)]


def key_given(request: Request, settings: Settings) -> bool:
    """No API key configured, or the request carries it ('Authorization: Bearer KEY')."""
    key = settings.api_key
    if not key:
        return True
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), key.encode())


def require_key(request: Request, settings: SettingsDep) -> None:
    """With an API key configured: 'Authorization: Bearer KEY' or 401."""
    if not key_given(request, settings):
        raise HTTPException(401, "missing or invalid bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
