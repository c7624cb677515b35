"""Two gateway processes sharing one Redis and one blob directory, as two replicas behind a balancer.

A move made through either replica is served by both within 2 s; a move whose pub/sub event a replica
missed is repaired by its periodic reconcile; a replica killed with -9 and restarted serves every alias
at its recorded version. The replicas run the transformers engine: the sync under test is the gateway's,
the same for both engines, and this engine starts in seconds.
"""

from __future__ import annotations

import time
import uuid

import httpx
import openai
import pytest
import redis

from adapters_store.redis_server import EmbeddedRedis
from adapters_store.registry import Registry
from tests.gateway_server import GatewayProcess
from tests.prometheus_server import free_port

PROPAGATION_S = 2.0


@pytest.fixture(scope="module")
def replicas(kit_dir, tmp_path_factory):
    """(redis_url, replica A, replica B): separate data dirs, one Redis, one blob directory."""
    root = tmp_path_factory.mktemp("replicas")
    server = EmbeddedRedis(root / "redis", free_port()).start()
    shared = {"PATCHSERVE_REDIS_URL": server.url, "PATCHSERVE_BLOB_DIR": str(root / "blobs")}
    started = []
    try:
        for name in ("a", "b"):
            (root / name).mkdir()
            started.append(GatewayProcess(kit_dir, "transformers", root / name,
                                          PATCHSERVE_DATA_DIR=str(root / name / "data"), **shared).start())
        yield server.url, *started
    finally:
        for gw in started:
            gw.stop()
        server.stop()


def _admin(gw: GatewayProcess, key: str) -> httpx.Client:
    return gw.admin(key)


def _served(gw: GatewayProcess, key: str) -> dict[str, str]:
    with _admin(gw, key) as c:
        return c.get("/admin/replica").json()["aliases"]


def _wait_served(gw: GatewayProcess, key: str, alias: str, engine_name: str, timeout: float = 10.0) -> float:
    """Seconds until `gw` serves `alias` as `engine_name` (polled every 20 ms); fails past `timeout`."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if _served(gw, key).get(alias) == engine_name:
            return time.perf_counter() - started
        time.sleep(0.02)
    pytest.fail(f"{gw.url} still serves {alias} as {_served(gw, key).get(alias)}, not {engine_name}")


def _served_by(gw: GatewayProcess, alias: str) -> str:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
    raw = client.completions.with_raw_response.create(model=alias, prompt="Reverse: a b\nOutput:", max_tokens=2,
                                                      temperature=0)
    return raw.headers["x-patchserve-served-by"]


def _two_versions(gw: GatewayProcess, key: str, kit_dir) -> str:
    name = f"rep-{uuid.uuid4().hex[:8]}"
    with _admin(gw, key) as c:
        for patch in ("sentiment", "reverse"):
            files = [("file", (f.name, f.read_bytes())) for f in sorted((kit_dir / "patches" / patch).iterdir())]
            assert c.post(f"/admin/patches/{name}/versions", files=files).status_code == 201
    return name


def test_both_replicas_serve_a_move_made_on_either(replicas, kit_dir):
    _, a, b = replicas
    key = a.admin_key  # the first replica made the admin key; keys live in the shared Redis
    assert not (b.data_dir / "admin.key").exists(), "the second replica must not mint a second admin key"
    name = _two_versions(a, key, kit_dir)
    delays = []
    with _admin(a, key) as c:
        assert c.post(f"/admin/aliases/{name}/activate", json={"version": 1}).status_code == 200
    delays.append(_wait_served(b, key, name, f"{name}@1"))
    with _admin(b, key) as c:  # and the other way round
        assert c.post(f"/admin/aliases/{name}/activate",
                      json={"version": 2, "force": True, "reason": "test"}).status_code == 200
    assert _served(b, key)[name] == f"{name}@2", "the replica that moved it serves it when it answers"
    delays.append(_wait_served(a, key, name, f"{name}@2"))
    with _admin(a, key) as c:
        assert c.post(f"/admin/aliases/{name}/rollback", json={"reason": "test"}).status_code == 200
    delays.append(_wait_served(b, key, name, f"{name}@1"))
    print(f"\nreplica propagation: {', '.join(f'{d * 1000:.0f} ms' for d in delays)}")
    assert max(delays) < PROPAGATION_S
    for gw in (a, b):
        assert _served_by(gw, name) == f"base=base-v1; patch={name}@1"


def test_a_missed_event_is_repaired_by_the_reconcile(replicas, kit_dir):
    url, a, b = replicas
    key = a.admin_key
    name = _two_versions(a, key, kit_dir)
    with _admin(a, key) as c:
        assert c.post(f"/admin/aliases/{name}/activate", json={"version": 1}).status_code == 200
    _wait_served(b, key, name, f"{name}@1")
    client = redis.Redis.from_url(url)
    registry = Registry(client, prefix="ps:")
    repairs = b.metric("patchserve_registry_repairs_total")
    # Cut every subscriber off, then move the alias while nobody listens: the event is published to no one.
    # (A replica resubscribes only after its reconcile interval, so this window is wide.)
    for _ in range(5):
        client.client_kill_filter(_type="pubsub")
        if client.pubsub_numsub(registry.channel)[0][1] == 0:
            registry.activate(name, name, 2, actor="test", reason="published to no one")
            break
        time.sleep(0.2)
    else:
        pytest.fail("the replicas' subscriptions could not be cut")
    delay = _wait_served(b, key, name, f"{name}@2")
    print(f"\nmissed event repaired in {delay * 1000:.0f} ms")
    assert delay < PROPAGATION_S
    assert b.metric("patchserve_registry_repairs_total") > repairs, "the reconcile, not an event, moved it"
    _wait_served(a, key, name, f"{name}@2")
    # The listeners come back: the next move arrives by event again.
    time.sleep(1.5)
    assert client.pubsub_numsub(registry.channel)[0][1] == 2
    client.close()


def test_a_killed_replica_restarts_serving_every_alias_at_its_recorded_version(replicas, kit_dir):
    url, a, b = replicas
    key = a.admin_key
    name = _two_versions(a, key, kit_dir)
    with _admin(a, key) as c:
        assert c.post(f"/admin/aliases/{name}/activate", json={"version": 2}).status_code == 200
    b.kill()
    with _admin(a, key) as c:  # moved while B is down: B must come back at the recorded version, not its last
        assert c.post(f"/admin/aliases/{name}/activate", json={"version": 1, "reason": "b is down",
                                                                      "force": True}).status_code == 200
    b.start()
    client = redis.Redis.from_url(url)
    recorded = {alias: p.ref for alias, p in Registry(client, prefix="ps:").snapshot().items()}
    client.close()
    assert recorded[name] == f"{name}@1"
    assert _served(b, key) == recorded
    assert _served_by(b, name) == f"base=base-v1; patch={name}@1"
