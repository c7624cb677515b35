"""Redis is needed to change what is served, never to serve it.

A gateway on vLLM with an inference key, its registry on a Redis this test owns. Eight clients stream
completions without pause over the kit's aliases while the Redis server is killed with -9, kept down
for 30 s, and restarted from its append-only file. Every stream must succeed with its usual served-by
header; meanwhile admin writes answer 503 with Retry-After naming the registry, admin reads never
500, `/metrics` answers with `patchserve_redis_up 0`, `/readyz` says the registry is unreachable while
staying ready, and keys are still checked (a wrong key is still refused). Once Redis is back the replica
reconnects by itself: an admin write succeeds and `patchserve_redis_up` is 1 again, with no restart.
"""

from __future__ import annotations

import time

import httpx
import pytest

from adapters_store.redis_server import EmbeddedRedis
from tests.gateway_server import GatewayProcess
from tests.prometheus_server import free_port
from tests.registry_load import StreamingClients
from tests.run_summary import SUMMARY

CLIENTS = 8
OUTAGE_S = 30


@pytest.fixture(scope="module")
def outage(kit_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("outage")
    port = free_port()
    server = EmbeddedRedis(root / "redis", port).start()
    gw = GatewayProcess(kit_dir, "vllm", root, PATCHSERVE_REDIS_URL=server.url)
    try:
        gw.start()
        with gw.admin() as admin:
            key = admin.post("/admin/keys", json={"role": "inference", "name": "outage-client"}).json()["key"]
        yield root, port, server, gw, key
    finally:
        gw.stop()
        server.stop()  # the restarted server: the test hands its process over


def test_inference_survives_a_redis_outage_and_the_replica_recovers_by_itself(outage):
    root, port, server, gw, key = outage
    admin_key = gw.admin_key
    with StreamingClients(gw.url, key, CLIENTS) as traffic:
        time.sleep(3)
        served_before = traffic.ok
        assert served_before > 0, traffic.failures[:3]
        server.proc.kill()  # kill -9: no shutdown, no last write
        server.proc.wait()
        killed = time.monotonic()
        time.sleep(3)  # the replica notices at its next reconcile (every second)
        with gw.admin(admin_key) as admin:
            deadline = killed + OUTAGE_S
            while time.monotonic() < deadline:
                write = admin.post("/admin/aliases/reverse/rollback", json={"reason": "during the outage"})
                read = admin.get("/admin/aliases")
                metrics = httpx.get(f"{gw.url}/metrics", timeout=10)
                ready = httpx.get(f"{gw.url}/readyz", timeout=20)
                wrong = httpx.post(f"{gw.url}/v1/completions", headers={"authorization": "Bearer psk_wrong"},
                                   json={"model": "tiny", "prompt": "x", "max_tokens": 1}, timeout=10)
                assert write.status_code == 503, write.text
                assert write.headers["retry-after"] and write.json()["error"]["code"] == "registry_unavailable"
                assert "registry" in write.json()["error"]["message"].lower()
                assert read.status_code in (200, 503), read.text
                assert metrics.status_code == 200
                assert ready.status_code == 200 and "unreachable" in ready.json()["registry"], ready.text
                assert wrong.status_code == 401, wrong.text
                time.sleep(2)
            assert gw.metric("patchserve_redis_up") == 0
        restarted = EmbeddedRedis(root / "redis", port).start()
        server.proc = restarted.proc
        back = time.monotonic()
        with gw.admin(admin_key) as admin:
            while True:
                created = admin.post("/admin/keys", json={"role": "inference", "name": "after-outage"})
                if created.status_code == 201:
                    break
                assert created.status_code == 503, created.text
                assert time.monotonic() - back < 30, "admin writes still refused 30 s after Redis came back"
                time.sleep(0.2)
            writable_after = time.monotonic() - back
            deadline = time.monotonic() + 10
            while gw.metric("patchserve_redis_up") != 1:
                assert time.monotonic() < deadline, "patchserve_redis_up still 0 after Redis came back"
                time.sleep(0.2)
        time.sleep(2)
    assert not traffic.failures, f"{len(traffic.failures)} failed of {traffic.ok + len(traffic.failures)}: " \
                                 f"{traffic.failures[:5]}"
    assert traffic.ok > served_before
    ready = httpx.get(f"{gw.url}/readyz", timeout=20).json()
    assert ready["registry"] == "reachable"
    SUMMARY.append(f"registry outage: {traffic.ok} streams from {CLIENTS} clients, 0 failed, across a {OUTAGE_S} s "
                   f"Redis outage; admin writes accepted {writable_after:.1f} s after Redis came back")
