"""A multipart/form-data body read as it streams in (python-multipart's push parser).

Starlette's `request.form()` would spool the whole upload to a temporary file before the
handler sees a byte; this hands each chunk of a file part on as it arrives, so an upload is
validated and written once, while it is received, in memory bounded by the chunk size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.multipart import MultipartParser, parse_options_header

MAX_FIELD_BYTES = 4096  # a non-file field (purpose, ...): anything longer is refused


class BadForm(ValueError):
    """The body is not the form it claims to be; the message says why."""


@dataclass
class Part:
    name: str
    filename: str | None  # None: a plain field
    data: list[bytes] = field(default_factory=list)  # a field's bytes (files pass through)


class FormReader:
    """Feed the body's chunks; each `feed` returns the events it completed, in order:
    ("begin", Part), ("data", Part, bytes) for file parts, ("end", Part)."""

    def __init__(self, content_type: str):
        kind, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise BadForm("expected a multipart/form-data body with a boundary")
        self._events: list[tuple] = []
        self._header: list[bytes] = [b"", b""]
        self._headers: dict[bytes, bytes] = {}
        self._part: Part | None = None
        self._ended = False
        self._parser = MultipartParser(boundary, {
            "on_part_begin": self._begin_part,
            "on_header_field": lambda d, s, e: self._add(0, d[s:e]),
            "on_header_value": lambda d, s, e: self._add(1, d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        })

    def _begin_part(self) -> None:
        self._headers, self._part = {}, None

    def _add(self, i: int, data: bytes) -> None:
        self._header[i] += data
        if len(self._header[i]) > MAX_FIELD_BYTES:
            raise BadForm("a part header is too long")

    def _header_end(self) -> None:
        self._headers[self._header[0].strip().lower()] = self._header[1].strip()
        self._header = [b"", b""]

    def _headers_finished(self) -> None:
        kind, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if kind != b"form-data" or b"name" not in options:
            raise BadForm("a part without Content-Disposition: form-data; name=...")
        filename = options.get(b"filename")
        self._part = Part(options[b"name"].decode("utf-8", "replace"),
                          filename.decode("utf-8", "replace") if filename is not None
                          else None)
        self._events.append(("begin", self._part))

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        if part.filename is not None:
            self._events.append(("data", part, bytes(data[start:end])))
        else:
            part.data.append(bytes(data[start:end]))
            if sum(map(len, part.data)) > MAX_FIELD_BYTES:
                raise BadForm(f"the field {part.name!r} is longer than {MAX_FIELD_BYTES} bytes")

    def _part_end(self) -> None:
        self._events.append(("end", self._part))

    def _end(self) -> None:
        self._ended = True

    def feed(self, chunk: bytes) -> list[tuple]:
        self._parser.write(chunk)
        events, self._events = self._events, []
        return events

    def close(self) -> None:
        """The body ended: it must have ended as a whole form."""
        self._parser.finalize()
        if not self._ended:
            raise BadForm("the multipart body ended before its closing boundary")
