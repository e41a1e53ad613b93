"""The training server as a real process on a stand-in owner's export (no vLLM)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT
from tests.support.health import wait_healthy
from tests.support.ports import listen_port


def start_server(export_dir: Path, *args: str, env: dict | None = None, wait: bool = True,
                 stderr=subprocess.DEVNULL) -> tuple[subprocess.Popen, str]:
    """`python -m server` on `export_dir` (one thread) with `args`; the process and its URL,
    healthy unless `wait` is False."""
    port = listen_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "--export-dir", str(export_dir), "--port", str(port),
         "--threads", "1", *args],
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    url = f"http://127.0.0.1:{port}"
    if wait:
        try:
            wait_healthy(url, timeout=90, proc=proc)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    return proc, url


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
