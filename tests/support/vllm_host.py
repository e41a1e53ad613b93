"""vLLM's offline engine in a child process (support/vllm_host_child.py), asked for the
log-probs of token ids: tests compare them with the mapped model's."""

import json
import os
import subprocess
import sys

import torch

from hooks.leftovers import clean_export
from tests.support import ROOT

PROMPT = [3, 17, 101, 250, 9, 77, 480, 12, 5, 333, 61, 200]


class VllmHost:
    """vllm_host_child.py: vLLM's engine in a child process, asked for log-probs."""

    def __init__(self, model_dir, export_dir, log, tp: int = 1):
        self.export_dir = export_dir
        env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_APOLLO_EXPORT_DIR": str(export_dir),
               "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
               "VLLM_LOGGING_STREAM": "ext://sys.stderr", "VLLM_CPU_OMP_THREADS_BIND":
               "|".join(str(r % (os.cpu_count() or 1)) for r in range(tp)) if tp > 1 else "auto"}
        child = ROOT / "tests/support/vllm_host_child.py"
        self.proc = subprocess.Popen([sys.executable, str(child), str(model_dir), str(tp)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(log, "w"), text=True, env=env, cwd=ROOT)
        self.ready = False

    def wait_ready(self) -> "VllmHost":
        if not self.ready:
            self._read()  # {"ready": true}
            self.ready = True
        return self

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"vLLM host exited ({self.proc.wait()}); see its log")
            if line.startswith("{"):
                return json.loads(line)

    def logprobs(self, ids: list[int]) -> dict:
        self.proc.stdin.write(json.dumps({"ids": ids}) + "\n")
        self.proc.stdin.flush()
        answer = self._read()
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in answer.items()}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
            self.proc.stdin.flush()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        clean_export(self.export_dir)  # the hook's export and vLLM's rendezvous file
