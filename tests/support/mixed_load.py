"""A mixed load on a running launcher: chat, every kind of lesson, checkpoints and the
dashboards' reads, all at once, for a given time; then every accepted example is followed to
its end.

Used by tests/test_e2e_mixed_load.py (half a minute on the shared launcher) and
bench/mixed_load.py (ten minutes, its table in bench/RESULTS.md). What it counts is what a
user would call a failure of the service: a 5xx, a request that hung or broke its connection,
an accepted example that never finished or vanished, a client thread that never returned.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import httpx

QUESTIONS = ["What is your name?", "Name a fruit.", "What is 2 + 2?", "Say hello.",
             "What color is the sky?", "Who wrote Hamlet?"]
REQUEST_TIMEOUT = 300.0  # a request still unanswered after this is a hang


def _lesson(n: int) -> dict:
    """The n-th lesson: a demonstration, TRL's prompt/completion, a preference pair, a thumbs
    down and a thumbs up, in turn; each about a different made-up thing."""
    q, a = f"What is the code word of crate {n}?", f"The code word of crate {n} is kiwi{n}."
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
        {"prompt": q, "completion": a},
        {"input": {"messages": [{"role": "user", "content": q}]},
         "preferred_output": [{"role": "assistant", "content": a}],
         "non_preferred_output": [{"role": "assistant", "content": "I do not know."}]},
        {"prompt": q, "completion": "There is no crate.", "label": False},
        {"prompt": q, "completion": a, "label": True},
    ][n % 5]


@dataclass
class Tally:
    """Per kind of request: latencies of answered ones and every other outcome counted."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    outcomes: dict[str, dict[str, int]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    accepted: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, t0: float, status: int | str) -> None:
        took = time.perf_counter() - t0
        with self.lock:
            if not isinstance(status, str):  # answered
                self.latencies[kind].append(took)
            self.outcomes[kind][_bucket(status)] += 1

    def count(self, bucket: str) -> int:
        return sum(o[bucket] for o in self.outcomes.values())

    def rows(self) -> list[dict]:
        out = []
        for kind in sorted(self.outcomes):
            lat = sorted(self.latencies[kind])
            q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) >= 2 \
                else [lat[0] if lat else 0.0] * 99
            out.append({"kind": kind, **dict(self.outcomes[kind]),
                        "requests": sum(self.outcomes[kind].values()), "answered": len(lat),
                        "p50": q[49], "p99": q[98], "max": lat[-1] if lat else 0.0})
        return out


def _bucket(status: int | str) -> str:
    if isinstance(status, str):
        return status  # "transport", "hang"
    if status >= 500:
        return "5xx"
    if status == 429:
        return "429"
    return "ok" if status < 300 else "4xx"


