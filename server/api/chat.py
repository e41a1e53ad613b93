"""POST /v1/chat/completions: chat with the served model through the training server.

The browser console talks to one origin with one key; this forwards its chats to vLLM's
OpenAI API (--vllm-url, set by the launcher) and relays the answer as it comes, server-sent
events included, so tokens stream. Only this one path of vLLM is reachable through here: never
its dev endpoints. `model` may be left out: the served model's name is filled in.

Keys: with a key configured here, a chat needs it like every other endpoint (401), and vLLM is
asked with vLLM's own key (VLLM_API_KEY, from the launcher's environment). Without one, the
caller's own Authorization header goes to vLLM unchanged and nothing is added: this server
never lets a caller past vLLM's key without a key of its own.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Body, Depends, HTTPException, Request
from fastapi.responses import Response, StreamingResponse

from server.api.deps import EngineDep, SettingsDep, require_key

router = APIRouter(dependencies=[Depends(require_key)])
RELAYED = ("content-type", "x-apollo-weight-version", "x-apollo-checkpoint", "x-request-id")
TIMEOUT = httpx.Timeout(connect=10.0, read=600.0, write=60.0, pool=10.0)


def served_name(engine, settings) -> str:
    """The name vLLM serves the model under: its first --served-model-name, else the path."""
    names = [n.strip() for n in settings.served_model_name.split(",") if n.strip()]
    return names[0] if names else engine.model_path


@router.post("/v1/chat/completions")
async def chat(body: Annotated[dict[str, Any], Body()], request: Request, engine: EngineDep,
               settings: SettingsDep) -> Response:
    if not settings.vllm_url:
        raise HTTPException(503, "no vLLM to forward chats to: this server was started "
                                 "without --vllm-url (the launcher sets it)")
    body.setdefault("model", served_name(engine, settings))
    headers = {"content-type": "application/json", "accept-encoding": "identity",
               "accept": request.headers.get("accept", "*/*")}
    if settings.api_key:
        if settings.vllm_api_key:
            headers["authorization"] = f"Bearer {settings.vllm_api_key}"
    elif "authorization" in request.headers:
        headers["authorization"] = request.headers["authorization"]
    client = httpx.AsyncClient(timeout=TIMEOUT)
    url = f"{settings.vllm_url.rstrip('/')}/v1/chat/completions"
    try:
        upstream = await client.send(client.build_request(
            "POST", url, content=json.dumps(body).encode(), headers=headers), stream=True)
    except httpx.HTTPError as exc:
        await client.aclose()
        raise HTTPException(502, f"vLLM at {settings.vllm_url} did not answer: "
                                 f"{type(exc).__name__}: {exc}") from None

    async def relay() -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.aiter_bytes():
                yield chunk
        finally:  # also when the caller goes away: vLLM then stops generating
            await upstream.aclose()
            await client.aclose()

    kept = {k: v for k, v in upstream.headers.items() if k.lower() in RELAYED}
    if "text/event-stream" in kept.get("content-type", ""):
        kept["cache-control"] = "no-cache"
    return StreamingResponse(relay(), status_code=upstream.status_code, headers=kept)
