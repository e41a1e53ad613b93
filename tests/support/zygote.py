"""Fresh child processes without a fresh interpreter's imports, for the kill -9 tests.

A kill -9 test starts a new child after every kill, and each spent seconds importing torch and
the project before it could do anything (on 2 cores, most of such a test's time). A `Zygote`
is a process that imports a child module once and then forks one process per `spawn`: each
child is a process of its own (its own pid, killed alone, recovering from the files and shared
memory only), started in milliseconds. A `Child` has the part of `subprocess.Popen` the tests
use: `pid`, text `stdin` / `stdout` (a socket to the child), `send_signal`, `kill`, `wait`.

    python -m tests.support.zygote MODULE  (run by `Zygote`; MODULE runs as __main__ per child)
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import time
import traceback
import uuid

from tests.support import ROOT


class Child:
    """One forked child: its stdin and stdout are the two directions of one socket (or, with
    `spawn(..., talk=False)`, /dev/null and no socket)."""

    def __init__(self, zygote: Zygote, pid: int, conn: socket.socket | None):
        self.zygote, self.pid, self._conn = zygote, pid, conn
        self.stdout = conn.makefile("r", encoding="utf-8") if conn else None
        self.stdin = conn.makefile("w", encoding="utf-8") if conn else None
        self.returncode: int | None = None

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def poll(self) -> int | None:
        if self.returncode is None:
            self._ended(self.zygote._ask(["poll", self.pid]))
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """The exit status as Popen gives it (-9: killed by SIGKILL); closes the socket.
        subprocess.TimeoutExpired after `timeout` seconds."""
        if timeout is not None:
            deadline = time.monotonic() + timeout
            while self.poll() is None:
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(f"zygote child {self.pid}", timeout)
                time.sleep(0.05)
        if self.returncode is None:
            self._ended(self.zygote._ask(["wait", self.pid]))
        return self.returncode

    def _ended(self, returncode: int | None) -> None:
        if returncode is None:
            return
        self.returncode = returncode
        for f in (self.stdin, self.stdout, self._conn):
            try:
                if f is not None:
                    f.close()
            except OSError:  # the child is gone: what it did not read is lost
                pass


class Zygote:
    """`python -m tests.support.zygote MODULE` with the tests' environment; `spawn(*args)` runs
    MODULE as __main__ with those arguments in a fresh fork."""

    def __init__(self, module: str, env: dict | None = None, stderr=None):
        """`env`: added to the environment; `stderr` (as Popen takes it): the children's."""
        self.module = module
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.zygote", module], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT,
            # numpy's OpenBLAS starts a thread pool when imported; these children do not use
            # it, and a process that forks should hold no other thread
            env={**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1",
                 **(env or {})})
        self.children: list[Child] = []
        assert self._read() == "ready", f"zygote for {module} did not start"

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"zygote for {self.module} exited ({self.proc.wait()})")
        return json.loads(line)

    def _ask(self, request: list):
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def spawn(self, *args: str, talk: bool = True, timeout: float = 120) -> Child:
        """A fresh child running the module with `args`; `talk=False`: its stdin and stdout
        are /dev/null (a server whose output nobody reads must not block on a full socket)."""
        if not talk:
            self.children.append(Child(self, self._ask(["fork", None, list(args)]), None))
            return self.children[-1]
        address = f"\0apollo-zygote-{uuid.uuid4().hex}"  # abstract: no file to clean up
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(address)
            listener.listen(1)
            listener.settimeout(timeout)
            pid = self._ask(["fork", address, list(args)])
            conn, _ = listener.accept()
        conn.settimeout(None)
        self.children.append(Child(self, pid, conn))
        return self.children[-1]

    def close(self) -> None:
        for child in self.children:
            if child.returncode is None:
                child.kill()
                child.wait()
        self.proc.stdin.close()
        self.proc.wait(60)

    def __enter__(self) -> Zygote:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _child(module: str, address: str | None, args: list[str]) -> None:
    """In the fork: stdin and stdout become the socket at `address` (None: /dev/null), MODULE
    runs as __main__; never returns."""
    code = 1
    try:
        if address is None:
            conn = open(os.devnull, "r+b")  # noqa: SIM115
        else:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(address)
        os.dup2(conn.fileno(), 0)
        os.dup2(conn.fileno(), 1)
        conn.close()
        sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.argv = [module, *args]
        sys.modules.pop(module, None)  # runs afresh as __main__ (what it imports stays loaded)
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
        finally:
            os._exit(code)


def main() -> None:
    module = sys.argv[1]
    importlib.import_module(module)  # the imports every child would repeat
    # Forking is safe only while this process runs one thread (no OpenMP pool yet).
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        raise SystemExit(f"zygote: importing {module} started {threads - 1} threads")
    reply = sys.stdout
    reply.write('"ready"\n')
    reply.flush()
    for line in sys.stdin:
        request = json.loads(line)
        if request[0] == "fork":
            pid = os.fork()
            if pid == 0:
                _child(module, request[1], request[2])
            answer = pid
        elif request[0] in ("wait", "poll"):
            pid, status = os.waitpid(request[1], 0 if request[0] == "wait" else os.WNOHANG)
            answer = os.waitstatus_to_exitcode(status) if pid else None
        else:
            raise SystemExit(f"zygote: unknown request {request!r}")
        reply.write(json.dumps(answer) + "\n")
        reply.flush()


if __name__ == "__main__":
    main()
