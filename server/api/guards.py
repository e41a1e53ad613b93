"""What every request passes before any router sees it (one pure ASGI middleware).

* Host: a loopback address, ``localhost``, the bind address or a name in --allowed-hosts,
  else 403. A web page the user visits can make a name of its own resolve to 127.0.0.1 (DNS
  rebinding) and then read and post as a same-origin page; its requests still carry its name.
  An IP literal cannot be rebound: bound beyond loopback (with a key, settings.py), any IP
  literal is accepted, so the server answers at its LAN address without naming it.
* Origin: a request that may change the model (any method but GET / HEAD / OPTIONS) carrying
  an Origin other than the server's own is refused (403): browsers send Origin with every
  cross-origin POST, so a page elsewhere cannot post, even without a key.
* Content type: a body must be JSON (415). HTML forms (urlencoded, multipart, text/plain)
  post cross-site without a CORS preflight; JSON never does.
* Size: the body is read here, counting the bytes actually received (chunked bodies too),
  and refused with 413 past --max-body-bytes before the application parses anything.
* Uploads (POST /v1/files only): a multipart/form-data body is allowed, and it is not read
  here but streamed to the handler, counted as it passes, up to --max-upload-bytes
  (`BodyTooLarge` past it). A form can post a file cross-site, but storing a file changes no
  weight; every endpoint that trains (a job's creation included) still takes JSON only, and
  a browser's cross-origin upload carries an Origin, refused as above.

Starlette's TrustedHostMiddleware checks only the Host, and Jupyter's handlers check Host and
Origin the same way; this does both, plus the body, without buffering beyond the limit.
"""

from __future__ import annotations

import ipaddress
import json
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.settings import is_loopback

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
UPLOAD_PATH = "/v1/files"


class BodyTooLarge(Exception):
    """An upload passed --max-upload-bytes while streaming (raised by its `receive`)."""


def _is_upload(scope: Scope) -> bool:
    return scope["method"] == "POST" and scope["path"].rstrip("/") == UPLOAD_PATH


def host_name(host: str) -> str:
    """The name or address in a Host header, without the port: "[::1]:8001" -> "::1"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_json(content_type: str) -> bool:
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/")
                                          and kind.endswith("+json"))


def _is_form(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "multipart/form-data"


class RequestGuard:
    def __init__(self, app: ASGIApp, *, bind_host: str, allowed_hosts: str,
                 max_body_bytes: int, max_upload_bytes: int | None = None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes if max_upload_bytes is not None else \
            max_body_bytes
        names = {h.strip().lower() for h in allowed_hosts.split(",") if h.strip()}
        self.any_host = "*" in names
        self.suffixes = tuple(n[1:] for n in names if n.startswith("*."))
        self.names = {n for n in names if not n.startswith("*.")} | {"localhost",
                                                                     host_name(bind_host)}
        self.any_ip = not is_loopback(bind_host)

    def host_allowed(self, host: str) -> bool:
        name = host_name(host)
        if self.any_host or name in self.names or (self.suffixes and
                                                     name.endswith(self.suffixes)):
            return True
        try:
            return self.any_ip or ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if not self.host_allowed(host):
            await _reply(send, 403, f"Host {host!r} is not allowed: this server answers to "
                                    "loopback addresses, localhost and its bind address; add "
                                    "a name with --allowed-hosts")
            return
        if scope["method"] not in SAFE_METHODS:
            origin = headers.get("origin")
            if origin is not None and (urlsplit(origin).scheme not in ("http", "https")
                                       or urlsplit(origin).netloc.lower() != host.lower()):
                await _reply(send, 403, f"cross-origin request from {origin!r} refused: "
                                        "requests that change the model must come from this "
                                        "server's own origin or from a non-browser client")
                return
            content_type = headers.get("content-type")
            has_body = content_type is not None or "transfer-encoding" in headers or \
                headers.get("content-length", "0") != "0"
            upload = _is_upload(scope)
            if has_body and not _is_json(content_type or "") and not (
                    upload and _is_form(content_type or "")):
                await _reply(send, 415, f"content type {content_type!r} refused: send "
                                        "application/json" + (" or multipart/form-data"
                                                              if upload else ""))
                return
            if upload:
                await self._stream_upload(scope, receive, send, headers.get("content-length"))
                return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await _reply(send, 413, f"request body of {length} bytes exceeds the limit of "
                                    f"{self.max_body_bytes} (--max-body-bytes)")
            return
        body = await self._read_body(receive)
        if body is None:
            await _reply(send, 413, f"request body exceeds the limit of {self.max_body_bytes} "
                                    "bytes (--max-body-bytes)")
            return
        await self.app(scope, _replay(body, receive), send)

    async def _stream_upload(self, scope: Scope, receive: Receive, send: Send,
                             length: str | None) -> None:
        limit = self.max_upload_bytes
        if length is not None and (not length.isdigit() or int(length) > limit):
            await _reply(send, 413, f"upload of {length} bytes exceeds the limit of {limit} "
                                    "(--max-upload-bytes)")
            return
        size = 0

        async def counted() -> Message:
            nonlocal size
            message = await receive()
            size += len(message.get("body", b""))
            if size > limit:
                raise BodyTooLarge(f"the upload exceeds the limit of {limit} bytes "
                                   "(--max-upload-bytes)")
            return message

        await self.app(scope, counted, send)

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None as soon as it passes the limit (the rest is not read)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # http.disconnect, when it comes

    return replay


async def _reply(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
