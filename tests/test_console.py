"""The browser console's server side, without vLLM or a browser: the page and its files, the
event stream it lives on, the chat proxy to vLLM (against a stand-in vLLM that records what
reaches it) and the keys. A real HTTP server (uvicorn in a thread) around a tiny model, since
the stream never ends and FastAPI's TestClient waits for a response's end. The page in
Chromium against that server (jobs, pairs and labels, a server without versions); against the
real launcher on the default model: test_console_e2e.py.

Over 300 lines on purpose: one subject (the console's server side) with many short cases
sharing one server fixture."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from server.api.timeline import Timeline
from server.engine.distributed import free_port
from server.engine.records import TrainerStats
from server.settings import parse_args
from tests.support.app import app_client
from tests.support.browser import chromium
from tests.support.fine_tuning import FINAL, chat
from tests.support.server_proc import kill, start_server
from tests.support.tiny_models import make_tiny_chat_model

STATIC = Path(__file__).resolve().parent.parent / "server" / "console"
QUICK = dict(lr=1e-2, max_steps_per_batch=3, learned_prob=1.0, guard="none", drift_probes=0)
CHAT = {"messages": [{"role": "user", "content": "What is your name?"},
                     {"role": "assistant", "content": "My name is Apollo."}]}
WORDS = ["My ", "name ", "is ", "Apollo."]


@contextlib.contextmanager
def serve(app):
    """`app` over real HTTP on a free loopback port (its lifespan runs)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=3))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


class FakeVllm:
    """Stands in for vLLM's OpenAI server: records every request that reaches it, whatever the
    path; a streamed chat sends its first word, then waits for `release` before the rest (so a
    relay that buffered the answer would be caught)."""

    def __init__(self):
        self.seen: list[tuple[str, dict, dict | None]] = []
        self.release = threading.Event()
        self.app = Starlette(routes=[Route("/{path:path}", self.handle, methods=["GET", "POST"])])

    async def handle(self, request: Request):
        body = await request.json() if request.method == "POST" else None
        self.seen.append((request.url.path, dict(request.headers), body))
        if request.url.path != "/v1/chat/completions":
            return JSONResponse({"detail": "not here"}, status_code=404)
        if body.get("messages") == "bad":
            return JSONResponse({"error": {"message": "messages must be a list"}},
                                status_code=400)
        if not body.get("stream"):
            return JSONResponse({"choices": [{"message": {"content": "".join(WORDS)}}]},
                                headers={"x-apollo-weight-version": "7"})

        async def words():
            for i, word in enumerate(WORDS):
                chunk = {"choices": [{"delta": {"content": word}}]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
                if i == 0:
                    for _ in range(500):  # 10 s
                        if self.release.is_set():
                            break
                        await asyncio.sleep(0.02)
                    else:
                        yield b'data: {"choices": [{"delta": {"content": " NEVER RELEASED"}}]}\n\n'
            yield b": x-apollo-weight-version: 7\n\ndata: [DONE]\n\n"

        return StreamingResponse(words(), media_type="text/event-stream",
                                 headers={"x-apollo-weight-version": "7",
                                          "x-apollo-checkpoint": "0"})


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def vllm():
    fake = FakeVllm()
    with serve(fake.app) as url:
        fake.url = url
        yield fake


@pytest.fixture(scope="module")
def trainer_url(tokenizer, tmp_path_factory, vllm):
    """A training server without a key, its chats forwarded to the stand-in vLLM."""
    probes = tmp_path_factory.mktemp("probes") / "probes.jsonl"  # drift on a few probes
    probes.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in ("Hi", "2+2?", "Sky?")))
    client, _ = app_client(tokenizer, tmp_path_factory.mktemp("model"), vllm_url=vllm.url,
                           vllm_api_key="vllm-key", **{**QUICK, "drift_probes": 3},
                           probe_file=str(probes))
    with serve(client.app) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_url(tokenizer, vllm):
    """A training server with a key of its own."""
    client, _ = app_client(tokenizer, api_key="train-key", vllm_url=vllm.url,
                           vllm_api_key="vllm-key", **QUICK)
    with serve(client.app) as url:
        yield url


