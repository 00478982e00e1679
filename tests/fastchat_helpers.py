"""Helpers shared by the FastChat tests: free ports and a real FastChat controller."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> int:
    """A base port with ``n`` consecutive free ports."""
    for _ in range(100):
        base = free_port()
        if base + n > 65535:
            continue
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def start_controller(port: int, cwd: Path) -> subprocess.Popen:
    """``python -m fastchat.serve.controller`` on 127.0.0.1:port, once it answers."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastchat.serve.controller", "--host", "127.0.0.1", "--port", str(port)],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.post(f"http://127.0.0.1:{port}/list_models")
            return proc
        except httpx.HTTPError:
            assert proc.poll() is None and time.monotonic() < deadline, "controller did not start"
            time.sleep(0.1)
