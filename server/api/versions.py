"""Versions of the served model: GET /versions (what each checkpoint holds, which can still be
restored) and POST /rollback (the live weights become a version's, in place)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException

from server.api.deps import EngineDep, require_key
from server.api.schemas import RollbackRequest, RollbackResult, VersionsList
from server.engine.checkpointing import CheckpointBusy
from server.engine.records import Unavailable
from server.engine.versions import RollbackRefused, UnknownVersion

router = APIRouter()
changes = APIRouter(dependencies=[Depends(require_key)])


def _service(engine):
    if engine.versions is None:
        why = engine.checkpointing_disabled or "no model directory"
        raise HTTPException(409, "no versions: checkpointing is disabled for this model "
                                 f"directory ({why})")
    return engine.versions


@router.get("/versions", response_model=VersionsList)
def versions(engine: EngineDep) -> VersionsList:
    return VersionsList(**_service(engine).listing())


@changes.post("/rollback", response_model=RollbackResult)
def rollback(body: RollbackRequest, engine: EngineDep) -> RollbackResult:
    """The live weights become exactly version `to` ("last-checkpoint", a number or
    "original"); serving stalls only for the writes. 404: no such version; 409: its bytes are
    not kept, a checkpoint is in progress, or the history store or the files cannot be
    trusted; nothing changed then."""
    service = _service(engine)
    try:
        return RollbackResult(**service.rollback(body.to))
    except UnknownVersion as exc:
        raise HTTPException(404, str(exc)) from None
    except (RollbackRefused, CheckpointBusy) as exc:
        raise HTTPException(409, str(exc)) from None
    except Unavailable as exc:
        raise HTTPException(503, str(exc)) from None
