import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_models import make_tiny_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from server.default_model import build

    return build()


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = make_tiny_model(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return get


class Owner:
    """bench/standin_owner.py in a child process: a real second process owning the weights."""

    def __init__(self, model_dir: Path, export_dir: Path):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.standin_owner", str(model_dir), str(export_dir)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", f"owner failed to start: {line!r}"

    def tensor_sum(self, name: str) -> float:
        self.proc.stdin.write(f"sum {name}\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(30)


@pytest.fixture
def owner_factory(tmp_path):
    owners = []

    def make(model_dir: Path) -> tuple[Owner, Path]:
        export_dir = tmp_path / f"export{len(owners)}"
        owners.append(Owner(model_dir, export_dir))
        return owners[-1], export_dir

    yield make
    for o in owners:
        o.close()
