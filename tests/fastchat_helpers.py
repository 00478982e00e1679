"""A real FastChat controller for the tests."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx


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
