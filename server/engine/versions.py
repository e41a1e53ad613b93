"""Versions of the served model: what each checkpoint holds, and the live rollback.

A rollback makes the live weights exactly a version's, in place: the chunks that changed since
the last checkpoint come back from the weights files (the checkpointer's checksums say which),
older versions' chunks from the history store's undo records. It runs on the trainer's worker
between batches, holding the weights lock; only the writes into vLLM's tensors hold the step
lock (serving stalls for them alone), through one host buffer of a chunk. Then the prefix cache
is dropped, the optimizer state is reset (its moments describe a path that is gone), and the
examples trained since that version are marked "rolled back" (those it holds again, "trained").

An interrupted rollback (the trainer killed during it) leaves a marker in vLLM's export: the
next trainer on that export finishes it before training, from a full scan of the weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from checkpoint import CheckpointRefused, HistoryError
from checkpoint.durable import atomic_replace, unlink_if_present
from checkpoint.history import Store, Versions, entry_summary
from checkpoint.versions import Blobs, check_head, plan, resolve, restore_live, sources
from server.engine.checkpointing import CheckpointService
from server.engine.trainer import Trainer

log = logging.getLogger("vllm_apollo.versions")
MARKER = "rollback.json"


class RollbackRefused(RuntimeError):
    """Nothing was changed; the message says why (HTTP 409)."""


class UnknownVersion(RollbackRefused):
    """No such version (HTTP 404)."""


def reset_optimizer(optimizer) -> None:
    """Forget the moments (and projections) of every parameter; each keeps its seed."""
    for state in optimizer.state.values():
        seed = state.get("seed")
        state.clear()
        if seed is not None:
            state["seed"] = seed


def lineage_ids(versions: Versions | None, n: int) -> set[str]:
    """Examples whose training version `n` holds: its own and its parent's, recursively."""
    out: set[str] = set()
    seen = set()
    while versions is not None and n not in seen and (e := versions.entry(n)) is not None:
        seen.add(n)
        out.update(e.get("example_ids", ()))
        parent = e.get("parent", e.get("reverted_to", n - 1 if n > 0 else None))
        if parent is None or e.get("name") == "original" or e.get("external"):
            break
        n = parent
    return out


