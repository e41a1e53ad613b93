"""The training server as a real process (`python -m server`) on an export a stand-in owner
holds: what clients that need real HTTP (the `openai` package) and kill -9 tests talk to."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT
from tests.support.health import wait_healthy
from tests.support.ports import listen_port


class TrainServer:
    def __init__(self, export_dir: Path, journal: Path, *args: str, env: dict | None = None):
        self.port = listen_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = journal.with_name(journal.name + ".server.log")
        self.cmd = [sys.executable, "-m", "server", "--export-dir", str(export_dir),
                    "--port", str(self.port), "--journal", str(journal), "--threads", "1",
                    *args]
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=ROOT, stdout=log,
                                         stderr=subprocess.STDOUT)
        wait_healthy(self.url, timeout=120, proc=self.proc, describe=self.tail)

    def tail(self) -> str:
        return self.log.read_text()[-3000:]

    def kill(self) -> None:
        """kill -9."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()

    def openai(self, api_key: str = "none"):
        """The official client, pointed at this server."""
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0,
                      timeout=600)
