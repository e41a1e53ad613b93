"""hooks/version_header.py: every response says which weights answered; a request that spans
an update says so (a range); registered through vLLM's own --middleware mechanism."""

import argparse
import asyncio

import httpx
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, StreamingResponse

from hooks.consistency import UpdateCounter
from hooks.contract import WEIGHT_VERSION, pack_weight_version
from hooks.version_header import WeightVersionHeader


def _app(counter: UpdateCounter) -> FastAPI:
    app = FastAPI()

    @app.get("/still")
    async def still():
        return PlainTextResponse("same weights")

    @app.get("/update")
    async def update():  # the trainer applies two steps while this request runs
        counter.add(pack_weight_version(7, None) - counter.read())
        return PlainTextResponse("answered across an update")

    @app.get("/stream")
    async def stream():
        async def events():
            yield b"data: {\"token\": 1}\n\n"
            counter.add(pack_weight_version(9, None) - counter.read())
            yield b"data: {\"token\": 2}\n\n"
            yield b"data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def _get(app, path):
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            return await client.get(path)
    return asyncio.run(go())


def test_responses_carry_the_weight_version_and_a_range_across_updates(tmp_path):
    counter = UpdateCounter(tmp_path, WEIGHT_VERSION)
    counter.add(pack_weight_version(5, 2))  # weights version 5, equal to checkpoint 2
    app = WeightVersionHeader(_app(counter), export_dir=str(tmp_path))
    r = _get(app, "/still")
    assert r.headers["x-apollo-weight-version"] == "5"
    assert r.headers["x-apollo-checkpoint"] == "2"
    r = _get(app, "/update")
    assert r.headers["x-apollo-weight-version"] == "5-7"
    assert "x-apollo-checkpoint" not in r.headers
    r = _get(app, "/stream")
    assert r.headers["x-apollo-weight-version"] == "7"  # when the stream started
    events = r.text.split("\n\n")
    assert events[-3:] == [": x-apollo-weight-version: 7-9", "data: [DONE]", ""], events


def test_without_an_export_nothing_is_added(tmp_path):
    app = WeightVersionHeader(_app(UpdateCounter(tmp_path, "other")),
                              export_dir=str(tmp_path / "missing"))
    r = _get(app, "/still")
    assert r.status_code == 200 and "x-apollo-weight-version" not in r.headers


def test_vllm_adds_it_from_its_middleware_option(tmp_path, monkeypatch):
    """vLLM 0.32's own registration (init_entrypoints_middleware, `--middleware` values)."""
    from vllm.entrypoints.serve.middleware.register import init_entrypoints_middleware

    monkeypatch.setenv("VLLM_APOLLO_EXPORT_DIR", str(tmp_path))
    counter = UpdateCounter(tmp_path, WEIGHT_VERSION)
    counter.add(pack_weight_version(3, None))
    app = _app(counter)
    args = argparse.Namespace(
        allowed_origins=["*"], allow_credentials=False, allowed_methods=["*"],
        allowed_headers=["*"], api_key=None, enable_request_id_headers=False,
        middleware=["hooks.version_header.WeightVersionHeader"])
    init_entrypoints_middleware(args, app, ())
    r = _get(app, "/still")
    assert r.headers["x-apollo-weight-version"] == "3" and "x-apollo-checkpoint" not in r.headers
