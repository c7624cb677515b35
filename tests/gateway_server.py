"""A live gateway for tests: `patchserve serve` in a subprocess on a free loopback port."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from tests.process_ready import wait_ready
from tests.prometheus_server import free_port


class GatewayProcess:
    """A gateway on its own data dir; with no PATCHSERVE_REDIS_URL in `env`, on its own embedded Redis."""

    def __init__(self, kit_dir: Path, engine: str, logdir: Path, **env: str):
        self.engine, self.logdir = engine, logdir
        self.data_dir = Path(env.pop("PATCHSERVE_DATA_DIR", logdir / "data"))
        self.env = {**os.environ, "PATCHSERVE_KIT_DIR": str(kit_dir), "PATCHSERVE_ENGINE": engine,
                    "PATCHSERVE_LOG_LEVEL": "WARNING",
                    "PATCHSERVE_DATA_DIR": str(self.data_dir), "PATCHSERVE_REDIS_PORT": str(free_port()), **env}
        self._use_port(free_port())
        self.proc: subprocess.Popen | None = None
        self._started = False

    def _use_port(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.logdir / f"gateway-{self.engine}-{self.port}.log"
        self.env["PATCHSERVE_PORT"] = str(port)

    @property
    def admin_key(self) -> str:
        """The admin key this gateway (or the first replica on its data dir) generated at first start."""
        return (self.data_dir / "admin.key").read_text().strip()

    def admin(self, key: str | None = None) -> httpx.Client:
        """An HTTP client for /admin with the admin key."""
        return httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {key or self.admin_key}"},
                            timeout=60)

    def wait_job(self, location: str, timeout: float = 300) -> dict:
        """Poll a job (`/admin/jobs/{id}`, as a 202's location says) until it succeeded or failed; returns it."""
        import time

        deadline = time.monotonic() + timeout
        with self.admin() as admin:
            while (job := admin.get(location).json())["state"] not in ("succeeded", "failed"):
                assert time.monotonic() < deadline, f"job still {job['state']} at {job['progress']}% ({job['stage']})"
                time.sleep(0.2)
        return job

    def kill(self) -> None:
        """kill -9: no shutdown handler runs."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def start(self, timeout: float = 240) -> GatewayProcess:
        for attempt in range(3):
            try:
                self.proc = _start(["serve"], self.env, self.log_path, f"{self.url}/readyz", timeout, "gateway")
                self._started = True
                return self
            except RuntimeError as exc:
                # free_port() names a port free when asked; another process may take it before the gateway
                # binds it (seen in CI: vLLM's own sockets, when the gateway bound only after its engine started).
                # A first start moves to another port; a restart keeps its address, so it raises.
                if self._started or "address already in use" not in str(exc).lower() or attempt == 2:
                    raise
                self._use_port(free_port())
        return self

    def stop(self) -> None:
        _stop(self.proc)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include `labels`, read from /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        for family in text_string_to_metric_families(httpx.get(f"{self.url}/metrics", timeout=10).text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total


class RouterProcess:
    """`patchserve router` in a subprocess on a free loopback port, on the gateways' Redis."""

    def __init__(self, redis_url: str, logdir: Path, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = logdir / f"router-{self.port}.log"
        self.env = {**os.environ, "PATCHSERVE_REDIS_URL": redis_url, "PATCHSERVE_ROUTER_PORT": str(self.port),
                    "PATCHSERVE_DATA_DIR": str(logdir / "router"), "PATCHSERVE_LOG_LEVEL": "WARNING", **env}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> RouterProcess:
        self.proc = _start(["router"], self.env, self.log_path, f"{self.url}/readyz", timeout, "router")
        return self

    def stop(self) -> None:
        _stop(self.proc)


def _start(command: list[str], env: dict, log: Path, ready_url: str, timeout: float, what: str) -> subprocess.Popen:
    """`patchserve <command>` in a subprocess, once `ready_url` answers 200; stderr to `log`."""
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", *command], env=env, stdout=subprocess.DEVNULL,
                            stderr=log.open("w"))
    wait_ready(proc, ready_url, log, timeout, what)
    return proc


def _stop(proc: subprocess.Popen | None) -> None:
    """SIGTERM (a drain), then SIGKILL if it has not exited in 30 s."""
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
