"""Training in the gaps: the trainer paces its own work around vLLM's serving load.

Serving is what users wait for; on one machine (or one GPU) the trainer's forward and
backward compete with vLLM's engine steps for the same cores. vLLM's worker publishes its load
every engine step (hooks/load.py); `LoadMeter` turns that record into rates, and `Pacer` holds
the trainer back while serving is busy.

`--train-share F` (0 < F <= 1) is the share of wall time the trainer's compute may take while
serving is busy. Its work runs in chunks (a forward pass; the backward pass with the
optimizer step; the drift probes after a batch). After each chunk that overlapped serving (an
engine step ran during it, or serving was busy as it began or ended) the trainer owes a wait
of (1 - F) / F times the chunk's duration, paid before its next chunk in ticks of 20 ms,
while serving stays busy: once serving is idle (no engine step for IDLE_AFTER seconds) the
debt is dropped and training runs flat out in the gap. F = 1 never waits (the trainer shares
the machine with serving as it comes).

`--train-share-above N`: a chunk during which vLLM's engine steps ran at most N requests owes
nothing. On CPU vLLM binds its engine's threads to its own cores and leaves the rest to its
API server, whose work (tokenizing, detokenizing, streaming) grows with the requests in
flight: one request leaves a core to the trainer, and training at full speed beside one chat
client left its p99 unchanged (0.90-0.98x in three runs) while eight clients paid 1.36x
(bench/RESULTS.md). Default 1 on CPU; on a GPU (one device for both) 0: every busy chunk owes.

`--train-max-wait S` bounds the waiting per optimizer step, so training always progresses:
at least one optimizer step per S seconds plus the step's own compute, however busy serving
is.

On CPU the trainer also runs a chunk that starts while serving is busy on `--train-threads-busy`
torch threads (default 1), and on all of them in a gap. vLLM's OpenMP threads already hold
every core while it serves; a trainer team of several threads then waits at each barrier for
a thread the OS has parked behind vLLM's, and a step took 3x as long as on one thread
(bench/RESULTS.md, serving while training).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch

from weight_mapping import LoadSnapshot

IDLE_AFTER = 0.25  # seconds without an engine step: serving is idle (a gap)
STALE_STEP = 30.0  # a step "in progress" this long is a worker gone mid-step, not load
WINDOW = 2.0  # rates are measured over about the last this many seconds
TICK = 0.02  # the wait's granularity: how soon a gap in serving is noticed
# One chunk of training work: `with pace(): ...` (Pacer.chunk; contextlib.nullcontext: unpaced)
Pace = Callable[[], contextlib.AbstractContextManager]


@dataclass(frozen=True)
class ServingLoad:
    """What the trainer saw of serving at one moment."""

    busy: bool  # an engine step is running or ended less than IDLE_AFTER s ago
    engine_steps: int  # engine steps since vLLM started
    engine_steps_per_second: float  # over the last ~WINDOW s
    busy_share: float  # share of that time vLLM spent inside engine steps
    tokens_per_second: float  # tokens scheduled per second (prompt and generated)
    requests: int  # requests in the latest engine step
    seconds_since_step: float | None  # since the latest step ended (None: none yet)
    lock_wait_seconds: float  # total time engine steps waited for the trainer's writes

    def as_dict(self) -> dict:
        return asdict(self)


class LoadMeter:
    """Rates from successive reads of the load record. `read` returns a LoadSnapshot or
    None (no record: nothing to pace against); `now_ns` is the clock the record's times use
    (CLOCK_MONOTONIC). Thread-safe: the trainer and /status both sample."""

    def __init__(self, read: Callable[[], LoadSnapshot | None],
                 now_ns: Callable[[], int] = time.monotonic_ns, window: float = WINDOW,
                 idle_after: float = IDLE_AFTER):
        self._read, self._now_ns = read, now_ns
        self._window_ns, self._idle_ns = int(window * 1e9), int(idle_after * 1e9)
        self._samples: deque[tuple[int, LoadSnapshot]] = deque(maxlen=1024)
        self._lock = threading.Lock()

    def sample(self) -> ServingLoad | None:
        snap = self._read()
        if snap is None:
            return None
        now = self._now_ns()
        with self._lock:
            self._samples.append((now, snap))
            while len(self._samples) > 2 and self._samples[1][0] <= now - self._window_ns:
                self._samples.popleft()
            t0, old = self._samples[0]
        dt = (now - t0) / 1e9
        in_step = snap.in_step and now - snap.last_start_ns < STALE_STEP * 1e9
        recent = snap.steps > 0 and now - snap.last_end_ns < self._idle_ns
        rate = (lambda a, b: max(0.0, (a - b) / dt)) if dt > 0 else (lambda a, b: 0.0)
        return ServingLoad(
            busy=in_step or recent,
            engine_steps=snap.steps,
            engine_steps_per_second=rate(snap.steps, old.steps),
            busy_share=min(1.0, rate(snap.busy_ns, old.busy_ns) / 1e9),
            tokens_per_second=rate(snap.tokens, old.tokens),
            requests=snap.last_requests,
            seconds_since_step=(now - snap.last_end_ns) / 1e9 if snap.steps else None,
            lock_wait_seconds=snap.lock_wait_ns / 1e9)


@dataclass
class PacingStats:
    waited_seconds: float = 0.0  # time the trainer waited for serving
    waits: int = 0  # chunks it delayed
    capped_waits: int = 0  # waits cut short by --train-max-wait (progress guaranteed)
    chunks: int = 0  # chunks of training work run
    busy_chunks: int = 0  # of them, those that overlapped serving
    busy_train_seconds: float = 0.0  # their time
    light_chunks: int = 0  # of them, those that owed nothing (at most --train-share-above)


class Pacer:
    """Waits before a chunk of training work while serving is busy (module docstring).
    `clock` / `sleep` are injectable for tests; without a meter it never waits."""

    def __init__(self, meter: LoadMeter | None, share: float = 1.0, max_wait: float = 10.0,
                 *, busy_threads: int = 0, share_above: int = 0,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, tick: float = TICK):
        """`busy_threads`: torch CPU threads for a chunk that starts while serving is busy
        (0: no change); a chunk in a gap uses the threads torch had when the Pacer was
        made. `share_above`: a chunk beside engine steps of at most this many requests owes no
        wait."""
        if not 0 < share <= 1:
            raise ValueError("the train share must be in (0, 1]")
        self.meter, self.share, self.max_wait = meter, share, max_wait
        self.busy_threads, self.threads = busy_threads, torch.get_num_threads()
        self.share_above = share_above
        self._clock, self._sleep, self._tick = clock, sleep, tick
        self.stats = PacingStats()
        self.last: ServingLoad | None = None  # the latest load the trainer saw
        self._debt = 0.0  # seconds the trainer owes serving
        self._step_waited = 0.0  # waited since the last optimizer step

    def _sample(self) -> ServingLoad | None:
        if self.meter is None:
            return None
        self.last = self.meter.sample()
        return self.last

    @contextlib.contextmanager
    def chunk(self, wait: bool = True) -> Iterator[None]:
        """One chunk of training work; `wait` False where waiting would hold vLLM off too
        (inside a write window that spans the batch: --strict-drift)."""
        if wait:
            self._wait()
        before = self._sample()
        if self.busy_threads:  # torch's setting is per thread: the trainer's own
            torch.set_num_threads(self.busy_threads if before is not None and before.busy
                                  else self.threads)
        t0 = self._clock()
        try:
            yield
        finally:
            took = self._clock() - t0
            after = self._sample()
            self.stats.chunks += 1
            if _overlapped(before, after):
                self.stats.busy_chunks += 1
                self.stats.busy_train_seconds += took
                if max(before.requests, after.requests) > self.share_above:
                    self._debt += took * (1 - self.share) / self.share
                else:
                    self.stats.light_chunks += 1

    def step_done(self) -> None:
        """An optimizer step was applied: the per-step bound on waiting starts again."""
        self._step_waited = 0.0

    def _wait(self) -> None:
        if self._debt <= 0:
            return
        waited = False
        while self._debt > 0:
            load = self._sample()
            if load is None or not load.busy:
                break  # a gap: training takes it at full speed
            room = self.max_wait - self._step_waited
            if room <= 0:
                self.stats.capped_waits += 1
                break
            t0 = self._clock()
            self._sleep(min(self._tick, self._debt, room))
            slept = self._clock() - t0
            self._debt -= slept
            self._step_waited += slept
            self.stats.waited_seconds += slept
            waited = True
        self._debt = 0.0
        self.stats.waits += waited


def _overlapped(before: ServingLoad | None, after: ServingLoad | None) -> bool:
    if before is None or after is None:
        return False
    return before.busy or after.busy or after.engine_steps > before.engine_steps
