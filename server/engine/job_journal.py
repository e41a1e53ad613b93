"""The jobs journal: every fine-tuning job's state and events, durably, beside the example log.

Append-only JSON lines, each fsynced before the change it records takes effect: ``job`` (the
job's whole state after a change) and ``event`` (one of its events). The last ``job`` line of
an id is its state. As in the example log, only a torn last line (an append a crash cut
short, never acted on) is tolerated; damage before it stops the start, naming the line. At
start-up the file is compacted to one ``job`` line per job and its last `keep_events` events.
Without a path (no example log) it keeps the same state in memory only.
"""

from __future__ import annotations

import json
import os
import threading
from collections import deque
from pathlib import Path

from checkpoint.durable import atomic_replace, write_all
from server.engine.example_replay import ExampleLogError


class JobJournal:
    def __init__(self, path: str | os.PathLike | None, keep_events: int):
        self.path = Path(path) if path is not None else None
        self.keep_events = keep_events
        self._lock = threading.Lock()
        self.jobs: dict[str, dict] = {}  # id -> state, in order of creation
        self.events: dict[str, deque[dict]] = {}
        self._fd: int | None = None
        if self.path is not None:
            self._replay()
            self._compact()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW
                               | os.O_CLOEXEC)

    def _replay(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.endswith(b"\n"):
                    break  # torn last line
                try:
                    rec = json.loads(raw)
                    if rec["op"] == "job" and isinstance(rec["job"]["id"], str):
                        self.jobs[rec["job"]["id"]] = rec["job"]
                    elif rec["op"] == "event" and rec["job"] in self.jobs:
                        self._event(rec["job"], rec["event"])
                    else:
                        raise ValueError(f"unknown record {str(rec.get('op'))[:40]!r}")
                except (ValueError, KeyError, TypeError) as exc:
                    raise ExampleLogError(
                        f"jobs journal {self.path}, line {n}: {str(exc)[:200]}. Only a torn "
                        "last line is repaired automatically; repair the line or move the file "
                        "aside (its jobs are then forgotten)") from None

    def _event(self, job_id: str, event: dict) -> None:
        self.events.setdefault(job_id, deque(maxlen=self.keep_events)).append(event)

    def _compact(self) -> None:
        lines = []
        for job_id, job in self.jobs.items():
            lines.append(_line({"op": "job", "job": job}))
            lines += [_line({"op": "event", "job": job_id, "event": e})
                      for e in self.events.get(job_id, ())]
        atomic_replace(self.path, lines, mode=0o600,
                       tmp=self.path.with_name(self.path.name + ".compact"))

    def append(self, job: dict | None = None, event: tuple[str, dict] | None = None) -> None:
        """Journal a job's new state and/or one event (job id, event); all or nothing."""
        records = ([{"op": "job", "job": job}] if job is not None else []) + (
            [{"op": "event", "job": event[0], "event": event[1]}] if event is not None else [])
        data = b"".join(_line(r) for r in records)
        with self._lock:
            if self._fd is not None:
                size = os.fstat(self._fd).st_size
                try:
                    write_all(self._fd, data)
                    os.fsync(self._fd)
                except OSError:
                    os.ftruncate(self._fd, size)  # an append never half-counts
                    raise
            if job is not None:
                self.jobs[job["id"]] = job
            if event is not None:
                self._event(*event)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _line(record: dict) -> bytes:
    return (json.dumps(record, separators=(",", ":")) + "\n").encode()
