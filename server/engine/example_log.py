"""The example log: every accepted example, durably, so none is lost or trained twice.

(Not to be confused with checkpoint/journal.py, the redo journal of a weight sync.)

An append-only JSON-lines file, one line per append, written whole and fsynced before the
HTTP 2xx:

* ``accept``: the request's examples (ids and tokens; for what is not a demonstration its
  ``kind``, and a pair's non-preferred answer under ``rejected``), all in one line, so a
  crash keeps a request whole or not at all;
* ``begin``: a batch's ids, its number of optimizer steps and the applied-step counter
  before it (the counter lives in vLLM's export, so it survives the trainer);
* ``done`` / ``fail``: the batch's outcome;
* ``cancel``: queued examples taken back before any batch began them (DELETE /examples/ID,
  a cancelled fine-tuning job);
* ``rollback``: trained examples a rollback took out of the live weights (``rolled_back``)
  or put back (``restored``: a rollback to a version that holds them).

An ``accept`` may carry a ``group`` (a fine-tuning job: its examples train in batches of their
own), ``lr`` (the learning-rate scale of those batches) and ``beta`` (their preference loss's
β, a DPO job's); all survive compaction.

An append that fails (a full disk, a short write) is cut off again (ftruncate + fsync) and
raises `NotLogged`: the caller must not acknowledge it, and the file stays a valid log. If
even that fails, or an fsync fails (the kernel may then have dropped the dirty pages: a later
fsync would lie), the log is `broken` and refuses every later append (`LogBroken`).

On start-up `restore` replays the file (example_replay.py: only a torn last line is
tolerated) and compacts it: finished examples shrink to ``trained`` / ``failed`` records,
examples still to train keep their tokens, an interrupted batch keeps a ``begin`` rebased on
the counter; written beside the old file and renamed over it. A compaction that cannot be
written (a full disk) leaves the old file, minus its torn tail.

One process per log: an exclusive `flock` on ``<log>.lock``, held for the process's life
(engine/exclusive.py).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import threading
from pathlib import Path

from checkpoint.durable import atomic_replace, write_all
from server.engine.example_replay import (
    NO_OPTIONS,
    ExampleLogError,
    Replayed,
    example_record,
    replay,
)
from server.engine.exclusive import hold_exclusive
from server.engine.tokenization import Encoded

log = logging.getLogger("vllm_apollo.example_log")
__all__ = ["ExampleLog", "ExampleLogError", "LogBroken", "NotLogged", "Replayed"]


class NotLogged(ExampleLogError):
    """The append did not reach the disk and was undone: nothing of it counts."""


class LogBroken(ExampleLogError):
    """The log can no longer be trusted; nothing more is appended to it."""


def _line(record: dict) -> bytes:
    return (json.dumps(record, separators=(",", ":")) + "\n").encode()


def _options(group: str | None, lr_scale: float, beta: float | None = None) -> dict:
    """An accept's non-default batch options (example_replay reads them back)."""
    return {**({"group": group} if group is not None else {}),
            **({"lr": lr_scale} if lr_scale != 1.0 else {}),
            **({"beta": beta} if beta is not None else {})}


