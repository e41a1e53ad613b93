"""Ports for servers a test starts. A port the kernel hands out for port 0 lies in its
ephemeral range, which every outgoing connection draws from too: while vLLM starts (its
workers, gloo and ZMQ open sockets for tens of seconds) one of them can take the port picked
for the training server before it binds ("address already in use"). These are picked below
that range, where only an explicit bind lands."""

from __future__ import annotations

import random
import socket
from pathlib import Path


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def listen_port() -> int:
    """A loopback port, free now, outside the ephemeral range."""
    top = _ephemeral_start()
    for _ in range(100):
        port = random.randrange(20000, top) if top > 20000 else random.randrange(1024, top)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port below the ephemeral range")
