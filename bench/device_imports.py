"""Run a module as it would import on the GPU machine: the project's imports of packages
that machine's image lacks fail here too, so the GPU kit's dry run shows what must be carried
there as wheels before a device run, not during it.

    .venv/bin/python -m bench.device_imports -m bench.gpu_check --device cpu --logdir /tmp/x
    .venv/bin/python -m bench.device_imports --check   # import what the kit imports, list misses

Only imports made by the project's own code are checked (a third-party package importing its
own dependencies is the image's business: its versions there differ from this venv's). Child
Python processes get the same check (through a sitecustomize on PYTHONPATH); every blocked
import is listed at the end, also those the code caught and went on without.
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata
import os
import re
import runpy
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOG_ENV = "APOLLO_DEVICE_IMPORTS_LOG"

# The GPU machine's image ("Python packages already there", as last read on 2026-11-17).
DEVICE_PACKAGES = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator
lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx
ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf
psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz
torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers
treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug
wheel wrapt xarray xxhash yarl zipp
""".split()

# What the GPU kit imports at its top (and its steps in their own processes).
KIT_MODULES = ["bench.gpu_check", "bench.cotrain", "bench.optimizer", "bench.tune_projection",
               "tests.support.standin_owner"]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class DeviceImports(importlib.abc.MetaPathFinder):
    """Refuses top-level imports, made from the project's files, of distributions the device
    image lacks; records each refusal."""

    def __init__(self, log: str | None):
        allowed = {_norm(n) for n in DEVICE_PACKAGES}
        self.blocked = {top: sorted(dists) for top, dists in
                        importlib.metadata.packages_distributions().items()
                        if not any(_norm(d) in allowed for d in dists)
                        and not (ROOT / top).exists()}
        self.log = log

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        if path is not None or top not in self.blocked or not self._from_project():
            return None
        dists = ", ".join(self.blocked[top])
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"{top}\t{dists}\t{self._importer()}\n")
        raise ModuleNotFoundError(f"No module named {top!r} (the GPU machine lacks {dists}; "
                                  "bench/device_imports.py)", name=top)

    @staticmethod
    def _caller_file() -> str:
        frame = sys._getframe(0)
        while frame is not None and (frame.f_code.co_filename in (__file__, "") or
                                     frame.f_code.co_filename.startswith("<frozen") or
                                     "importlib" in frame.f_code.co_filename):
            frame = frame.f_back
        return frame.f_code.co_filename if frame is not None else ""

    def _from_project(self) -> bool:
        caller = self._caller_file()
        return caller.startswith(str(ROOT)) and "/.venv/" not in caller

    def _importer(self) -> str:
        return os.path.relpath(self._caller_file(), ROOT)


def install() -> DeviceImports:
    finder = DeviceImports(os.environ.get(LOG_ENV))
    sys.meta_path.insert(0, finder)
    return finder


def _child_env(log: str) -> str:
    """A directory holding a sitecustomize that installs the check in child processes."""
    site = tempfile.mkdtemp(prefix="device-imports-")
    Path(site, "sitecustomize.py").write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
        "from bench.device_imports import install\ninstall()\n")
    os.environ[LOG_ENV] = log
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [site, str(ROOT),
                                                             os.environ.get("PYTHONPATH")]))
    return site


def report(log: str) -> int:
    lines = sorted(set(Path(log).read_text().splitlines())) if Path(log).exists() else []
    if not lines:
        print("device imports: every import the project made is on the GPU machine's image")
        return 0
    print("device imports: the GPU machine lacks (carry these as wheels):")
    for line in lines:
        top, dists, where = line.split("\t")
        print(f"  {dists} (import {top}, from {where})")
    return 1


def main() -> None:
    args = sys.argv[1:]
    log = tempfile.mktemp(prefix="device-imports-", suffix=".log")
    _child_env(log)
    install()
    if args[:1] == ["--check"]:
        failed = []
        for name in KIT_MODULES:
            try:
                __import__(name)
            except ImportError as exc:
                failed.append(f"{name}: {exc}")
        print("\n".join(failed) or f"imported {', '.join(KIT_MODULES)}")
        sys.exit(report(log) or bool(failed))
    if args[:1] != ["-m"] or len(args) < 2:
        raise SystemExit("usage: python -m bench.device_imports (--check | -m MODULE [ARGS...])")
    sys.argv = args[1:]
    code = 0
    try:
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (exc.code is not None)
    finally:
        report(log)
    sys.exit(code)


if __name__ == "__main__":
    main()
