"""Uploaded training files: streamed to disk, every line checked as it arrives.

An upload never sits in memory whole: each chunk is appended to ``<id>.part`` as it comes, and
only the line being read is held (at most `max_line_bytes`, the size of a /train request),
so a 200 MB file costs what one line costs. Each complete line goes to a validator (the API's
models: the rules /train applies); the first invalid lines are reported with their numbers and
reasons, and nothing of that upload is kept. A valid upload is fsynced, renamed to
``<id>.jsonl`` and described by ``<id>.json`` (written atomically): a job created from it
finds it again after a crash. Ids are generated here and checked against `FILE_ID` before any
path is built from them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from checkpoint.durable import atomic_replace, write_all

log = logging.getLogger("vllm_apollo.files")
FILE_ID = re.compile(r"file-[0-9a-f]{24}")
MAX_ERRORS = 10  # invalid lines named in one answer; past them the file is only drained
Validator = Callable[[bytes], str]  # a line's kind ("supervised", "dpo"), or ValueError


@dataclass
class StoredFile:
    id: str
    bytes: int
    created_ns: int
    filename: str
    purpose: str
    examples: int  # non-blank lines
    kind: str  # what every line holds: "supervised" (chat) or "dpo" (preference pairs)


class InvalidFile(ValueError):
    """The file's invalid lines (number, reason); `str()` says them as OpenAI's validation
    does: "Invalid file format. Line 137: ..."."""

    def __init__(self, errors: list[tuple[int, str]], more: bool = False):
        self.errors = errors
        said = "; ".join(f"Line {n}: {why}" if n else why for n, why in errors)
        super().__init__(f"Invalid file format. {said}"
                         + ("; later lines were not checked" if more else ""))


class Upload:
    """One upload in progress; `write` each chunk in order, then `finish` or `abort`."""

    def __init__(self, store: FileStore, filename: str, purpose: str, validate: Validator):
        self.store, self.filename, self.purpose, self.validate = store, filename, purpose, \
            validate
        self.id = "file-" + uuid.uuid4().hex[:24]
        self.part = store.directory / f"{self.id}.part"
        self._fd: int | None = os.open(self.part, os.O_CREAT | os.O_EXCL | os.O_WRONLY
                                       | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        self.bytes = self.lines = self.examples = 0
        self.kind: tuple[str, int] | None = None  # the first example's kind and line
        self.errors: list[tuple[int, str]] = []
        self._pieces: list[bytes] = []  # the current line so far
        self._held = 0
        self._too_long = False  # the current line passed the limit: skip to its end

    def write(self, chunk: bytes) -> None:
        self.bytes += len(chunk)
        if not self.errors:  # an invalid file is only drained, never stored
            write_all(self._fd, chunk)
        start = 0
        while (nl := chunk.find(b"\n", start)) >= 0:
            self._end_line(chunk[start:nl])
            start = nl + 1
        rest = chunk[start:]
        if rest and not self._too_long:
            self._pieces.append(rest)
            self._held += len(rest)
            if self._held > self.store.max_line_bytes:
                self._too_long = True
                self._pieces, self._held = [], 0
                self._error(self.lines + 1, f"the line is longer than "
                                            f"{self.store.max_line_bytes} bytes (--max-body-bytes)")

    def _end_line(self, tail: bytes) -> None:
        self.lines += 1
        raw = b"".join(self._pieces) + tail if not self._too_long else b""
        self._pieces, self._held, too_long, self._too_long = [], 0, self._too_long, False
        if too_long or len(self.errors) >= MAX_ERRORS:
            return
        if self.lines == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte-order mark
        if not raw.strip():
            return  # blank lines are skipped (but counted: line numbers are the file's)
        try:
            kind = self.validate(raw)
        except ValueError as exc:
            self._error(self.lines, str(exc))
            return
        if self.kind is None:
            self.kind = (kind, self.lines)
        elif kind != self.kind[0]:
            self._error(self.lines, f"a {kind} example in a file of {self.kind[0]} examples "
                                    f"(line {self.kind[1]}); a file holds one kind")
            return
        self.examples += 1

    def _error(self, line: int, why: str) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append((line, why))

    def finish(self) -> StoredFile:
        """Check the last line, then keep the file; raises InvalidFile (and keeps nothing)."""
        if self._pieces or self._too_long:
            self._end_line(b"")
        if not self.errors and not self.examples:
            self.errors.append((0, "the file holds no example"))
        if self.errors:
            self.abort()
            raise InvalidFile(self.errors, more=len(self.errors) >= MAX_ERRORS)
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        stored = StoredFile(self.id, self.bytes, time.time_ns(), self.filename, self.purpose,
                            self.examples, self.kind[0])
        os.rename(self.part, self.store.data_path(self.id))
        self.store.add(stored)
        return stored

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.part.unlink(missing_ok=True)


class FileStore:
    """The files of one training server, in `directory` (created 0700, never a link)."""

    def __init__(self, directory: str | os.PathLike, max_line_bytes: int,
                 temporary: bool = False):
        self.directory = Path(directory)
        self.max_line_bytes = max_line_bytes
        self.temporary = temporary
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if stat.S_ISLNK(os.lstat(self.directory).st_mode):
            raise OSError(f"{self.directory} is a symbolic link; the files directory must "
                          "be a real directory")
        self._lock = threading.Lock()
        self._files: dict[str, StoredFile] = {}
        for part in self.directory.glob("file-*.part"):  # uploads a crash cut short
            part.unlink()
        for meta in self.directory.glob("file-*.json"):
            try:
                f = StoredFile(**json.loads(meta.read_bytes()))
                if FILE_ID.fullmatch(f.id) and self.data_path(f.id).is_file():
                    self._files[f.id] = f
            except (ValueError, TypeError, OSError) as exc:
                log.warning("ignoring %s: %s", meta, exc)

    @classmethod
    def in_temporary_directory(cls, max_line_bytes: int) -> FileStore:
        """Without an example log files last as long as the process (and jobs do not
        survive it either)."""
        return cls(tempfile.mkdtemp(prefix="apollo-files-"), max_line_bytes, temporary=True)

    def data_path(self, file_id: str) -> Path:
        if not FILE_ID.fullmatch(file_id):
            raise KeyError(file_id)
        return self.directory / f"{file_id}.jsonl"

    def begin(self, filename: str, purpose: str, validate: Validator) -> Upload:
        return Upload(self, filename, purpose, validate)

    def add(self, f: StoredFile) -> None:
        atomic_replace(self.directory / f"{f.id}.json", [json.dumps(asdict(f)).encode()],
                       mode=0o600)
        with self._lock:
            self._files[f.id] = f

    def get(self, file_id: str) -> StoredFile | None:
        with self._lock:
            return self._files.get(file_id)

    def list(self) -> list[StoredFile]:
        """Oldest first."""
        with self._lock:
            return sorted(self._files.values(), key=lambda f: (f.created_ns, f.id))

    def delete(self, file_id: str) -> bool:
        with self._lock:
            if self._files.pop(file_id, None) is None:
                return False
        (self.directory / f"{file_id}.json").unlink(missing_ok=True)
        self.data_path(file_id).unlink(missing_ok=True)
        return True

    def close(self) -> None:
        if self.temporary:
            shutil.rmtree(self.directory, ignore_errors=True)
