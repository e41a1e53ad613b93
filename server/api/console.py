"""The browser console (docs/console.md): GET / serves the page, /console/app.js and
/console/style.css its script and style (plain files in server/console/: no build step,
nothing fetched from elsewhere), and GET /console/events streams what the page shows.

The stream is server-sent events, one snapshot a second per open page, whatever the page
shows, instead of one poll per panel: the status, the loss and drift points it has not seen
yet (api/timeline.py), the versions when they changed, and, for a caller with the API key
(or when none is configured), the recent examples, the ones it watches (`?watch=ID,...`: the
page's own lessons) and the fine-tuning jobs, which need the key elsewhere too. Every action
the page takes goes to the ordinary endpoints (/train, /checkpoint, /rollback, the jobs' cancel,
/v1/chat/completions), same origin, with the key as any client sends it.
"""

from __future__ import annotations

import asyncio
import json
import math
from itertools import islice
from pathlib import Path

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from server.api.chat import served_name
from server.api.deps import EngineDep, SettingsDep, key_given
from server.api.observe import status

router = APIRouter(include_in_schema=False)
STATIC = Path(__file__).resolve().parent.parent / "console"
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
# The page runs only its own script, talks only to this server and cannot be framed (a frame
# would let another site trick clicks on its buttons).
PAGE_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "x-frame-options": "DENY", "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer", "cache-control": "no-cache"}
RECENT = 50  # examples in each snapshot
WATCHED = 64  # most ids a page may watch
JOBS = 10
TICK = 1.0  # seconds between snapshots


@router.get("/")
def page() -> Response:
    return Response((STATIC / "index.html").read_bytes(), media_type="text/html; charset=utf-8",
                    headers=PAGE_HEADERS)


@router.get("/console/events")
async def events(request: Request, engine: EngineDep, settings: SettingsDep,
                 watch: str = Query("", max_length=WATCHED * 40)) -> StreamingResponse:
    ids = [i for i in watch.split(",") if i][-WATCHED:]  # the newest
    authorized = key_given(request, settings)
    timeline, stopping = request.app.state.timeline, request.app.state.stopping

    async def stream():
        view = _View(engine, settings, timeline, authorized, ids)
        yield b"retry: 2000\n\n"
        while not stopping.is_set():  # a shutdown waits for every open response to end
            snapshot = await run_in_threadpool(view.next)
            yield b"data: " + _dumps(snapshot) + b"\n\n"
            if await request.is_disconnected():
                return
            await asyncio.sleep(TICK)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})


@router.get("/console/{name}")  # after /console/events, which it would match
def asset(name: str) -> Response:
    if name not in ASSETS:
        raise HTTPException(404, f"no console file {name!r}")
    return Response((STATIC / name).read_bytes(), media_type=ASSETS[name],
                    headers=PAGE_HEADERS)


class _View:
    """What one page has been sent: its timeline cursor and the versions it last got."""

    def __init__(self, engine, settings, timeline, authorized: bool, watch: list[str]):
        self.engine, self.settings, self.timeline = engine, settings, timeline
        self.authorized, self.watch = authorized, watch
        self.cursor = 0
        self.versions_key = None

    def next(self) -> dict:
        engine, settings = self.engine, self.settings
        points = self.timeline.since(self.cursor)
        if points:
            self.cursor = points[-1]["seq"]
        out = {"model": served_name(engine, settings), "chat": bool(settings.vllm_url),
               "auth": {"required": bool(settings.api_key), "ok": self.authorized},
               "status": None, "points": points, "examples": None, "watched": None,
               "jobs": None}
        if self.authorized:
            records = engine.trainer.records  # the worker adds and drops records meanwhile:
            # copied in one C call, between which no other thread runs
            recent = list(islice(reversed(records.values()), RECENT))
            out["examples"] = [_example(r) for r in recent]
            out["watched"] = {i: _example(r) for i in self.watch
                              if (r := records.get(i)) is not None}
            out["jobs"] = _jobs(engine)
        # after the examples: an example shown trained is counted in the status too
        out["status"] = status(engine).model_dump(mode="json")
        key = self._versions_key()
        if key != self.versions_key:
            self.versions_key = key
            out["versions"] = self._versions()
        return out

    def _versions_key(self):
        engine = self.engine
        service = engine.versions
        last = engine.checkpoints.last if engine.checkpoints else None
        return (engine.trainer.coordinator.version.get(), (last or {}).get("at"),
                service.rollbacks if service else None)

    def _versions(self) -> dict:
        engine = self.engine
        if engine.versions is None:
            return {"disabled": "checkpointing is disabled for this model directory: "
                                f"{engine.checkpointing_disabled or 'no model directory'}"}
        try:
            return engine.versions.listing()
        except Exception as exc:  # e.g. a damaged history store: the page says so
            return {"error": f"{type(exc).__name__}: {exc}"}


def _example(rec) -> dict:
    return {"id": rec.id, "state": rec.state, "kind": rec.kind, "step": rec.step,
            "reason": rec.reason, "group": rec.group,
            "drift": rec.drift["mean_kl"] if rec.drift else None}


def _jobs(engine) -> list[dict] | None:
    if engine.jobs is None:
        return None
    return [{"id": j.id, "status": j.status, "method": j.method, "done": j.done,
             "total": j.total, "created_at": j.created_at, "finished_at": j.finished_at,
             "trained_tokens": j.trained_tokens, "model": j.model,
             "error": (j.error or {}).get("message")}
            for j in islice(engine.jobs.newest_first(), JOBS)]


def _finite(value):
    """JSON has no NaN or infinity: None instead (a loss that went non-finite)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _dumps(snapshot: dict) -> bytes:
    return json.dumps(_finite(snapshot), ensure_ascii=True, separators=(",", ":")).encode()
