"""Loss and drift over time, for the browser console's charts.

/status holds only the last loss and the last drift; a chart needs their history, also from
before the page was opened. A thread samples the trainer's counters five times a second and
keeps a point for every new optimizer step (its loss) and every new drift measurement (after
a batch that changed weights): the last `keep` points, each numbered so that a stream can send
only what a page has not seen. Reading a few counters costs the trainer nothing; a step taking
less than the sampling interval shares a point with the next one.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque

from server.engine.trainer import Trainer


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


class Timeline:
    def __init__(self, trainer: Trainer, every: float = 0.2, keep: int = 2000):
        self.trainer = trainer
        self.every = every
        self.points: deque[dict] = deque(maxlen=keep)
        self.seq = 0  # number of the newest point
        self._steps = trainer.stats.optimizer_steps
        self._drift = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="console-timeline", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def sample(self) -> dict | None:
        """A point if a step or a drift measurement happened since the last sample."""
        stats, monitor = self.trainer.stats, self.trainer.monitor
        steps, drift = stats.optimizer_steps, monitor.last if monitor is not None else None
        new_step, new_drift = steps != self._steps, drift is not None and drift is not \
            self._drift
        if not (new_step or new_drift):
            return None
        self._steps, self._drift = steps, drift
        point = {"t": time.time(), "step": steps,
                 "loss": _finite(stats.last_loss) if new_step else None,
                 "drift": _finite(drift.mean_kl) if new_drift else None,
                 "version": self.trainer.coordinator.version.get()[0]}
        with self._lock:
            self.seq += 1
            point["seq"] = self.seq
            self.points.append(point)
        return point

    def since(self, seq: int) -> list[dict]:
        """Points newer than `seq` (all kept ones for 0)."""
        with self._lock:
            return [p for p in self.points if p["seq"] > seq]