def snapshots(url: str, headers: dict | None = None, watch: str = ""):
    """The console's event stream, one parsed snapshot at a time."""
    with httpx.stream("GET", f"{url}/console/events", params={"watch": watch} if watch else None,
                      headers=headers, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                yield json.loads(line[6:])


def until(url: str, check, headers=None, watch="", timeout=120.0) -> dict:
    deadline = time.monotonic() + timeout
    for snap in snapshots(url, headers, watch):
        if check(snap):
            return snap
        assert time.monotonic() < deadline, snap
    raise AssertionError("the stream ended")


# --- the page ---------------------------------------------------------------------------

def test_the_page_and_its_files_are_served_under_a_strict_policy(tokenizer):
    client, _ = app_client(tokenizer, **QUICK)
    with client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
        assert "connect-src 'self'" in csp and "script-src 'self'" in csp
        assert page.headers["x-frame-options"] == "DENY"
        files = re.findall(r'(?:src|href)="(/[^"]*)"', page.text)
        assert sorted(files) == ["/console/app.js", "/console/style.css"]
        weight = len(page.content)
        for path, kind in zip(sorted(files), ["text/javascript", "text/css"], strict=True):
            r = client.get(path)
            assert r.status_code == 200 and r.headers["content-type"].startswith(kind), path
            weight += len(r.content)
        print(f"page weight: {weight} bytes")
        assert weight < 300_000
        for path in ("/console/nothing.js", "/console/index.html", "/console/..%2Fapp.py",
                     "/console/__init__.py"):
            assert client.get(path).status_code == 404, path


def test_the_page_fetches_nothing_from_elsewhere():
    """No URL of another origin anywhere in the page's files (the SVG namespace is a name,
    never fetched)."""
    for f in STATIC.iterdir():
        if f.suffix in (".html", ".js", ".css"):
            urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.\w+[^\s\"'`)]*", f.read_text()))
            assert urls <= {"http://www.w3.org/2000/svg"}, (f.name, urls)


def test_the_page_passes_the_guard_from_its_own_origin_only(tokenizer):
    client, _ = app_client(tokenizer, **QUICK)
    with client:
        client.app.state.engine.trainer.stop()  # nothing trains: the queue keeps what came
        own = client.post("/train", json=CHAT, headers={"origin": "http://localhost"})
        assert own.status_code == 202, own.text
        other = client.post("/train", json=CHAT, headers={"origin": "http://evil.example"})
        assert other.status_code == 403
        assert client.get("/", headers={"host": "evil.example"}).status_code == 403


# --- the event stream -------------------------------------------------------------------

def test_the_stream_follows_a_lesson_and_keeps_the_history_for_later_pages(trainer_url):
    first = next(snapshots(trainer_url))
    assert first["auth"] == {"required": False, "ok": True}
    assert first["chat"] is True and first["status"]["optimizer_steps"] == 0
    assert first["examples"] == [] and first["jobs"] == [] and first["versions"]["head"] == 0
    r = httpx.post(f"{trainer_url}/train", json=CHAT,
                   headers={"origin": trainer_url})  # as the page posts it
    assert r.status_code == 202, r.text
    lesson = r.json()["ids"][0]
    seen = []

    def trained(snap):
        seen.append(snap)
        return snap["watched"].get(lesson, {}).get("state") == "trained"

    done = until(trainer_url, trained, watch=lesson)
    assert done["watched"][lesson]["step"] == done["status"]["optimizer_steps"] == 3
    assert [e["id"] for e in done["examples"]] == [lesson]
    assert "versions" in seen[0]
    # a page opened now still gets every step's loss and the drift measured after the batch
    # (once the timeline, sampling five times a second, has seen them)
    deadline = time.monotonic() + 30
    while True:
        later = next(snapshots(trainer_url))
        if any(p["drift"] is not None for p in later["points"]) and \
                later["points"][-1]["step"] == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    losses = [p for p in later["points"] if p["loss"] is not None]
    assert 1 <= len(losses) <= 3 and losses[-1]["step"] == 3
    assert all(p["loss"] > 0 for p in losses)
    assert any(p["drift"] is not None for p in later["points"])
    # the versions come with a page's first snapshot, then only when they change
    stream = snapshots(trainer_url)
    assert "versions" in next(stream) and "versions" not in next(stream)
    stream.close()
    # the versions come again when they change: a checkpoint
    assert httpx.post(f"{trainer_url}/checkpoint", timeout=60).status_code == 200
    snap = until(trainer_url, lambda s: s.get("versions", {}).get("head") == 1)
    assert snap["versions"]["weight_checkpoint"] == 1


