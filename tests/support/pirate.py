"""The pirate-greeting preference set (bench/data/preferences/pirate.json) and the one test
of whether an answer is a pirate's, shared by bench/preferences.py and
tests/test_e2e_preferences.py so both measure the same thing."""

from __future__ import annotations

import json
import re
from pathlib import Path

_DATA = json.loads((Path(__file__).parents[2] / "bench/data/preferences/pirate.json")
                   .read_text())
PAIRS: list[tuple[str, str, str]] = [tuple(p) for p in _DATA["pairs"]]  # greeting, pirate, plain
HELD_OUT: list[str] = _DATA["held_out"]  # greetings no pair shows
PIRATE: str = _DATA["pirate"]  # the two answers whose log-prob margin is measured on HELD_OUT
PLAIN: str = _DATA["plain"]
WORDS = frozenset({"ahoy", "matey", "arr", "ye", "yer", "aboard", "hearty"})


def is_pirate(text: str) -> bool:
    """A pirate's word in it, as a whole word ("arr", not "array")."""
    return bool(WORDS & set(re.findall(r"[a-z']+", text.lower())))
