from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.stack import Stack
from tests.support.standin_owner import OwnerProcess
from tests.support.tiny_models import make_tiny_model
from tests.support.zygote import Zygote

ROOT = Path(__file__).resolve().parent.parent
STOPS = "stops_default_stack"


def pytest_configure(config):
    config.addinivalue_line("markers", f"{STOPS}: stops the shared launcher (`default_stack`); "
                                       "runs after every other test that uses it")


def pytest_collection_modifyitems(items):
    """The tests that use `default_stack` run one after the other, from where the first of
    them was collected (the launcher lives only while they run); those marked
    `stops_default_stack` run last among them."""
    group = [i for i in items if "default_stack" in getattr(i, "fixturenames", ())]
    if not group:
        return
    first, members = items.index(group[0]), set(map(id, group))
    rest = [i for i in items if id(i) not in members]
    group.sort(key=lambda i: i.get_closest_marker(STOPS) is not None)  # stable
    items[:] = rest[:first] + group + rest[first:]


@pytest.fixture(scope="session", autouse=True)
def _monitor_cache(tmp_path_factory):
    """In-process apps (tests/support/app.py) keep the drift reference and guard made from
    their starting weights here, for the next app that starts from the same weights."""
    from tests.support import app

    app.MONITOR_CACHE = tmp_path_factory.mktemp("monitor-cache")
    yield
    app.MONITOR_CACHE = None


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from server.default_model import build

    return build()


@pytest.fixture(scope="session")
def default_stack(tmp_path_factory) -> Iterator[Stack]:
    """The launcher on a copy of the default model with the training server's default
    settings (and vLLM in float32, as the launcher serves the default model), started
    once per session for every test that asks for it (a start costs ~35 s on 2 cores, more
    when loaded). Tests sharing it must not depend on each other's order or on an untouched
    model: each asks for the answers it compares against itself, and teaches facts no other
    test asks about."""
    from server.default_model import build
    from tests.support.stack import model_copy

    # on a copy: its checkpoints (the mixed-load test's) must not change the cached model
    # every other test, and the next run, start from
    cached = build()
    files = {f: f.stat().st_mtime_ns for f in cached.glob("*.safetensors")}
    model_dir = model_copy(cached, tmp_path_factory.mktemp("default_model") / "model")
    s = Stack(tmp_path_factory.mktemp("default_stack"), model_dir)
    yield s
    if s.proc.poll() is None:
        s.stop()  # SIGTERM: the launcher stops the servers it started in their own sessions
    assert {f: f.stat().st_mtime_ns for f in cached.glob("*.safetensors")} == files, \
        "the shared launcher wrote into the cached default model"


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


@pytest.fixture(scope="session")
def owner_zygote():
    """Stand-in owners are forked from one process that imported them once."""
    with Zygote("tests.support.standin_owner") as zygote:
        yield zygote


@pytest.fixture
def owner_factory(tmp_path, owner_zygote):
    owners = []

    def make(model_dir: Path) -> tuple[OwnerProcess, Path]:
        export_dir = tmp_path / f"export{len(owners)}"
        owners.append(OwnerProcess(model_dir, export_dir, zygote=owner_zygote))
        return owners[-1], export_dir

    yield make
    for o in owners:
        o.close()