class VersionService:
    def __init__(self, checkpoints: CheckpointService, trainer: Trainer,
                 export_dir: Path | None = None):
        self.checkpoints, self.trainer = checkpoints, trainer
        self.checkpointer = checkpoints.checkpointer
        self.store = Store(self.checkpointer.model_dir)
        self.marker = export_dir / MARKER if export_dir is not None else None
        self.rollbacks = 0
        self.last_rollback: dict | None = None
        version = trainer.coordinator.version
        self.live_base = self.head()  # the version the live weights descend from
        if version.get() == (0, None) and trainer.coordinator.applied_steps() == 0:
            version.name(self.live_base)  # nothing applied yet: vLLM serves the files
        checkpoints.meta = lambda: {"parent": self.live_base, **self._drift()}
        checkpoints.on_synced.append(self._synced)
        if self.marker is not None and self.marker.exists():
            self._resume()

    def head(self) -> int:
        return self.store.load().head["n"] if self.store.exists() else 0

    def _drift(self) -> dict:
        monitor = self.trainer.monitor
        last = monitor.last if monitor is not None else None
        return {"drift": last.as_dict()} if last else {}

    def _synced(self, result: dict) -> None:
        """After a sync (weights still held): the live weights equal the files' version."""
        if result.get("version") is not None:
            self.live_base = result["version"]
            self.trainer.coordinator.version.name(self.live_base)

    def listing(self) -> dict:
        versions = self.store.load() if self.store.exists() else None
        weight_version, named = self.trainer.coordinator.version.get()
        out = {"head": self.head(), "weight_version": weight_version,
               "weight_checkpoint": named, "versions": [], "history": None,
               "history_bytes": 0}
        if versions is not None:
            out["versions"] = [{**entry_summary(e), "reachable": versions.reachable(e["n"])}
                               for e in versions.entries]
            out["history"] = versions.policy or None
            out["history_bytes"] = self.store.disk_bytes()
        return out

    # --- rollback ---
    def rollback(self, to: str | int) -> dict:
        """Make the live weights exactly version `to`; RollbackRefused/UnknownVersion, or
        CheckpointBusy while a checkpoint runs, leave everything as it was."""
        if self.trainer.group is not None:
            raise RollbackRefused("rollback is not supported under tensor parallelism yet")
        with self.checkpoints.exclusive("rollback"):
            return self.trainer.run_in_worker(lambda: self._rollback(to), always=True)

    def _rollback(self, to: str | int, resume: bool = False) -> dict:
        t0 = time.perf_counter()
        ck, trainer = self.checkpointer, self.trainer
        with self.checkpoints._lock, trainer.weights_lock:
            try:
                versions = self.store.load() if self.store.exists() else None
                target = self._resolve(versions, to)
                ck.check_files()
                chunks = {}
                if versions is not None:
                    check_head(versions, ck.slots)
                    chunks = plan(self.store, versions, target, ck.regions)
                    blobs = Blobs(self.store)
                    try:  # every kept byte verified before the first write
                        for seg, c in chunks.values():
                            blobs.check(seg, c)
                    finally:
                        blobs.close()
            except HistoryError as exc:
                raise RollbackRefused(f"rollback refused, nothing changed: {exc}") from None
            except CheckpointRefused as exc:
                raise RollbackRefused(f"rollback refused, nothing changed: {exc}") from None
            full = self.checkpoints._full_scan or resume
            stepped = None if full else self._stepped_names()
            dirty = ck.dirty(stepped)
            self._mark(target)
            stats = restore_live(sources(chunks, dirty), self._tensor_at,
                                 ck.model_dir, self.store, self._window(target), ck.chunk_bytes)
            if self.marker is not None:
                unlink_if_present(self.marker)
            reset_optimizer(trainer.optimizer)
            touched = {ck.regions.slot(f, o, n).name for f, o, n, *_ in sources(chunks, dirty)}
            self._after(target, touched, versions)
        out, back = self._examples(versions, target)
        self.rollbacks += 1
        self.last_rollback = {"version": target, "chunks": len(chunks) + len(
            set(dirty) - {(f, o, c.length) for (f, o), (_, c) in chunks.items()}),
            **stats, "seconds": time.perf_counter() - t0,
            "weight_version": trainer.coordinator.version.get()[0],
            "examples_rolled_back": out, "examples_restored": back, "at": time.time()}
        log.info("rollback to version %d: %d chunks, %d bytes read, serving stalled %.3f s, "
                 "%.2f s in all", target, self.last_rollback["chunks"], stats["bytes_read"],
                 stats["stall_seconds"], self.last_rollback["seconds"])
        return self.last_rollback

    def _resolve(self, versions: Versions | None, to: str | int) -> int:
        if versions is None:  # no checkpoint yet: the files are the original, version 0
            if to in ("last-checkpoint", "original", 0):
                return 0
            raise UnknownVersion(f"no version {to}: no checkpoint was written yet (only "
                                 "'original', the files, is known)")
        try:
            target = resolve(versions, to)
        except HistoryError as exc:
            raise UnknownVersion(str(exc)) from None
        if versions.entry(target) is None:
            raise UnknownVersion(f"no version {target} (versions: "
                                 f"{', '.join(str(e['n']) for e in versions.entries)})")
        return target

    def _stepped_names(self) -> list[str]:
        names = self.checkpoints._names_of
        return [n for pid in self.trainer.stepped for n in names.get(pid, [])]

    def _tensor_at(self, file: str, offset: int, length: int):
        slot = self.checkpointer.regions.slot(file, offset, length)
        return self.checkpointer.live[slot.name], slot

    @contextlib.contextmanager
    def _window(self, target: int) -> Iterator[None]:
        """The step lock for the writes; then KV is dropped and the version named."""
        coordinator = self.trainer.coordinator
        with coordinator.write():
            try:
                yield
            except BaseException:
                coordinator.weights_restored()  # changed, not named: a mix until resumed
                log.critical("a rollback to version %d failed while writing the live weights "
                             "(they are a mix now); a restart of the training server finishes "
                             "it", target)
                raise
            coordinator.weights_restored()
            coordinator.version.name(target)

    def _mark(self, target: int) -> None:
        if self.marker is not None:
            atomic_replace(self.marker, [json.dumps({"to": target}).encode()], mode=0o600)

    def _after(self, target: int, touched: set[str], versions: Versions | None) -> None:
        """The checkpoint service's view: live == files only if the target is the head."""
        service, trainer = self.checkpoints, self.trainer
        self.live_base = target
        if target == (versions.head["n"] if versions is not None else 0):
            trainer.stepped.clear()
            service._full_scan = False
            service.rolled_back = False
            service._synced_step = trainer.stats.optimizer_steps
        else:
            params = dict(trainer.model.named_parameters(remove_duplicate=False))
            trainer.stepped.update(id(params[self.checkpointer.live_name(n)]) for n in touched)
            service.rolled_back = True

    def _examples(self, versions: Versions | None, target: int) -> tuple[int, int]:
        """Mark what the live weights no longer hold "rolled back", what they hold again
        "trained" (records in memory and the example log)."""
        keep = lineage_ids(versions, target)
        known = set(self.checkpoints.trained_ids)
        for e in versions.entries if versions is not None else []:
            known.update(e.get("example_ids", ()))
        reason = f"rolled back to version {target} (POST /rollback)"
        out, back = [], []  # by state in memory; the log also gets those it alone knows
        log_out, log_back = [], []
        for i in sorted(known):
            rec = self.trainer.records.get(i)
            if i not in keep and (rec is None or rec.state == "trained"):
                (out if rec is not None else log_out).append(i)
            elif i in keep and (rec is None or rec.state == "rolled back"):
                (back if rec is not None else log_back).append(i)
        if self.trainer.example_log is not None and (out or back or log_out or log_back):
            self.trainer.example_log.rollback(out + log_out, back + log_back, reason)
        for i in out:
            if (rec := self.trainer.records.get(i)) is not None:
                rec.state, rec.reason = "rolled back", reason
        for i in back:
            if (rec := self.trainer.records.get(i)) is not None:
                rec.state, rec.reason = "trained", f"back in the weights: {reason}"
        with self.checkpoints._ids_lock:
            self.checkpoints.trained_ids.clear()
        return len(out), len(back)

    def _resume(self) -> None:
        """Finish a rollback a killed trainer left half-written in vLLM's weights."""
        try:
            to = json.loads(self.marker.read_text())["to"]
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("unreadable %s: the interrupted rollback cannot be finished", self.marker)
            return
        log.warning("finishing the rollback to version %s interrupted by a restart", to)
        self._rollback(to, resume=True)


def marker_path(export_dir: str | os.PathLike) -> Path:
    return Path(export_dir) / MARKER
