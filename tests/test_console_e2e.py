"""The browser console end to end: Debian's Chromium, driven by Playwright, against the real
launcher (vLLM with the hook and the training server) on the default model, with an API key.

Ask "What is your name?", correct the answer in the page: without the key the lesson is
refused and the page says so; with it, the lesson's state follows to "served" and the page
shows the new answer; the loss chart has points; a checkpoint and a confirmed rollback from
the versions view. The page is measured (weight, time to interactive) and screenshots of every
view, at 1280 and at 320 px wide, are saved under tests/artifacts/console/.

Chromium is required, not optional (tests/support/browser.py): scripts/test.sh installs it
(apt) when it is missing, and without it this test fails.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support import ROOT
from tests.support.browser import chromium
from tests.support.stack import Stack, model_copy

pytestmark = pytest.mark.e2e
KEY = "console-e2e-key"
ARTIFACTS = ROOT / "tests" / "artifacts" / "console"
QUESTION, ANSWER = "What is your name?", "My name is Apollo."
SERVED_S = 900  # a lesson from POST to the answer asked again: ~15 s on an idle machine
MS = 1000


@pytest.fixture(scope="module")
def stack(tmp_path_factory, default_model_dir):
    """The launcher with a key, on a copy of the default model (the test checkpoints and
    rolls back). The fixture to swap for a shared launcher that has a key."""
    model_dir = tmp_path_factory.mktemp("console") / "model"
    model_copy(default_model_dir, model_dir)  # the guard's cached fit comes along
    s = Stack(tmp_path_factory.mktemp("run"), model_dir, env={"VLLM_APOLLO_API_KEY": KEY})
    s.key = KEY
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


class Console:
    """One browser page on the console; console errors and page errors are collected."""

    def __init__(self, browser, url: str, width: int, height: int):
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.goto(url)
        self.page.wait_for_selector("html[data-ready]", timeout=30 * MS)
        self.ready_ms = int(self.page.get_attribute("html", "data-ready"))

    def weight(self) -> int:
        """Bytes of the page and its files, as the browser loaded them (not the API)."""
        return self.page.evaluate("""() => {
            const nav = performance.getEntriesByType('navigation')[0];
            const files = performance.getEntriesByType('resource')
              .filter(e => new URL(e.name).pathname.match(/^\\/console\\/[\\w.]+\\.(js|css)$/));
            return nav.decodedBodySize + files.reduce((n, e) => n + e.decodedBodySize, 0);
        }""")

    def key(self, value: str | None) -> None:
        """Enter the key (or forget it) through the page's dialog."""
        self.page.click("#key-button")
        if value is None:
            self.page.click("#key-forget")
        else:
            self.page.fill("#key-input", value)
            self.page.press("#key-input", "Enter")
        self.page.wait_for_selector("#key-dialog", state="hidden")

    def view(self, name: str) -> None:
        self.page.click(f"#tab-{name}")
        self.page.wait_for_selector(f"#{name}", state="visible")

    def shot(self, name: str, full_page: bool = True) -> Path:
        """A screenshot (the whole page, or what the window shows: the chat keeps its input
        at the window's bottom, where a whole-page picture would cut through the answers)."""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        return path

    def unexpected_errors(self) -> list[str]:
        """Chromium logs every 4xx a script's fetch got ("Failed to load resource"); the
        refusals this test provokes on purpose are 401s."""
        return [e for e in self.errors if not re.fullmatch(
            r"Failed to load resource: the server responded with a status of 401.*", e)]


