"""vLLM plugin that exports the served model's live weight tensors to the trainer.

Registered as a ``vllm.general_plugins`` entry point, so vLLM calls :func:`register` in every
process it starts (API server, engine core, workers). It is inert unless the launcher sets
``VLLM_APOLLO_EXPORT_DIR``, and cheap either way. This package imports nothing else from the
project: the export format (hooks/export.py) is its only contract with the trainer.
"""

from __future__ import annotations

import os

EXPORT_DIR_ENV = "VLLM_APOLLO_EXPORT_DIR"


def register() -> None:
    """vLLM entry point; idempotent."""
    export_dir = os.environ.get(EXPORT_DIR_ENV)
    if not export_dir:
        return
    from hooks.vllm_worker import install

    install(export_dir)
