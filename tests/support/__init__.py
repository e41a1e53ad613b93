"""Test support: fixtures and child processes shared by tests and benchmarks (stand-in owners
of exported weights, tiny models, the launcher as a subprocess, vLLM hosts). No tests here."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
