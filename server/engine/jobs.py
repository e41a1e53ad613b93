"""Fine-tuning jobs: a training file's examples, for some epochs, through the live trainer.

Jobs run one at a time, in order of creation, on one thread. A job feeds the trainer one
batch at a time: a slice of at most its batch size of examples, all of one epoch (each epoch
shuffled by the job's seed), submitted as one group (trainer.py: a batch of its own, at the
job's learning-rate scale), and the next slice only once that one has finished. A live
/train example posted meanwhile therefore waits behind at most one job batch.

Exactly once per example and epoch, across kill -9: a slice is journaled (job_journal.py)
before it is submitted, and its examples' ids name the job, epoch and line
(``ftjob-….e2.l137``). From `Trainer.submit` on the example log owns them: an accepted
example is trained exactly once whatever happens. After a restart the journaled slice is
taken up again: if the trainer knows its ids they were accepted, else they are submitted now.
The slices before it finished; none after it began.

Cancel withdraws the slice's queued examples and stops a batch in progress at its next step
boundary (Trainer.halt); the steps applied stay.

A "dpo" job's lines are preference pairs, encoded as /train encodes one (`preference_pair`,
`encode_lesson`) and trained by the same trainer, so the DPO loss, learn-then-stop and the
locality guard apply as they do to /train's pairs; its batches carry the job's β as they
carry its learning-rate scale.

Over 300 lines on purpose: exactly-once across kill -9 is one protocol (journal a slice, submit
it, take it up after a restart, cancel it) whose steps must be read together.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
from array import array
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from server.engine.example_replay import ExampleLogError
from server.engine.files import FileStore
from server.engine.job_journal import JobJournal
from server.engine.records import QueueFull, Record, Unavailable
from server.engine.tokenization import (
    Encoded,
    ExampleError,
    encode,
    encode_lesson,
    preference_pair,
)
from server.engine.trainer import Trainer
from server.settings import Settings

log = logging.getLogger("vllm_apollo.jobs")
FINAL = frozenset({"succeeded", "failed", "cancelled"})
KEEP_EVENTS = 10_000  # per job, in memory and in the compacted journal


class JobFinished(ValueError):
    """The job already ended; it cannot be cancelled."""


class _Stopping(Exception):
    """The server is stopping: the job stays as journaled and resumes at the next start."""


@dataclass
class Job:
    id: str
    created_at: int
    model: str
    training_file: str
    n_epochs: int
    batch_size: int
    lr_multiplier: float
    seed: int
    method: str = "supervised"  # or "dpo": the file holds preference pairs
    beta: float | None = None  # a dpo job's β, resolved when created (None: supervised)
    suffix: str | None = None
    metadata: dict[str, str] | None = None
    status: str = "queued"  # then validating_files, running, and one of FINAL
    error: dict[str, str | None] | None = None
    finished_at: int | None = None
    fine_tuned_model: str | None = None
    examples: int | None = None  # in the training file, once validated
    done: int = 0  # example-epochs trained
    trained_tokens: int = 0
    next: list[int] = field(default_factory=lambda: [1, 0])  # epoch, position of next slice
    slice: list[int] | None = None  # epoch, start, end: journaled, not known to be finished
    cancel_at_step: int | None = None  # the applied-step counter when cancel was asked
    estimated_finish: int | None = None

    @property
    def total(self) -> int:
        return (self.examples or 0) * self.n_epochs


def new_job_id() -> str:
    return "ftjob-" + uuid.uuid4().hex[:24]


def _event(level: str, message: str, data: dict | None = None,
           kind: str = "message") -> dict:
    return {"id": "ftevent-" + uuid.uuid4().hex[:24], "created_at": int(time.time()),
            "level": level, "message": message, "data": data, "type": kind}


class _Index:
    """Where each example (non-blank line) of a training file starts, and its line number."""

    def __init__(self) -> None:
        self.offsets, self.lines = array("q"), array("q")

    def __len__(self) -> int:
        return len(self.offsets)


def examples_of(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(line number, offset, line) of every non-blank line, streamed."""
    with open(path, "rb") as f:
        offset = 0
        for n, raw in enumerate(f, 1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw, offset = raw[3:], 3
            if raw.strip():
                yield n, offset, raw
            offset += len(raw)


class JobRunner:
    """Creates, runs, cancels and reports jobs; the API's view of them."""

    def __init__(self, trainer: Trainer, tokenizer, settings: Settings, files: FileStore,
                 journal: JobJournal):
        self.trainer, self.tokenizer, self.settings = trainer, tokenizer, settings
        self.files, self.journal = files, journal
        try:
            self.jobs = {i: Job(**d) for i, d in journal.jobs.items()}
        except TypeError as exc:
            raise ExampleLogError(f"jobs journal {journal.path}: {exc}") from None
        self._cond = threading.Condition()
        self._stop = False
        self._active: str | None = None
        self._slice_ids: list[str] = []
        self._order: tuple[tuple[str, int], list[int]] | None = None
        self._thread = threading.Thread(target=self._run, name="jobs", daemon=True)
        trainer.after_batch.append(self._after_batch)

    # --- the API's side ---
    def create(self, job: Job) -> Job:
        with self._cond:
            self._update(job, event=_event("info", f"Created fine-tuning job: {job.id}"))
            self.jobs[job.id] = job
            self._cond.notify_all()
        return job

    def newest_first(self) -> list[Job]:
        with self._cond:
            return list(reversed(self.jobs.values()))

    def events(self, job_id: str) -> list[dict]:
        """Newest first."""
        with self._cond:
            return list(reversed(self.journal.events.get(job_id, ())))

    def uses_file(self, file_id: str) -> bool:
        with self._cond:
            return any(j.training_file == file_id and j.status not in FINAL
                       for j in self.jobs.values())

    def cancel(self, job_id: str, wait: float = 60.0) -> Job:
        """Ask the job to stop (KeyError: no such job; JobFinished) and wait, at most `wait`
        seconds, until it has: the batch in progress stops at its next step boundary."""
        with self._cond:
            job = self.jobs[job_id]
            if job.status in FINAL:
                raise JobFinished(f"job {job_id} already {job.status}")
            if job.cancel_at_step is None:
                step = self.trainer.coordinator.applied_steps()
                self._update(job, cancel_at_step=step, event=_event(
                    "info", f"Cancellation requested at optimizer step {step}",
                    {"applied_steps": step}))
            if self._active != job_id:
                self._finalize(job, "cancelled")
                return job
            ids = list(self._slice_ids)
        self._stop_slice(ids)
        with self._cond:
            self._cond.notify_all()
            self._cond.wait_for(lambda: job.status in FINAL, timeout=wait)
            return job

    # --- lifecycle ---
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(60)
        self.journal.close()

    # --- the runner ---
    def _update(self, job: Job, event: dict | None = None, **changes) -> None:
        """Journal the job's state with `changes` (and one event), then make it so."""
        self.journal.append(asdict(replace(job, **changes)),
                            (job.id, event) if event is not None else None)
        for k, v in changes.items():
            setattr(job, k, v)

    def _after_batch(self) -> None:
        """On the trainer's thread, right after each batch: wake the runner."""
        with self._cond:
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and (job := self._next()) is None:
                    self._cond.wait(1.0)
                if self._stop:
                    return
                self._active = job.id
            try:
                self._drive(job)
            except _Stopping:
                return
            except (OSError, ExampleLogError) as exc:  # the journal cannot be written now
                log.error("job %s paused: %s; retrying in 5 s", job.id, exc)
                self._sleep(5.0)
            except Exception as exc:  # a bug must not leave a job running forever
                log.exception("job %s failed", job.id)
                with self._cond:
                    self._finalize(job, "failed", "internal_error",
                                   f"{type(exc).__name__}: {exc}")
            finally:
                with self._cond:
                    self._active, self._slice_ids = None, []

    def _next(self) -> Job | None:
        return next((j for j in self.jobs.values() if j.status not in FINAL), None)

    def _sleep(self, seconds: float) -> None:
        with self._cond:
            if self._cond.wait_for(lambda: self._stop, timeout=seconds):
                raise _Stopping

    def _drive(self, job: Job) -> None:
        path = self.files.data_path(job.training_file)
        if not path.is_file():
            with self._cond:
                self._finalize(job, "failed", "invalid_training_file",
                               f"the training file {job.training_file} no longer exists",
                               "training_file")
            return
        if job.status == "queued":
            with self._cond:
                self._update(job, status="validating_files", event=_event(
                    "info", "Validating training file: " + job.training_file))
        if job.status == "validating_files":
            index = self._validate(job, path)
            if index is None:
                return
            with self._cond:
                self._update(job, status="running", examples=len(index), event=_event(
                    "info", f"Files validated: {len(index)} examples. Fine-tuning job "
                            f"started: {job.n_epochs} epochs in batches of {job.batch_size}"))
        else:
            index = _Index()
            for n, offset, _ in examples_of(path):
                index.offsets.append(offset)
                index.lines.append(n)
            with self._cond:
                self._update(job, event=_event(
                    "info", f"Resumed after a restart: {job.done} of {job.total} examples "
                            "trained", {"examples_done": job.done,
                                        "examples_total": job.total}))
        self._train(job, path, index)

    def _encode(self, raw: bytes) -> Encoded:
        """A validated line (upload checked its form) as tokens and labels: a chat example,
        or a preference pair (kind "pair") exactly as /train encodes one."""
        obj = json.loads(raw)
        s = self.settings
        limits = {"max_messages": s.max_messages_per_example,
                  "max_chars": s.max_chars_per_example}
        if "input" in obj:
            chosen, rejected = preference_pair(obj["input"]["messages"],
                                               obj["preferred_output"][0]["content"],
                                               obj["non_preferred_output"][0]["content"])
            return encode_lesson("pair", chosen, self.tokenizer, s.max_tokens_per_example,
                                 rejected=rejected, **limits)
        messages = [{k: m[k] for k in ("role", "content", "weight") if k in m}
                    for m in obj["messages"]] if "messages" in obj else [
            {"role": "user", "content": obj["prompt"]},
            {"role": "assistant", "content": obj["completion"]}]
        return encode(messages, self.tokenizer, s.max_tokens_per_example, **limits)

    def _validate(self, job: Job, path: Path) -> _Index | None:
        """Tokenize every example once (chat template, token limits): the first that cannot be
        trained fails the job before anything is trained. The index, or None."""
        index = _Index()
        for n, offset, raw in examples_of(path):
            try:
                self._encode(raw)
            except (ExampleError, ValueError, KeyError, TypeError, AttributeError) as exc:
                with self._cond:
                    self._finalize(job, "failed", "invalid_training_file",
                                   f"Invalid file format. Line {n}: {exc}", "training_file")
                return None
            index.offsets.append(offset)
            index.lines.append(n)
            if n % 64 == 0:
                self._check(job)
                if job.status in FINAL:
                    return None
        return index

    def _check(self, job: Job) -> None:
        with self._cond:
            if self._stop:
                raise _Stopping
            if job.cancel_at_step is not None:
                self._finalize(job, "cancelled")

    def _order_of(self, job: Job, epoch: int, n: int) -> list[int]:
        if self._order is None or self._order[0] != (job.id, epoch):
            order = list(range(n))
            random.Random(f"{job.seed}:{epoch}").shuffle(order)
            self._order = ((job.id, epoch), order)
        return self._order[1]

    def _train(self, job: Job, path: Path, index: _Index) -> None:
        n, started, done_before = len(index), time.monotonic(), job.done
        per_epoch = -(-n // job.batch_size)
        with open(path, "rb") as f:
            while True:
                self._check(job)
                with self._cond:
                    if job.status in FINAL:
                        return
                    if job.slice is None:
                        epoch, pos = job.next
                        if epoch > job.n_epochs:
                            self._finalize(job, "succeeded")
                            return
                        self._update(job, slice=[epoch, pos, min(pos + job.batch_size, n)])
                    epoch, start, end = job.slice
                    lines = self._order_of(job, epoch, n)[start:end]
                    ids = [f"{job.id}.e{epoch}.l{index.lines[i]}" for i in lines]
                    self._slice_ids = ids
                encoded = [self._encode(_read(f, index.offsets[i])) for i in lines]
                if self.trainer.records.get(ids[0]) is None and not self._submit(job, encoded,
                                                                                  ids):
                    continue  # cancelled before it was submitted: _check ends the job
                if job.cancel_at_step is not None:
                    self._stop_slice(ids)
                recs = self._wait(ids)
                with self._cond:
                    if job.cancel_at_step is not None or any(
                            r is not None and r.state == "cancelled" for r in recs):
                        self._finalize(job, "cancelled")
                        return
                    bad = next(((i, r) for i, r in zip(ids, recs, strict=True)
                                if r is not None and r.state == "failed"), None)
                    if bad is not None:
                        self._finalize(job, "failed", "training_failed",
                                       f"example {bad[0]} (line {bad[0].rsplit('.l', 1)[1]}, "
                                       f"epoch {epoch}) failed: {bad[1].reason}")
                        return
                    done = job.done + len(ids)
                    loss = recs[0].loss if recs[0] is not None else None
                    spent = (time.monotonic() - started) / max(done - done_before, 1)
                    eta = spent * (job.total - done)
                    step = (epoch - 1) * per_epoch - (-end // job.batch_size)
                    drift = recs[0].drift if recs[0] is not None else None
                    data = {"step": step, "total_steps": per_epoch * job.n_epochs,
                            "epoch": epoch, "n_epochs": job.n_epochs, "examples_done": done,
                            "examples_total": job.total, "train_loss": loss,
                            "drift_mean_kl": drift["mean_kl"] if drift else None,
                            "eta_seconds": round(eta, 1),
                            "applied_steps": self.trainer.coordinator.applied_steps()}
                    said = f"training loss={loss:.4f}, " if loss is not None else ""
                    self._update(
                        job, slice=None, next=[epoch, end] if end < n else [epoch + 1, 0],
                        done=done, trained_tokens=job.trained_tokens + sum(
                            e.tokens for e in encoded),
                        estimated_finish=int(time.time() + eta),
                        event=_event("info", f"Step {step}/{data['total_steps']}: {said}"
                                             f"epoch {epoch}/{job.n_epochs}, {done}/"
                                             f"{job.total} examples, ETA {eta:.0f} s", data,
                                     "metrics"))

    def _submit(self, job: Job, encoded: list[Encoded], ids: list[str]) -> bool:
        """Submit the slice, waiting out a full queue or an unwritable example log; False if
        the job was cancelled meanwhile."""
        said = None
        while job.cancel_at_step is None:
            try:
                self.trainer.submit(encoded, ids=ids, group=job.id,
                                    lr_scale=job.lr_multiplier, beta=job.beta)
                return True
            except (QueueFull, Unavailable, ExampleLogError) as exc:
                if str(exc) != said:  # once per reason, not once a second
                    log.warning("job %s waits to submit its next batch: %s", job.id, exc)
                    said = str(exc)
                self._sleep(1.0)
        return False

    def _stop_slice(self, ids: list[str]) -> None:
        if ids:
            self.trainer.withdraw(ids, "its fine-tuning job was cancelled")
            self.trainer.halt(ids)

    def _wait(self, ids: list[str]) -> list[Record | None]:
        """The slice's records once none is queued. (None: a record the trainer already
        forgot, which only an example finished long ago can be.)"""
        with self._cond:
            while True:
                recs = [self.trainer.records.get(i) for i in ids]
                if all(r is None or r.state != "queued" for r in recs):
                    return recs
                if self._stop:
                    raise _Stopping
                self._cond.wait(0.5)

    def _finalize(self, job: Job, status: str, code: str | None = None,
                  message: str | None = None, param: str | None = None) -> None:
        """End the job (under self._cond)."""
        if job.status in FINAL:
            return
        changes: dict = {"status": status, "finished_at": int(time.time()), "slice": None,
                         "estimated_finish": None}
        if status == "succeeded":
            changes["fine_tuned_model"] = job.model
            event = _event("info", "The job has successfully completed: the served model "
                                   f"{job.model} was trained in place",
                           {"examples_done": job.done, "examples_total": job.total})
        elif status == "failed":
            changes["error"] = {"code": code, "message": message, "param": param}
            event = _event("error", f"The job failed: {message}")
        else:
            recs = [self.trainer.records.get(i) for i in self._slice_ids]
            ended = max((r.step for r in recs if r is not None and r.step is not None),
                        default=0)
            asked = job.cancel_at_step if job.cancel_at_step is not None else ended
            stopped = max(asked, ended)
            event = _event("info", f"The job was cancelled: {stopped - asked} optimizer steps "
                                   "ran after the request; the weights stay as trained so far",
                           {"cancel_at_step": asked, "stopped_at_step": stopped,
                            "steps_after_cancel": stopped - asked, "examples_done": job.done})
        self._update(job, event=event, **changes)
        self._cond.notify_all()


def _read(f, offset: int) -> bytes:
    f.seek(offset)
    return f.readline()


def fine_tuning(settings: Settings, trainer: Trainer, tokenizer, example_log_path: Path | None
                ) -> tuple[FileStore, JobRunner]:
    """Files and jobs beside the example log (``examples.files/``, ``examples.jobs.jsonl``,
    guarded by its lock); without one, a temporary directory and memory (nothing resumes)."""
    if example_log_path is None:
        files = FileStore.in_temporary_directory(settings.max_body_bytes)
        journal = JobJournal(None, KEEP_EVENTS)
    else:
        stem = example_log_path.with_suffix("")
        files = FileStore(stem.with_name(stem.name + ".files"), settings.max_body_bytes)
        journal = JobJournal(stem.with_name(stem.name + ".jobs.jsonl"), KEEP_EVENTS)
    return files, JobRunner(trainer, tokenizer, settings, files, journal)
