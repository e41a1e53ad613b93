"""Which weights answered: a response header on every vLLM response, through vLLM's own
``--middleware`` option (the launcher passes ``--middleware
hooks.version_header.WeightVersionHeader``; vLLM adds the class with ``app.add_middleware``).

The live weight version lives in the export's shared counter (``weights.counter``, layout in
hooks/contract.py), which the trainer bumps inside the step lock with every change of the
weights. It is read when the request arrives and again when the response starts:

* ``x-apollo-weight-version: 12`` — every token came from weights version 12;
* ``x-apollo-weight-version: 12-14`` — the weights changed while the request ran: its tokens
  come from versions 12 to 14 (the range may include an update that landed just after the last
  token, never one that is missing);
* ``x-apollo-checkpoint: 2`` — with a single version, the weights equal checkpoint version 2
  (0: the original), as listed by the training server's GET /versions.

A streamed response (server-sent events) sends its headers with the first chunk, so it also
ends with an SSE comment line (ignored by SSE clients) carrying the range for the whole stream:
``: x-apollo-weight-version: 12-14`` just before ``data: [DONE]``.
"""

from __future__ import annotations

import os

from hooks import EXPORT_DIR_ENV
from hooks.consistency import UpdateCounter
from hooks.contract import WEIGHT_VERSION, unpack_weight_version

HEADER = b"x-apollo-weight-version"
CHECKPOINT_HEADER = b"x-apollo-checkpoint"
DONE = b"data: [DONE]"


def describe(first: int, last: int) -> list[tuple[bytes, bytes]]:
    """The headers for a request that started at raw counter `first` and ended at `last`."""
    v0, c0 = unpack_weight_version(first)
    v1, c1 = unpack_weight_version(last)
    if v0 != v1:
        return [(HEADER, f"{v0}-{v1}".encode())]
    named = c1 if c1 is not None else c0
    return [(HEADER, str(v1).encode())] + \
        ([(CHECKPOINT_HEADER, str(named).encode())] if named is not None else [])


def comment(first: int, last: int) -> bytes:
    return b"".join(b": " + k + b": " + v + b"\n" for k, v in describe(first, last)) + b"\n"


class WeightVersionHeader:
    """Pure ASGI middleware; does nothing where no export is configured."""

    def __init__(self, app, export_dir: str | None = None):
        self.app = app
        self._dir = export_dir or os.environ.get(EXPORT_DIR_ENV)
        self._counter: UpdateCounter | None = None

    def read(self) -> int | None:
        if self._counter is None:
            if not self._dir or not os.path.isdir(self._dir):
                return None
            try:
                self._counter = UpdateCounter(self._dir, WEIGHT_VERSION)
            except OSError:
                return None
        return self._counter.read()

    async def __call__(self, scope, receive, send) -> None:
        first = self.read() if scope["type"] == "http" else None
        if first is None:
            await self.app(scope, receive, send)
            return
        streaming = False

        async def send_stamped(message) -> None:
            nonlocal streaming
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k.lower() not in (HEADER, CHECKPOINT_HEADER)]
                headers += describe(first, self.read())
                streaming = any(k.lower() == b"content-type" and
                                v.lower().startswith(b"text/event-stream") for k, v in headers)
                message = {**message, "headers": headers}
            elif streaming and message["type"] == "http.response.body" and (
                    message.get("body", b"").startswith(DONE) or
                    not message.get("more_body", False)):
                streaming = False
                await send({"type": "http.response.body", "more_body": True,
                            "body": comment(first, self.read())})
            await send(message)

        await self.app(scope, receive, send_stamped)
