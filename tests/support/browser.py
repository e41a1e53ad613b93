"""Debian's Chromium driven by Playwright, for the console's browser tests.

Playwright never downloads a browser here: it drives the one apt installed (scripts/test.sh
installs it when missing). The browser is required, not optional: without it the tests fail.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def chromium() -> Iterator[object]:
    """A headless Chromium (playwright.sync_api.Browser) for the duration of the block."""
    path = shutil.which("chromium") or "/usr/bin/chromium"
    assert Path(path).exists(), (
        "Debian's chromium is required for the console's browser tests: apt-get install -y "
        "chromium (scripts/test.sh does it when it is missing)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path)
        try:
            yield browser
        finally:
            browser.close()
