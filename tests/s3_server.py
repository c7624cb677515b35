"""A real S3 API server for tests: moto's server mode in a subprocess on a free loopback port."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import boto3

from tests.process_ready import wait_ready
from tests.prometheus_server import free_port

CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
# What a gateway, worker or router process needs in its environment to reach the server.
ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class S3Server:
    """moto_server with `buckets` created; `client()` gives a boto3 client of its own."""

    def __init__(self, logdir: Path, buckets: tuple[str, ...] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(logdir) / "moto.log"
        self.buckets = buckets
        self.proc: subprocess.Popen | None = None

    def start(self) -> S3Server:
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log_path.open("w"), stderr=subprocess.STDOUT)
        wait_ready(self.proc, f"{self.url}/moto-api/", self.log_path, 30, "moto_server")
        for bucket in self.buckets:
            self.client().create_bucket(Bucket=bucket)
        return self

    def client(self):
        return boto3.client("s3", endpoint_url=self.url, **CREDENTIALS)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
