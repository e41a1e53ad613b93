"""The launcher as a subprocess, for end-to-end tests and benchmarks that talk HTTP to it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import psutil

from hooks.leftovers import vllm_dist_files
from tests.support import ROOT
from tests.support.health import wait_healthy
from tests.support.ports import listen_port


def model_copy(source: Path, target: Path) -> Path:
    """A private copy of a model directory to serve, train and checkpoint: its files and the
    cached drift reference and guard fits (.apollo/*.pt), never its history store or example
    log, so a copy starts at version 0 with nothing queued, whatever ran on `source` before.
    Checkpoints then write into the copy, never into the user's cached default model."""
    shutil.copytree(source, target, ignore=lambda d, names: [
        n for n in names if n.endswith(".lock") or (Path(d).name == ".apollo" and not
                                                    n.endswith(".pt"))])
    return target


class Stack:
    """The product as a user starts it: scripts/start_vllm_with_apollo.sh (vLLM with the hook
    and the training server) on free loopback ports, its log and journal under `run_dir`."""

    def __init__(self, run_dir: Path, model_dir: Path | None = None,
                 vllm_args: tuple[str, ...] = (), train_args: str = "", *,
                 journal: bool = True, env: dict | None = None):
        """`journal=False`: the training server's default example log (--journal auto)."""
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        # a fresh machine may have no curl: the launcher must not need it
        nocurl = run_dir / "bin"
        nocurl.mkdir(exist_ok=True)
        (nocurl / "curl").write_text("#!/bin/sh\necho 'curl: not installed' >&2\nexit 127\n")
        (nocurl / "curl").chmod(0o755)
        self.vllm = f"http://127.0.0.1:{listen_port()}"
        self.train = f"http://127.0.0.1:{listen_port()}"
        env = {**os.environ, "VLLM_PORT": self.vllm.rsplit(":", 1)[1],
               "TRAIN_PORT": self.train.rsplit(":", 1)[1],
               "PATH": f"{nocurl}:{os.environ['PATH']}", "VLLM_APOLLO_RUN_DIR": str(run_dir),
               # the journal's default lives in the model directory: keep tests independent
               "TRAIN_ARGS": (f"--journal {run_dir / 'examples.jsonl'} " if journal else "")
               + train_args, **(env or {})}
        self.log = open(run_dir / "launcher.log", "w")  # noqa: SIM115
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [str(ROOT / "scripts/start_vllm_with_apollo.sh"),
             *([str(model_dir), "--dtype", "float32"] if model_dir else []),
             "--enforce-eager", "--max-model-len", "1024", *vllm_args],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.seconds_to_healthy = wait_healthy(self.vllm, self.train, timeout=900,
                                                   proc=self.proc, describe=self.tail)
        except BaseException:
            self.stop()
            raise

    def tail(self) -> str:
        """The end of the launcher's log without the health polls' access lines."""
        lines = (self.run_dir / "launcher.log").read_text(errors="replace").splitlines()
        return "\n".join(x for x in lines if '"GET /health' not in x)[-6000:]

    def manifest(self) -> dict:
        return json.loads((self.run_dir / "export/rank0.json").read_text())

    def wait_trained(self, ids: list[str], timeout: float = 300) -> dict:
        """Wait until every example in `ids` is finished; all must be trained. /status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = [httpx.get(f"{self.train}/examples/{i}").json()["state"] for i in ids]
            if "queued" not in states:
                assert set(states) == {"trained"}, states
                return httpx.get(f"{self.train}/status").json()
            time.sleep(0.5)
        raise TimeoutError(f"examples not trained: {states}")

    def ask(self, question: str) -> str:
        model = self.manifest()["model_path"]
        r = httpx.post(f"{self.vllm}/v1/chat/completions", timeout=120, json={
            "model": model, "temperature": 0, "max_tokens": 30,
            "messages": [{"role": "user", "content": question}]})
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"]

    def vllm_files(self) -> list[Path]:
        """The files vLLM leaves behind when it stops, as named by the worker's note in the
        export (hooks/leftovers.py): its rendezvous file and, under tensor parallelism on
        CPU, its shared memory. The launcher's stop must remove them."""
        return vllm_dist_files(self.run_dir / "export")

    def descendants(self) -> set[int]:
        try:
            return {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            return set()

    def vllm_pids(self) -> set[int]:
        """The vLLM API server and its engine/worker processes (all Python)."""
        out = set()
        for pid in self.descendants():
            try:
                proc = psutil.Process(pid)
                if "python" in proc.name() or "VLLM" in proc.name() or "vllm" in " ".join(
                        proc.cmdline()):
                    out.add(pid)
            except psutil.NoSuchProcess:
                pass
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            rc = self.proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            rc = self.proc.wait()
        self.log.close()
        return rc