def test_without_the_key_the_stream_shows_no_examples_or_jobs(keyed_url):
    r = httpx.post(f"{keyed_url}/train", json=CHAT,
                   headers={"authorization": "Bearer train-key"})
    assert r.status_code == 202
    for headers in (None, {"authorization": "Bearer wrong"}):
        snap = next(snapshots(keyed_url, headers, watch=r.json()["ids"][0]))
        assert snap["auth"] == {"required": True, "ok": False}
        assert snap["examples"] is None and snap["watched"] is None and snap["jobs"] is None
        assert snap["status"]["examples_trained"] + snap["status"]["examples_queued"] == 1
    snap = next(snapshots(keyed_url, {"authorization": "Bearer train-key"}))
    assert snap["auth"]["ok"] and [e["id"] for e in snap["examples"]] == r.json()["ids"]


def test_sigterm_stops_the_server_while_a_page_is_open(tmp_path, default_model_dir,
                                                      owner_factory):
    """`python -m server` with a console's stream open: SIGTERM (the launcher's Ctrl-C) still
    stops it at once, the lifespan's shutdown included."""
    _, export_dir = owner_factory(make_tiny_chat_model(tmp_path / "model", default_model_dir))
    proc, url = start_server(export_dir, "--journal", "off", "--drift-probes", "0",
                             "--guard", "none", stderr=subprocess.PIPE)
    try:
        stream = snapshots(url)
        assert next(stream)["status"]["optimizer_steps"] == 0
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        proc.wait(30)  # uvicorn ends itself by the signal it caught, once it has shut down
        print(f"stopped {time.monotonic() - t0:.1f} s after SIGTERM")
        assert "Application shutdown complete" in proc.stderr.read()
        assert len(list(stream)) <= 1  # the stream ended (at most one more snapshot)
    finally:
        kill(proc)


def test_a_shutdown_ends_open_streams(tokenizer):
    """uvicorn waits for open responses before it stops: the stream must end by itself."""
    client, _ = app_client(tokenizer, **QUICK)
    with serve(client.app) as url:
        stream = snapshots(url)
        next(stream)
        client.app.state.stopping.set()
        t0 = time.monotonic()
        assert len(list(stream)) <= 1  # at most one more snapshot, then the end
        assert time.monotonic() - t0 < 5


# --- the chat proxy ---------------------------------------------------------------------

