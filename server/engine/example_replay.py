"""Reading the example log back (example_log.py writes it): every example's state.

Only one kind of damage is tolerated: a torn last line (bytes after the last newline), the
append a crash cut short; its request never got a 2xx, since every append is one line,
fsynced before the answer. Anything else (a line that is not a valid record in the middle,
an outcome for a batch never begun, an example accepted twice) raises `ExampleLogCorrupt`
naming the line, and the server does not start: past that line there may be acknowledged
examples or outcomes, and skipping the line could lose an example or train one twice. Only a
person can decide what such a file means.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from server.engine.tokenization import KINDS, Encoded


class ExampleLogError(RuntimeError):
    """The example log cannot be used as it is; the message says why."""


class ExampleLogCorrupt(ExampleLogError):
    def __init__(self, path: Path, line: int, why: str):
        super().__init__(
            f"example log {path}, line {line}: {why}. Only a torn last line is repaired "
            "automatically; the server will not guess past damage (acknowledged examples may "
            "follow it). Repair the line, or move the file aside to start a new log (the "
            "examples it holds are then forgotten).")


@dataclass
class Replayed:
    # in order of acceptance; None for a finished example whose tokens were compacted away
    accepted: dict[str, Encoded | None] = field(default_factory=dict)
    trained: dict[str, int] = field(default_factory=dict)  # id -> step
    notes: dict[str, str] = field(default_factory=dict)  # id -> how it was trained
    failed: dict[str, str] = field(default_factory=dict)  # id -> reason
    rolled_back: dict[str, str] = field(default_factory=dict)  # trained, then rolled back: why
    cancelled: dict[str, str] = field(default_factory=dict)  # id -> reason, never begun
    # id -> (group, lr, beta), for examples accepted with other than NO_OPTIONS
    options: dict[str, tuple[str | None, float, float | None]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)  # id -> what it teaches, if recorded
    # a batch that began and has no outcome: (ids, steps still to run; 0 = all applied)
    unfinished: tuple[list[str], int] | None = None
    pending: list[str] = field(default_factory=list)  # accepted, never begun, in order
    valid_bytes: int = 0  # the file's length without a torn last line


def _int(v, lo: int = 0) -> bool:
    return type(v) is int and v >= lo


def _ids(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(i, str) for i in v)


NO_OPTIONS = (None, 1.0, None)  # a live example's: no group, --lr, --beta


def _positive(v) -> bool:
    return type(v) in (int, float) and 0 < v < float("inf")


def _options(rec: dict) -> tuple[str | None, float, float | None]:
    group, lr, beta = rec.get("group"), rec.get("lr", 1.0), rec.get("beta")
    if not (group is None or isinstance(group, str)) or not _positive(lr) or \
            not (beta is None or _positive(beta)):
        raise ValueError("not a valid group, learning-rate scale or beta")
    return group, float(lr), None if beta is None else float(beta)


def example_record(i: str, e: Encoded) -> dict:
    """An accepted example as the log keeps it (`_example` reads it back)."""
    return {"id": i, "ids": e.input_ids, "labels": e.labels,
            **({"kind": e.kind} if e.kind != "demo" else {}),
            **({"rejected": {"ids": e.rejected.input_ids, "labels": e.rejected.labels}}
               if e.rejected is not None else {})}


def _tokens(rec) -> Encoded:
    ids, labels = rec.get("ids"), rec.get("labels")
    if not (isinstance(ids, list) and isinstance(labels, list) and len(ids) == len(labels)
            and all(map(_int, ids)) and all(type(x) is int for x in labels)):
        raise ValueError("not a valid accepted example")
    return Encoded(ids, labels)


def _example(rec: dict) -> tuple[str, Encoded]:
    i, kind = rec.get("id"), rec.get("kind", "demo")
    if not isinstance(i, str) or kind not in KINDS or (kind == "pair") != ("rejected" in rec):
        raise ValueError("not a valid accepted example")
    out = _tokens(rec)
    out.kind = kind
    if kind == "pair":
        if not isinstance(rec["rejected"], dict):
            raise ValueError("not a valid accepted example")
        out.rejected = _tokens(rec["rejected"])
    return i, out


class _State:
    def __init__(self) -> None:
        self.out = Replayed()
        self.open_batch: dict | None = None

    def accepted(self, i: str, enc: Encoded | None) -> None:
        if i in self.out.accepted:
            raise ValueError(f"example {i} accepted twice")
        self.out.accepted[i] = enc

    def known(self, batch: list[str]) -> None:
        unknown = [i for i in batch if i not in self.out.accepted]
        if unknown:
            raise ValueError(f"a batch names examples never accepted: {unknown[:3]}")

    def apply(self, rec: dict) -> None:
        op = rec.get("op")
        if op == "accept":
            options = _options(rec)
            for item in rec["items"] if "items" in rec else [rec]:
                i, enc = _example(item)
                self.accepted(i, enc)
                if options != NO_OPTIONS:
                    self.out.options[i] = options
                self.out.kinds[i] = enc.kind
        elif op in ("trained", "failed", "cancelled"):
            value = rec.get("step" if op == "trained" else "reason")
            if not isinstance(rec.get("id"), str) or not (
                    _int(value) if op == "trained" else isinstance(value, str)):
                raise ValueError(f"not a valid {op} record")
            self.accepted(rec["id"], None)
            {"trained": self.out.trained, "failed": self.out.failed,
             "cancelled": self.out.cancelled}[op][rec["id"]] = value
            if isinstance(rec.get("note"), str):
                self.out.notes[rec["id"]] = rec["note"]
            if rec.get("kind") in KINDS:
                self.out.kinds[rec["id"]] = rec["kind"]
            if op == "trained" and isinstance(rec.get("rolled_back"), str):
                self.out.rolled_back[rec["id"]] = rec["rolled_back"]
        elif op == "rollback":
            out, back = rec.get("rolled_back"), rec.get("restored")
            if not (isinstance(out, list) and isinstance(back, list)
                    and isinstance(rec.get("reason"), str)
                    and all(isinstance(i, str) and i in self.out.trained for i in out + back)):
                raise ValueError("not a valid rollback record (or it names examples never "
                                 "trained)")
            self.out.rolled_back.update(dict.fromkeys(out, rec["reason"]))
            for i in back:
                self.out.rolled_back.pop(i, None)
        elif op == "begin":
            if not (_ids(rec.get("batch")) and _int(rec.get("steps")) and _int(rec.get("base"))):
                raise ValueError("not a valid begin record")
            self.known(rec["batch"])
            # the same batch begun again is a resumed one (after a restart): it replaces it
            if self.open_batch is not None and self.open_batch["batch"] != rec["batch"]:
                raise ValueError("a batch begins while an earlier one has no outcome")
            self.open_batch = rec
        elif op in ("done", "fail"):
            value = rec.get("step" if op == "done" else "reason")
            if not _ids(rec.get("batch")) or not (
                    _int(value) if op == "done" else isinstance(value, str)):
                raise ValueError(f"not a valid {op} record")
            self.known(rec["batch"])
            if self.open_batch is not None and self.open_batch["batch"] != rec["batch"]:
                raise ValueError("an outcome for a batch other than the one begun")
            target = self.out.trained if op == "done" else self.out.failed
            target.update({i: value for i in rec["batch"]})
            if isinstance(rec.get("note"), str):
                self.out.notes.update({i: rec["note"] for i in rec["batch"]})
            self.open_batch = None
        elif op == "cancel":
            if not (_ids(rec.get("batch")) and isinstance(rec.get("reason"), str)):
                raise ValueError("not a valid cancel record")
            self.known(rec["batch"])
            begun = set(self.out.trained) | set(self.out.failed) | set(self.out.cancelled) | \
                set(self.open_batch["batch"] if self.open_batch else [])
            if begun.intersection(rec["batch"]):
                raise ValueError("a cancel names examples already begun or finished")
            self.out.cancelled.update({i: rec["reason"] for i in rec["batch"]})
        else:
            raise ValueError(f"unknown record {str(op)[:40]!r}")


def replay(path: str | os.PathLike, applied_steps: int) -> Replayed:
    """The states the log at `path` records; `applied_steps` is the export's counter now."""
    path = Path(path)
    state = _State()
    out = state.out
    if not path.exists():
        return out
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                break  # the torn last line: its request never got a 2xx
            try:
                rec = json.loads(raw)
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
                state.apply(rec)
            except (ValueError, KeyError, TypeError) as exc:
                raise ExampleLogCorrupt(path, n, str(exc)[:200]) from None
            out.valid_bytes += len(raw)
    if state.open_batch is not None:
        b = state.open_batch
        done_steps = max(0, min(b["steps"], applied_steps - b["base"]))
        out.unfinished = (b["batch"], b["steps"] - done_steps)
    begun = set(out.trained) | set(out.failed) | set(out.cancelled) | set(
        out.unfinished[0] if out.unfinished else [])
    out.pending = [i for i in out.accepted if i not in begun]
    return out
