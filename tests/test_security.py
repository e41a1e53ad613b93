"""Safe defaults: what a web page the user visits, a process reading argv, or a network peer
can and cannot do to the training server and the launcher (docs/service.md, threat model)."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from server.settings import parse_args
from tests.support import ROOT
from tests.support.app import app_client
from tests.support.server_proc import kill, start_server
from tests.support.tiny_models import make_tiny_chat_model

CHAT = {"messages": [{"role": "user", "content": "What is your name?"},
                     {"role": "assistant", "content": "My name is Apollo."}]}
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def client(tokenizer):
    c, _ = app_client(tokenizer, max_body_bytes=1000, allowed_hosts="trainer.lan,*.corp")
    with c:
        c.app.state.engine.trainer.stop()  # nothing trains: any queued example is the request's
        yield c


def _unchanged(client, call) -> httpx.Response:
    before = client.get("/status").json()
    r = call()
    assert client.get("/status").json() == before
    return r


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8001", "localhost.evil.example",
                                  "10.0.0.5", "", "trainer.lan.evil.example"])
def test_a_foreign_host_is_refused_and_changes_nothing(client, host):
    """DNS rebinding: the attacker's name, resolved to 127.0.0.1, is still in Host."""
    r = _unchanged(client, lambda: client.post("/train", json=CHAT, headers={"host": host}))
    assert r.status_code == 403 and "allowed-hosts" in r.json()["detail"]
    assert client.get("/status", headers={"host": host}).status_code == 403


@pytest.mark.parametrize("host", ["localhost", "localhost:8001", "127.0.0.1:8001", "[::1]:8001",
                                  "127.1.2.3", "trainer.lan:8001", "gpu1.corp"])
def test_loopback_and_allowed_hosts_are_served(client, host):
    assert client.get("/status", headers={"host": host}).status_code == 200


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://localhost:3000",
                                    "https://localhost.evil.example", "file://"])
def test_a_cross_origin_post_is_refused_and_changes_nothing(client, origin):
    for path in ("/train", "/checkpoint"):
        r = _unchanged(client, lambda p=path: client.post(p, json=CHAT,
                                                          headers={"origin": origin}))
        assert r.status_code == 403 and "cross-origin" in r.json()["detail"], r.text


def test_the_servers_own_origin_and_clients_without_one_may_post(client):
    assert client.post("/train", json=CHAT, headers={"origin": "http://localhost"}).status_code \
        == 202
    assert client.post("/train", json=CHAT).status_code == 202


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_a_cross_site_form_post_is_refused(client, content_type):
    """HTML forms post these without a CORS preflight (and without Origin in old browsers)."""
    headers = {"content-type": content_type} if content_type else {}
    body = b'{"prompt": "q", "completion": "a"}'
    r = _unchanged(client, lambda: client.post("/train", content=body, headers=headers))
    assert r.status_code == 415, r.text


def test_a_chunked_body_over_the_limit_is_refused_unread(client):
    def chunks():
        yield b'[{"prompt": "q", "completion": "' + b"a" * 600
        yield b"a" * 600 + b'"}]'

    r = _unchanged(client, lambda: client.post("/train", content=chunks(), headers=JSON))
    assert r.status_code == 413 and "max-body-bytes" in r.json()["detail"]
    # under the limit, chunked is fine
    small = iter([b'{"prompt": "q", ', b'"completion": "a"}'])
    assert client.post("/train", content=small, headers=JSON).status_code == 202


def _server_exit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=ROOT, timeout=60,
                          capture_output=True, text=True,
                          env={**{k: v for k, v in os.environ.items()
                                  if k != "VLLM_APOLLO_API_KEY"},
                               "PYTHONPATH": str(ROOT), **(env or {})})


def test_the_training_server_refuses_a_network_bind_without_a_key(tmp_path, monkeypatch,
                                                                  capsys):
    r = _server_exit("--export-dir", str(tmp_path), "--host", "0.0.0.0", "--attach-timeout", "1")
    assert r.returncode == 2 and "without an API key" in r.stderr, r.stderr[-500:]
    monkeypatch.delenv("VLLM_APOLLO_API_KEY", raising=False)
    for host in ("192.168.1.5", "::", "myhost.example"):
        with pytest.raises(SystemExit):
            parse_args(["--export-dir", "x", "--host", host])
        assert "without an API key" in capsys.readouterr().err
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert parse_args(["--export-dir", "x", "--host", host]).host == host


def test_keys_never_come_from_argv(tmp_path, monkeypatch):
    r = _server_exit("--export-dir", str(tmp_path), "--api-key", "s3cret")
    assert r.returncode == 2 and "--api-key-file" in r.stderr and "ps" in r.stderr
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    key.chmod(0o600)
    s = parse_args(["--export-dir", "x", "--host", "0.0.0.0", "--api-key-file", str(key)])
    assert s.api_key == "s3cret"
    monkeypatch.setenv("VLLM_APOLLO_API_KEY", "from-env")
    assert parse_args(["--export-dir", "x", "--host", "0.0.0.0"]).api_key == "from-env"
    key.chmod(0o666)
    with pytest.raises(SystemExit):
        parse_args(["--export-dir", "x", "--api-key-file", str(key)])


@pytest.mark.parametrize("env,args,says", [
    ({"BIND_HOST": "0.0.0.0"}, [], "VLLM_API_KEY"),
    ({"BIND_HOST": "0.0.0.0", "VLLM_API_KEY": "k"}, [], "VLLM_APOLLO_API_KEY"),
    ({"BIND_HOST": "0.0.0.0", "VLLM_APOLLO_API_KEY": "k"}, [], "VLLM_API_KEY"),
    ({}, ["--api-key", "k"], "command line"),
    ({"TRAIN_ARGS": "--api-key k"}, [], "command line"),
])
def test_the_launcher_refuses_before_starting_anything(tmp_path, env, args, says):
    base = {k: v for k, v in os.environ.items()
            if k not in ("VLLM_API_KEY", "VLLM_APOLLO_API_KEY", "BIND_HOST", "TRAIN_ARGS")}
    r = subprocess.run([str(ROOT / "scripts/start_vllm_with_apollo.sh"), str(tmp_path), *args],
                       env={**base, "VLLM_APOLLO_RUN_DIR": str(tmp_path / "run"), **env},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and says in r.stderr, r.stderr[-1000:]
    assert not (tmp_path / "run").exists()  # nothing was started


def test_a_real_server_refuses_foreign_hosts_and_origins_and_big_chunked_bodies(
        tmp_path, default_model_dir, owner_factory):
    model_dir = make_tiny_chat_model(tmp_path / "model", default_model_dir)
    _, export_dir = owner_factory(model_dir)
    proc, url = start_server(export_dir, "--journal", "off", "--max-body-bytes", "1000")
    try:
        assert httpx.post(f"{url}/train", json=CHAT,
                          headers={"host": "rebound.example"}).status_code == 403
        assert httpx.post(f"{url}/train", json=CHAT,
                          headers={"origin": "http://evil.example"}).status_code == 403
        assert httpx.post(f"{url}/train", content=b'{"prompt":"q","completion":"a"}',
                          headers={"content-type": "text/plain"}).status_code == 415
        big = iter([b"[" + b" " * 900, b" " * 900 + b"]"])
        assert httpx.post(f"{url}/train", content=big, headers=JSON).status_code == 413
        assert httpx.get(f"{url}/status").json()["examples_queued"] == 0
        assert httpx.post(f"{url}/train", json=CHAT).status_code == 202
    finally:
        kill(proc)