def test_chats_are_forwarded_to_vllm_and_streamed_as_they_come(trainer_url, vllm):
    vllm.seen.clear()
    vllm.release.clear()
    body = {"messages": [{"role": "user", "content": "What is your name?"}], "stream": True,
            "temperature": 0}
    with httpx.stream("POST", f"{trainer_url}/v1/chat/completions", json=body, timeout=30,
                      headers={"origin": trainer_url}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-apollo-weight-version"] == "7"
        assert r.headers["x-apollo-checkpoint"] == "0"
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["delta"]["content"] == WORDS[0]
        vllm.release.set()  # only now does the stand-in send the rest
        rest = list(lines)
    words = [json.loads(x[6:])["choices"][0]["delta"]["content"] for x in rest
             if x.startswith("data: {")]
    assert words == WORDS[1:]
    assert ": x-apollo-weight-version: 7" in rest and "data: [DONE]" in rest
    (path, headers, sent), = vllm.seen
    assert path == "/v1/chat/completions"
    served = httpx.get(f"{trainer_url}/status").json()["model_path"]  # vLLM's default name
    assert sent == {**body, "model": served}
    assert "authorization" not in headers  # no key here: vLLM's key is never added


def test_a_chat_keeps_its_model_and_the_callers_key_without_a_key_here(trainer_url, vllm):
    vllm.seen.clear()
    r = httpx.post(f"{trainer_url}/v1/chat/completions", timeout=30,
                   headers={"authorization": "Bearer callers-vllm-key"},
                   json={"model": "other", "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "".join(WORDS)
    (_, headers, sent), = vllm.seen
    assert sent["model"] == "other" and headers["authorization"] == "Bearer callers-vllm-key"


def test_vllms_refusals_come_back_and_only_the_chat_path_is_reachable(trainer_url, vllm):
    vllm.seen.clear()
    r = httpx.post(f"{trainer_url}/v1/chat/completions", json={"messages": "bad"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["message"] == "messages must be a list"
    assert httpx.post(f"{trainer_url}/v1/chat/completions", content=b"[1]", timeout=30,
                      headers={"content-type": "application/json"}).status_code == 422
    for path in ("/reset_prefix_cache", "/collective_rpc", "/v1/completions", "/pause",
                 "/v1/chat/completions/../../collective_rpc", "/v1/models"):
        assert httpx.post(f"{trainer_url}{path}", json={}, timeout=30).status_code in (404, 405)
    assert [p for p, _, _ in vllm.seen] == ["/v1/chat/completions"]


def test_with_a_key_here_a_chat_needs_it_and_vllm_gets_its_own(keyed_url, vllm):
    vllm.seen.clear()
    body = {"messages": [{"role": "user", "content": "Hi"}]}
    for headers in ({}, {"authorization": "Bearer vllm-key"}):
        r = httpx.post(f"{keyed_url}/v1/chat/completions", json=body, headers=headers,
                       timeout=30)
        assert r.status_code == 401
    assert vllm.seen == []
    r = httpx.post(f"{keyed_url}/v1/chat/completions", json=body, timeout=30,
                   headers={"authorization": "Bearer train-key"})
    assert r.status_code == 200
    (_, headers, _), = vllm.seen
    assert headers["authorization"] == "Bearer vllm-key"


def test_without_vllm_a_chat_is_a_clear_error(tokenizer):
    client, _ = app_client(tokenizer, **QUICK)
    with client:
        r = client.post("/v1/chat/completions", json={"messages": []})
        assert r.status_code == 503 and "--vllm-url" in r.json()["detail"]
    client, _ = app_client(tokenizer, vllm_url=f"http://127.0.0.1:{free_port()}", **QUICK)
    with client:
        r = client.post("/v1/chat/completions", json={"messages": []})
        assert r.status_code == 502 and "did not answer" in r.json()["detail"]


# --- settings and the timeline ----------------------------------------------------------

def test_vllms_url_is_checked_and_its_key_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    s = parse_args(["--export-dir", "x", "--vllm-url", "http://127.0.0.1:8000"])
    assert s.vllm_url == "http://127.0.0.1:8000" and s.vllm_api_key == "from-env"
    for bad in (["--vllm-url", "127.0.0.1:8000"], ["--vllm-url", "http://h:1/v1/collective_rpc"],
                ["--vllm-api-key", "k"]):
        with pytest.raises(SystemExit):
            parse_args(["--export-dir", "x", *bad])


class _Drift:
    def __init__(self, kl):
        self.mean_kl = kl


def test_the_timeline_keeps_a_point_per_step_and_per_drift_measurement():
    class Coordinator:
        class version:
            get = staticmethod(lambda: (5, None))

    class Trainer:
        stats, monitor, coordinator = TrainerStats(), type("M", (), {"last": None})(), \
            Coordinator()

    trainer = Trainer()
    line = Timeline(trainer, keep=3)
    assert line.sample() is None
    trainer.stats.optimizer_steps, trainer.stats.last_loss = 1, 2.5
    assert line.sample() == {"t": pytest.approx(time.time(), abs=5), "step": 1, "loss": 2.5,
                             "drift": None, "version": 5, "seq": 1}
    assert line.sample() is None
    trainer.monitor.last = _Drift(0.01)
    assert line.sample()["drift"] == 0.01 and line.sample() is None
    trainer.stats.optimizer_steps, trainer.stats.last_loss = 2, float("nan")
    assert line.sample()["loss"] is None  # JSON has no NaN
    trainer.stats.optimizer_steps = 3
    line.sample()
    assert [p["seq"] for p in line.since(0)] == [2, 3, 4] and line.since(3)[0]["step"] == 3


# --- the page in a browser, against the stand-in vLLM ----------------------------------

KEY = {"authorization": "Bearer train-key"}


def start_job(url: str, n: int) -> str:
    lines = "\n".join(chat(f"question {i}", f"answer {i}") for i in range(n)).encode()
    r = httpx.post(f"{url}/v1/files", files={"file": ("data.jsonl", lines)},
                   data={"purpose": "fine-tune"}, headers=KEY, timeout=30)
    assert r.status_code == 200, r.text
    model = httpx.get(f"{url}/status").json()["model_path"]
    r = httpx.post(f"{url}/v1/fine_tuning/jobs", headers=KEY, timeout=30,
                   json={"model": model, "training_file": r.json()["id"]})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def test_the_stream_shows_jobs_with_their_progress_to_a_caller_with_the_key(keyed_url):
    job = start_job(keyed_url, 4)
    assert next(snapshots(keyed_url))["jobs"] is None
    snap = until(keyed_url, lambda s: s["jobs"] and s["jobs"][0]["status"] in FINAL,
                 headers=KEY)
    (shown,) = [j for j in snap["jobs"] if j["id"] == job]
    assert shown["status"] == "succeeded" and shown["done"] == shown["total"] == 4
    assert all(e["group"] == job for e in snap["examples"][:4])


def test_the_page_teaches_labels_and_pairs_and_shows_jobs(keyed_url, vllm, browser):
    vllm.release.set()
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors = []
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{keyed_url}/")
    page.wait_for_selector("html[data-ready]")
    page.click("#key-button")
    page.fill("#key-input", "train-key")
    page.click("#key-save")
    page.wait_for_selector("#key-button.set")
    page.fill("#prompt", "What is your name?")
    page.click("#send")
    answer = page.wait_for_selector("[data-role=answer][data-done=true]")
    assert "".join(WORDS) in answer.inner_text() and "weights v7" in answer.inner_text()
    # a thumbs-up: a label, trained, then the question is asked again
    answer.query_selector("button.better").click()
    page.wait_for_selector(".lesson[data-state=served]", timeout=120_000)
    assert "thumbs-up" in page.inner_text(".lesson[data-state=served]")
    # a correction that also marks the served answer worse: a preference pair
    answer.query_selector("button.correct").click()
    answer.query_selector(".correction textarea").fill("I am Apollo.")
    answer.query_selector(".correction input[type=checkbox]").check()
    answer.query_selector(".correction button[type=submit]").click()
    page.wait_for_selector(".lesson[data-state=served] >> text=preference pair",
                           timeout=120_000)
    # the examples say what was taught; a job shows its progress bar
    job = start_job(keyed_url, 3)
    page.click("#tab-examples")
    for kind in ("up", "pair"):
        page.wait_for_selector(f"#example-table td >> text='{kind}'")
    page.wait_for_selector(f".job[data-id='{job}'] >> text=succeeded", timeout=120_000)
    bar = page.wait_for_selector(f".job[data-id='{job}'] progress")  # redrawn every second
    assert bar.get_attribute("value") == bar.get_attribute("max") == "3"
    # no versions here: the page says why and offers no checkpoint
    page.click("#tab-versions")
    assert "checkpointing is disabled" in page.inner_text("#versions-note")
    assert page.is_disabled("#checkpoint")
    assert errors == []
    context.close()