def run(vllm: str, train: str, model: str, seconds: float, *, chat_clients: int = 3,
        posters: int = 2, post_pause: float = 1.0, checkpoint_every: float = 20.0,
        settle: float = 900.0, max_seconds: float | None = None) -> dict:
    """Runs the load for `seconds` (each poster sends a lesson, waits `post_pause` s or as
    long as a 429 asks, and sends the next) and, with `max_seconds`, on until an optimizer
    step was made under it (at most that long: a slower machine gets the time it needs);
    a checkpoint every `checkpoint_every` s and one as the load ends. Then waits up to
    `settle` s for every accepted example to finish. Returns the tally, the examples' final
    states, the client threads still alive, the seconds the load and the settling took, the
    checkpoints' answers and the optimizer steps made under the load."""
    tally, t_start = Tally(), time.monotonic()
    stop = [t_start + seconds]  # moved on by watch() while no step was made (max_seconds)
    serial = iter(range(10**9))
    checkpoints: list[dict] = []  # the answers of the checkpoints made under the load
    steps0 = httpx.get(f"{train}/status", timeout=60).json()["optimizer_steps"]

    def call(kind: str, client: httpx.Client, method: str, url: str, **kw) -> httpx.Response:
        t0 = time.perf_counter()
        try:
            if kw.pop("stream", False):
                with client.stream(method, url, **kw) as r:
                    for _ in r.iter_bytes():
                        pass
            else:
                r = client.request(method, url, **kw)
        except httpx.TimeoutException:
            tally.record(kind, t0, "hang")
            return None
        except httpx.HTTPError:
            tally.record(kind, t0, "transport")
            return None
        tally.record(kind, t0, r.status_code)
        return r

    def chat(k: int) -> None:
        with httpx.Client(timeout=REQUEST_TIMEOUT) as client:
            i = k
            while time.monotonic() < stop[0]:
                stream = i % 2 == 1
                via_console = i % 3 == 2  # the training server's chat proxy, as the console
                url = f"{train if via_console else vllm}/v1/chat/completions"
                call("chat (stream)" if stream else "chat", client, "POST", url,
                     stream=stream, json={
                         "model": model, "max_tokens": 16, "temperature": 0.7, "stream": stream,
                         "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]})
                i += 1

    def post() -> None:
        with httpx.Client(timeout=REQUEST_TIMEOUT) as client:
            while time.monotonic() < stop[0]:
                n = next(serial)
                r = call("train", client, "POST", f"{train}/train", json=_lesson(n))
                if r is not None and r.status_code == 202:
                    with tally.lock:
                        tally.accepted.extend(r.json()["ids"])
                time.sleep(float(r.headers.get("retry-after", "1"))
                           if r is not None and r.status_code == 429 else post_pause)

    def checkpoint() -> None:
        with httpx.Client(timeout=REQUEST_TIMEOUT) as client:
            last = time.monotonic()
            while True:
                now = time.monotonic()
                if now < min(last + checkpoint_every, stop[0]):
                    time.sleep(min(1.0, last + checkpoint_every - now, stop[0] - now))
                    continue
                last = now
                r = call("checkpoint", client, "POST", f"{train}/checkpoint")
                if r is not None and r.status_code == 200:
                    checkpoints.append(r.json())
                if time.monotonic() >= stop[0]:
                    return

    def run_on(status: dict) -> None:
        """With `max_seconds`: no optimizer step yet and the end near, the load runs on 5 s
        more (up to `max_seconds` in all): on a slower machine the first step comes later."""
        if max_seconds is not None and status["optimizer_steps"] == steps0 and \
                stop[0] - time.monotonic() < 5:
            stop[0] = min(stop[0] + 5, t_start + max_seconds)

    def watch() -> None:
        with httpx.Client(timeout=REQUEST_TIMEOUT) as client:
            while time.monotonic() < stop[0]:
                for path in ("/status", "/metrics", "/versions", "/health"):
                    r = call("reads", client, "GET", f"{train}{path}")
                    if path == "/status" and r is not None and r.status_code == 200:
                        run_on(r.json())
                time.sleep(1.0)

    threads = [threading.Thread(target=chat, args=(k,), daemon=True) for k in range(chat_clients)]
    threads += [threading.Thread(target=post, daemon=True) for _ in range(posters)]
    threads += [threading.Thread(target=checkpoint, daemon=True),
                threading.Thread(target=watch, daemon=True)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, stop[0] + REQUEST_TIMEOUT + 10 - time.monotonic()))
    alive = sum(t.is_alive() for t in threads)
    loaded = time.monotonic() - t0
    steps = httpx.get(f"{train}/status", timeout=60).json()["optimizer_steps"]
    states = _settle(train, tally.accepted, settle)
    return {"tally": tally, "states": states, "alive": alive, "seconds": loaded,
            "settled_after": time.monotonic() - t0 - loaded, "checkpoints": checkpoints,
            "steps_under_load": steps - steps0}


def _settle(train: str, ids: list[str], timeout: float) -> dict[str, str]:
    """Each accepted example's state once none is queued (or at `timeout`); an id the
    server no longer knows is "missing"."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=60) as client:
        while True:
            states = {}
            for i in ids:
                r = client.get(f"{train}/examples/{i}")
                states[i] = r.json()["state"] if r.status_code == 200 else "missing"
            if "queued" not in states.values() or time.monotonic() > deadline:
                return states
            time.sleep(2.0)


def table(result: dict) -> str:
    """A Markdown table of a run: one row per kind of request."""
    cols = ["requests", "sent", "answered", "2xx", "429", "other 4xx", "5xx", "transport",
            "hung", "p50 s", "p99 s", "max s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["tally"].rows():
        cells = [r["kind"], r["requests"], r["answered"],
                 *(r.get(k, 0) for k in ("ok", "429", "4xx", "5xx", "transport", "hang")),
                 *(f"{r[k]:.2f}" for k in ("p50", "p99", "max"))]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)