def test_ask_correct_and_see_the_new_answer(stack, browser):
    print(f"screenshots: {ARTIFACTS}")
    c = Console(browser, f"{stack.train}/", 1280, 800)
    page = c.page
    weight = c.weight()
    print(f"time to interactive {c.ready_ms} ms (navigation start to the first snapshot "
          f"shown); page weight {weight} bytes")
    assert c.ready_ms < 1000
    assert 0 < weight < 300_000
    assert page.inner_text("#key-button") == "API key needed"

    # the key, entered once in the page, then a question; the answer streams in
    c.key(stack.key)
    page.wait_for_selector("#key-button.set")
    page.fill("#prompt", QUESTION)
    page.press("#prompt", "Enter")
    first = page.wait_for_selector("[data-role=answer][data-done=true]", timeout=300 * MS)
    before = first.inner_text()
    assert "weights v" in before
    assert ANSWER not in before  # the untouched model has another name

    # without the key the correction is refused, and the page says why
    c.key(None)
    first.query_selector("button.correct").click()
    first.query_selector(".correction textarea").fill(ANSWER)
    first.query_selector(".correction button[type=submit]").click()
    refused = page.wait_for_selector(".lesson[data-state=refused]", timeout=30 * MS)
    assert "401" in refused.inner_text() and "API key" in refused.inner_text()
    assert "API key" in page.inner_text("#notice")
    assert page.inner_text("#key-button") == "API key needed"
    c.shot("refused-without-key")

    # with the key: queued -> trained at step N -> served, and the question asked again
    c.key(stack.key)
    first.query_selector("button.correct").click()
    first.query_selector(".correction textarea").fill(ANSWER)
    first.query_selector(".correction button[type=submit]").click()
    lesson = page.wait_for_selector(".lesson[data-state=queued], .lesson[data-state=trained], "
                                    ".lesson[data-state=served]", timeout=60 * MS)
    lesson_id = lesson.get_attribute("data-id")
    page.wait_for_selector(f".lesson[data-id='{lesson_id}'][data-state=served]",
                           timeout=SERVED_S * MS)
    assert re.search(r"trained at step \d+ .*served: weights v\d+", lesson.inner_text())
    again = page.wait_for_selector(f"[data-lesson='{lesson_id}'][data-done=true]")
    after = again.inner_text()
    print(f"before: {before!r}\nafter:  {after!r}")
    assert ANSWER in after and "asked again after the lesson" in after
    assert "superseded" in first.get_attribute("class")
    c.shot("chat-desktop")

    # training: the loss chart has points, the counters moved
    c.view("training")
    page.wait_for_function("Number(document.querySelector('#loss-chart').dataset.points) > 0")
    assert page.locator("#loss-chart circle.pt").count() >= 1
    assert re.search(r"Optimizer steps\s*[1-9]", page.inner_text("#stats"))
    c.shot("training-desktop")

    # examples: the lesson, trained
    c.view("examples")
    row = page.wait_for_selector(f"#example-table tr[data-id='{lesson_id}']")
    assert "trained" in row.inner_text()
    c.shot("examples-desktop")

    # versions: checkpoint now; a rollback asks first, and Cancel changes nothing
    c.view("versions")
    page.click("#checkpoint")
    # the notice says the checkpoint is being written (a stale one, e.g. "API key saved",
    # is replaced at once), then what it wrote
    page.wait_for_selector("#notice >> text=/^Checkpoint (v\\d|refused|:)/", timeout=300 * MS)
    assert re.search(r"Checkpoint v1", page.inner_text("#notice"))
    page.wait_for_selector("#version-table tr[data-n='1']", timeout=30 * MS)
    weights = page.inner_text("#weights")
    page.focus("#version-table tr[data-n='0'] button.rollback")  # from the keyboard
    page.wait_for_timeout(2500)  # snapshots come; the keyboard's place stays
    assert page.evaluate("document.activeElement.closest('tr').dataset.n") == "0"
    page.keyboard.press("Enter")
    page.wait_for_selector("#confirm-dialog[open]")
    assert page.evaluate("document.activeElement.id") == "confirm-no"  # the safe choice first
    page.keyboard.press("Escape")
    page.wait_for_selector("#confirm-dialog", state="hidden")
    page.wait_for_timeout(2500)  # two snapshots: nothing was rolled back
    assert page.inner_text("#weights") == weights
    c.shot("versions-desktop")
    page.click("#version-table tr[data-n='0'] button.rollback")
    page.click("#confirm-yes")
    page.wait_for_selector("#notice.info >> text=Rolled back to version 0", timeout=300 * MS)
    # the lesson's state follows: the original weights do not hold it
    page.wait_for_selector(f".lesson[data-id='{lesson_id}'][data-state='rolled back']",
                           timeout=60 * MS)
    assert c.unexpected_errors() == []
    c.context.close()


def test_the_page_works_at_320_px_and_from_the_keyboard(stack, browser):
    c = Console(browser, f"{stack.train}/", 320, 640)
    page = c.page
    assert page.evaluate("document.documentElement.scrollWidth") <= 320
    c.shot("chat-320", full_page=False)
    c.key(stack.key)
    # the views are tabs: arrows move between them
    page.focus("#tab-chat")
    for view in ("training", "examples", "versions"):
        page.keyboard.press("ArrowRight")
        page.wait_for_selector(f"#{view}", state="visible")
        assert page.evaluate("document.activeElement.id") == f"tab-{view}"
        assert page.evaluate("document.documentElement.scrollWidth") <= 320, view
        c.shot(f"{view}-320")
    page.keyboard.press("ArrowRight")  # around to the chat
    page.wait_for_selector("#chat", state="visible")
    # ask from the keyboard alone
    for _ in range(20):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "prompt":
            break
    assert page.evaluate("document.activeElement.id") == "prompt"
    page.keyboard.type("Say hello.")
    page.keyboard.press("Enter")
    page.wait_for_selector("[data-role=answer][data-done=true]", timeout=300 * MS)
    assert page.evaluate("document.documentElement.scrollWidth") <= 320
    c.shot("chat-320-answered", full_page=False)
    assert c.errors == []
    c.context.close()
