"""Waiting for a server process the tests started: until its URL answers 200, it exits, or time runs out."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float, what: str) -> None:
    """Return once GET `url` answers 200; raise with the log's tail if `proc` exits or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{what} not ready in {timeout} s: {log.read_text()[-3000:]}")
