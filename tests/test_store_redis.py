"""The embedded Redis: an acknowledged write survives kill -9; a second gateway reuses the running server."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import redis

from adapters_store.errors import EmbeddedRedisFailed
from adapters_store.redis_server import EmbeddedRedis, connect, stop_embedded
from adapters_store.registry import Registry
from service.settings import Settings
from tests.prometheus_server import free_port


def _files(n: int) -> dict[str, str]:
    return {"adapter_config.json": f"{n:064x}", "adapter_model.safetensors": f"{n + 1:064x}"}


def _kill_9(server: EmbeddedRedis) -> None:
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait()


def test_acknowledged_writes_survive_kill_9_and_none_is_half_applied(tmp_path):
    server = EmbeddedRedis(tmp_path, free_port()).start()
    try:
        reg = Registry(server.client())
        reg.register_base("base-v1", "1", path="/kit/base-v1")
        reg.create_version("acme", "base-v1", _files(0))
        reg.activate("support", "acme", 1, actor="alice", reason="first")
        # Writes race the kill: whatever was acknowledged must be there afterwards, and nothing half-done.
        acknowledged: list[int] = []
        killer = threading.Timer(0.3, _kill_9, args=(server,))
        killer.start()
        try:
            for i in range(100_000):
                acknowledged.append(reg.create_version("acme", "base-v1", _files(i)).version)
        except redis.ConnectionError:
            pass
        killer.join()
        assert server.proc is not None and server.proc.poll() == -signal.SIGKILL and len(acknowledged) > 1
    finally:
        server.stop()

    server = EmbeddedRedis(tmp_path, server.port).start()
    try:
        reg = Registry(server.client())
        assert reg.get_alias("support").ref == "acme@1" and reg.get_base("base-v1").path == "/kit/base-v1"
        stored = [v.version for v in reg.list_versions("acme")]
        assert set(acknowledged) <= set(stored)
        # One script = one AOF transaction: number, record and audit entry all made, or none of them.
        assert stored == list(range(1, len(stored) + 1))
        assert int(reg.r.get(reg._k("patch", "acme", "next"))) == len(stored)
        assert len([a for a in reg.audit(limit=200_000) if a.action == "create_version"]) == len(stored)
    finally:
        server.stop()


def test_a_second_gateway_reuses_the_running_server(tmp_path):
    first = EmbeddedRedis(tmp_path, free_port()).start()
    try:
        second = EmbeddedRedis(tmp_path, first.port).start()
        assert second.proc is None, "nothing new was started"
        second.client().set("k", "v")
        second.stop()  # not its server: it keeps running
        assert first.client().get("k") == b"v"
        with pytest.raises(EmbeddedRedisFailed, match="taken by a Redis whose data is in"):
            EmbeddedRedis(tmp_path / "elsewhere", first.port).start()
    finally:
        first.stop()
    assert not first.answers()


def test_connect_uses_redis_url_or_starts_the_embedded_server(tmp_path, store_redis_url, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    client = connect(Settings(redis_url=store_redis_url, data_dir=tmp_path))
    assert client.ping() and not (tmp_path / "redis").exists()
    monkeypatch.setenv("REDIS_URL", store_redis_url)
    assert connect(Settings(data_dir=tmp_path)).ping() and not (tmp_path / "redis").exists()

    monkeypatch.delenv("REDIS_URL")
    monkeypatch.delenv("PATCHSERVE_REDIS_URL", raising=False)
    settings = Settings(data_dir=tmp_path, redis_port=free_port())
    client = connect(settings)
    try:
        client.set("k", "v")
        assert (tmp_path / "redis").is_dir() and connect(settings).get("k") == b"v"
    finally:
        stop_embedded()
    assert not EmbeddedRedis(tmp_path, settings.redis_port).answers()