def _open_nofollow(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ExampleLogError(f"{path} is a symbolic link; the example log and its lock "
                                  "must be regular files: remove it") from None
        raise


class ExampleLog:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if stat.S_ISLNK(os.lstat(self.path.parent).st_mode):
            raise ExampleLogError(f"{self.path.parent} is a symbolic link; give --journal a "
                                  "path in a real directory")
        self.broken: str | None = None
        self._lock = threading.Lock()
        self._lock_fd = hold_exclusive(self.path.with_name(self.path.name + ".lock"),
                                       f"the example log {self.path}")
        self._fd = _open_nofollow(self.path, os.O_CREAT | os.O_WRONLY | os.O_APPEND)
        self._size = os.fstat(self._fd).st_size  # what is known to be whole and durable

    # --- appends ---
    def _append(self, records: list[dict]) -> None:
        data = b"".join(_line(r) for r in records)
        with self._lock:
            if self.broken:
                raise LogBroken(self.broken)
            try:
                write_all(self._fd, data)
            except OSError as exc:
                self._undo(exc)
                raise NotLogged(f"the example log {self.path} could not be written "
                                f"({exc.strerror or exc}); nothing was logged") from exc
            try:
                os.fsync(self._fd)
            except OSError as exc:
                self._break(f"fsync of the example log {self.path} failed "
                            f"({exc.strerror or exc})")
                raise LogBroken(self.broken) from exc
            self._size += len(data)

    def _undo(self, cause: OSError) -> None:
        """Cut a failed append off again, durably; else the log is broken."""
        try:
            os.ftruncate(self._fd, self._size)
            os.fsync(self._fd)
        except OSError as exc:
            self._break(f"a failed append to the example log {self.path} "
                        f"({cause.strerror or cause}) could not be undone "
                        f"({exc.strerror or exc})")

    def _break(self, reason: str) -> None:
        self.broken = reason + "; restart the training server once the cause is fixed"
        log.critical("%s", self.broken)

    def accept(self, items: list[tuple[str, Encoded]], group: str | None = None,
               lr_scale: float = 1.0, beta: float | None = None) -> None:
        self._append([{"op": "accept", "items": [example_record(i, e) for i, e in items],
                       **_options(group, lr_scale, beta)}])

    def cancel(self, ids: list[str], reason: str) -> None:
        self._append([{"op": "cancel", "batch": ids, "reason": reason}])

    def begin(self, ids: list[str], steps: int, base: int) -> None:
        self._append([{"op": "begin", "batch": ids, "steps": steps, "base": base}])

    def done(self, ids: list[str], step: int, note: str | None = None) -> None:
        self._append([{"op": "done", "batch": ids, "step": step,
                       **({"note": note} if note else {})}])

    def fail(self, ids: list[str], reason: str) -> None:
        self._append([{"op": "fail", "batch": ids, "reason": reason}])

    def rollback(self, rolled_back: list[str], restored: list[str], reason: str) -> None:
        self._append([{"op": "rollback", "rolled_back": rolled_back, "restored": restored,
                       "reason": reason}])

    def close(self) -> None:
        os.close(self._fd)
        os.close(self._lock_fd)

    # --- start-up ---
    def replay(self, applied_steps: int) -> Replayed:
        """States from the file; `applied_steps` is the export's counter now. Raises
        ExampleLogCorrupt on any damage but a torn last line."""
        return replay(self.path, applied_steps)

    def restore(self, applied_steps: int) -> Replayed:
        """Replay, then compact (or at least cut the torn tail off): before any append."""
        state = self.replay(applied_steps)
        try:
            self.compact(state, applied_steps)
        except OSError as exc:
            log.warning("example log %s not compacted (%s): kept as it is", self.path,
                        exc.strerror or exc)
            with self._lock:
                if self._size != state.valid_bytes:
                    os.ftruncate(self._fd, state.valid_bytes)
                    os.fsync(self._fd)
                    self._size = state.valid_bytes
        return state

    def compact(self, state: Replayed, applied_steps: int) -> None:
        """Rewrite the log as `state` (from `replay(applied_steps)`), without the tokens of
        finished examples."""
        records: list[dict] = []
        for i, enc in state.accepted.items():
            kind = {"kind": state.kinds[i]} if i in state.kinds else {}
            if i in state.trained:
                records.append({"op": "trained", "id": i, "step": state.trained[i],
                                **({"note": state.notes[i]} if i in state.notes else {}),
                                **({"rolled_back": state.rolled_back[i]}
                                   if i in state.rolled_back else {}), **kind})
            elif i in state.failed:
                records.append({"op": "failed", "id": i, "reason": state.failed[i], **kind})
            elif i in state.cancelled:
                records.append({"op": "cancelled", "id": i, "reason": state.cancelled[i],
                                **kind})
            else:
                records.append({"op": "accept", **example_record(i, enc),
                                **_options(*state.options.get(i, NO_OPTIONS))})
        if state.unfinished is not None:
            ids, remaining = state.unfinished
            records.append({"op": "begin", "batch": ids, "steps": remaining,
                            "base": applied_steps})
        with self._lock:
            size = atomic_replace(self.path, [_line(r) for r in records], mode=0o600,
                                  tmp=self.path.with_name(self.path.name + ".compact"))
            os.close(self._fd)  # the old descriptor appends to the replaced file
            self._fd = _open_nofollow(self.path, os.O_WRONLY | os.O_APPEND)
            self._size = size
