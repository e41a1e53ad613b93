"""The example log: every accepted example, durably, so none is lost or trained twice.

(Not to be confused with checkpoint/journal.py, the redo journal of a weight sync.)

An append-only JSON-lines file, fsynced before the HTTP 2xx (one write + fsync per request):

* ``accept``: id and the tokenized example;
* ``begin``: a batch's ids, its number of optimizer steps and the applied-step counter
  before it (the counter lives in vLLM's export, so it survives the trainer);
* ``done`` / ``fail``: the batch's outcome.

On start-up, `replay` rebuilds every example's state. A batch that began but has no outcome
is resolved with the applied-step counter: steps it already applied are not repeated; the
rest of its steps run again. If the process dies *during* an in-place write (milliseconds),
that step counts as not applied and runs again.

`compact` then rewrites the file with what is still needed: finished examples shrink to
``trained`` / ``failed`` records (id and outcome, no tokens), examples still to train keep
their tokens, an interrupted batch keeps a ``begin`` rebased on the counter. The new file is
written beside the old one, fsynced and renamed over it: a crash leaves one or the other.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from server.engine.tokenization import Encoded


@dataclass
class Replayed:
    # in order of acceptance; None for a finished example whose tokens were compacted away
    accepted: dict[str, Encoded | None] = field(default_factory=dict)
    trained: dict[str, int] = field(default_factory=dict)  # id -> step
    notes: dict[str, str] = field(default_factory=dict)  # id -> how it was trained
    failed: dict[str, str] = field(default_factory=dict)  # id -> reason
    # a batch that began and has no outcome: (ids, steps still to run; 0 = all applied)
    unfinished: tuple[list[str], int] | None = None
    pending: list[str] = field(default_factory=list)  # accepted, never begun, in order


class ExampleLog:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fd = os.open(self.path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)

    def _append(self, records: list[dict]) -> None:
        data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()
        with self._lock:
            os.write(self._fd, data)
            os.fsync(self._fd)

    def accept(self, items: list[tuple[str, Encoded]]) -> None:
        self._append([{"op": "accept", "id": i, "ids": e.input_ids, "labels": e.labels}
                      for i, e in items])

    def begin(self, ids: list[str], steps: int, base: int) -> None:
        self._append([{"op": "begin", "batch": ids, "steps": steps, "base": base}])

    def done(self, ids: list[str], step: int, note: str | None = None) -> None:
        self._append([{"op": "done", "batch": ids, "step": step,
                       **({"note": note} if note else {})}])

    def fail(self, ids: list[str], reason: str) -> None:
        self._append([{"op": "fail", "batch": ids, "reason": reason}])

    def close(self) -> None:
        os.close(self._fd)

    def compact(self, state: Replayed, applied_steps: int) -> None:
        """Rewrite the journal as `state` (from `replay(applied_steps)`), without the tokens
        of finished examples."""
        records: list[dict] = []
        for i, enc in state.accepted.items():
            if i in state.trained:
                records.append({"op": "trained", "id": i, "step": state.trained[i],
                                **({"note": state.notes[i]} if i in state.notes else {})})
            elif i in state.failed:
                records.append({"op": "failed", "id": i, "reason": state.failed[i]})
            else:
                records.append({"op": "accept", "id": i, "ids": enc.input_ids,
                                "labels": enc.labels})
        if state.unfinished is not None:
            ids, remaining = state.unfinished
            records.append({"op": "begin", "batch": ids, "steps": remaining,
                            "base": applied_steps})
        tmp = self.path.with_name(self.path.name + ".compact")
        data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()
        with self._lock:
            fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            os.close(self._fd)  # the old descriptor appends to the replaced file
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def replay(self, applied_steps: int) -> Replayed:
        """States from the file; `applied_steps` is the export's counter now."""
        out = Replayed()
        open_batch: dict | None = None
        if not self.path.exists():
            return out
        with open(self.path, "rb") as f:
            for raw in f:
                try:
                    rec = json.loads(raw)
                except ValueError:
                    break  # a torn last line: its request never got a 2xx
                op = rec["op"]
                if op == "accept":
                    out.accepted[rec["id"]] = Encoded(rec["ids"], rec["labels"])
                elif op == "begin":
                    open_batch = rec
                elif op == "done":
                    out.trained.update({i: rec["step"] for i in rec["batch"]})
                    if "note" in rec:
                        out.notes.update({i: rec["note"] for i in rec["batch"]})
                    open_batch = None
                elif op == "fail":
                    out.failed.update({i: rec["reason"] for i in rec["batch"]})
                    open_batch = None
                elif op == "trained":  # compacted
                    out.accepted[rec["id"]], out.trained[rec["id"]] = None, rec["step"]
                    if "note" in rec:
                        out.notes[rec["id"]] = rec["note"]
                elif op == "failed":
                    out.accepted[rec["id"]], out.failed[rec["id"]] = None, rec["reason"]
        if open_batch is not None:
            done_steps = max(0, min(open_batch["steps"], applied_steps - open_batch["base"]))
            out.unfinished = (open_batch["batch"], open_batch["steps"] - done_steps)
        begun = set(out.trained) | set(out.failed) | set(out.unfinished[0] if out.unfinished
                                                         else [])
        out.pending = [i for i in out.accepted if i not in begun]
        return out
