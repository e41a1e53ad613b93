"""Training files for the fine-tuning API's tests: chat lines and a JSONL writer."""

from __future__ import annotations

import json
from pathlib import Path

FINAL = ("succeeded", "failed", "cancelled")  # a job's ended states


def chat(q: str, a: str) -> str:
    """One line of OpenAI's chat fine-tuning format: a question and its answer."""
    return json.dumps({"messages": [{"role": "user", "content": q},
                                    {"role": "assistant", "content": a}]})


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def pair(q: str, preferred: str, rejected: str) -> str:
    """One line of OpenAI's DPO fine-tuning format: a question, the preferred answer, the other."""
    return json.dumps({"input": {"messages": [{"role": "user", "content": q}]},
                       "preferred_output": [{"role": "assistant", "content": preferred}],
                       "non_preferred_output": [{"role": "assistant", "content": rejected}]})
