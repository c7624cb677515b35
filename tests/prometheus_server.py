"""A real Prometheus (Debian's package) started for a test, scraping one target on loopback."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import httpx
import yaml

from tests.process_ready import wait_ready

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusServer:
    """deploy/'s Prometheus config with its targets rewritten to `targets` and a 1 s scrape interval."""

    def __init__(self, workdir: Path, *targets: str):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["scrape_configs"][0]["static_configs"] = [{"targets": list(targets)}]
        config["rule_files"] = [str(DEPLOY / "alerts.yml")]
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen | None = None

    def start(self) -> PrometheusServer:
        binary = shutil.which("prometheus")
        assert binary, "Debian's prometheus package is installed by scripts/install.sh"
        self.proc = subprocess.Popen(
            [binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=(self.workdir / "prometheus.log").open("w"))
        wait_ready(self.proc, f"{self.url}/-/ready", self.workdir / "prometheus.log", 30, "prometheus")
        return self

    def query(self, expr: str) -> dict:
        """The API's answer to an instant query (status, data or error)."""
        return httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()

    def target_health(self) -> list[str]:
        targets = httpx.get(f"{self.url}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        return [t["health"] for t in targets]

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(timeout=10)
