"""Wait until HTTP servers answer /health with 200: the one wait used by tests and benches."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import httpx


def wait_healthy(*urls: str, timeout: float, proc: subprocess.Popen | None = None,
                 describe: Callable[[], str] = lambda: "") -> float:
    """Seconds until every `url`'s /health answered 200; raises if `proc` exits first or the
    time runs out (with `describe()`, e.g. the tail of a log, in the message)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}): {describe()}")
        try:
            if all(httpx.get(f"{u}/health", timeout=2).status_code == 200 for u in urls):
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{', '.join(urls)} not healthy after {timeout} s: {describe()}")
