from pathlib import Path

import pytest

from tests.support.standin_owner import OwnerProcess
from tests.support.tiny_models import make_tiny_model

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


@pytest.fixture
def owner_factory(tmp_path):
    owners = []

    def make(model_dir: Path) -> tuple[OwnerProcess, Path]:
        export_dir = tmp_path / f"export{len(owners)}"
        owners.append(OwnerProcess(model_dir, export_dir))
        return owners[-1], export_dir

    yield make
    for o in owners:
        o.close()
