"""`kill -9` of the gateway during an upload: no half-registered version, nothing acknowledged lost.

The gateway runs on a Redis the test started (as in production, where Redis outlives a gateway), and is
killed while the request body is still arriving, then at several moments after the whole body was sent
(while it validates, stores blobs, registers). After each restart: every registered version is
complete (both files, each blob present and hashing to its name), every acknowledged upload is there,
the staging directory is empty, and every alias serves its recorded version.
"""

from __future__ import annotations

import threading
import time
import uuid

import httpx
import openai
import pytest
import redis

from adapters_store.blobs import LocalBlobStore
from adapters_store.redis_server import EmbeddedRedis
from adapters_store.registry import Registry
from tests.gateway_server import GatewayProcess
from tests.prometheus_server import free_port

PATCH_FILES = {"adapter_config.json", "adapter_model.safetensors"}
# Seconds between the last byte of the body and the kill: an upload of the kit's qa patch is answered in
# about 10-20 ms here, so the small delays land while it is parsed, validated, stored or registered.
KILL_DELAYS = [0.0, 0.002, 0.005, 0.01, 0.02, 0.3]


@pytest.fixture(scope="module")
def crashing(kit_dir, tmp_path_factory):
    """(redis client, gateway): the gateway is killed and restarted by the tests."""
    root = tmp_path_factory.mktemp("crash")
    server = EmbeddedRedis(root / "redis", free_port()).start()
    gw = GatewayProcess(kit_dir, "transformers", root, PATCHSERVE_REDIS_URL=server.url).start()
    client = redis.Redis.from_url(server.url)
    try:
        yield client, gw
    finally:
        gw.stop()
        client.close()
        server.stop()


def _body(gw: GatewayProcess, name: str, kit_dir) -> tuple[bytes, dict[str, str]]:
    """The multipart request an upload sends, as bytes, so that the test controls when each byte goes."""
    files = [("file", (f.name, f.read_bytes())) for f in sorted((kit_dir / "patches" / "qa").iterdir())]
    request = httpx.Request("POST", f"{gw.url}/admin/patches/{name}/versions", files=files,
                            headers={"authorization": f"Bearer {gw.admin_key}"})
    return request.read(), dict(request.headers)


def _send(gw: GatewayProcess, name: str, body: bytes, headers: dict, chunk: int, pause_s: float,
          sent: threading.Event, outcome: list) -> None:
    def chunks():
        for i in range(0, len(body), chunk):
            yield body[i:i + chunk]
            time.sleep(pause_s)
            if i + chunk >= len(body) // 2:
                sent.set()  # half the body is out (or all of it, when chunk covers it)

    try:
        r = httpx.post(f"{gw.url}/admin/patches/{name}/versions", content=chunks(), headers=headers, timeout=30)
        outcome.append(r.json()["version"] if r.status_code == 201 else r.status_code)
    except httpx.HTTPError as exc:  # the gateway died under the request: not acknowledged
        outcome.append(type(exc).__name__)


def _check_store(client: redis.Redis, gw: GatewayProcess) -> dict[str, list[int]]:
    """Every registered version is whole and every alias is served as recorded; returns versions by patch."""
    registry = Registry(client, prefix="ps:")
    blobs = LocalBlobStore(gw.data_dir / "blobs")
    versions = {}
    for patch in registry.list_patches():
        for record in registry.list_versions(patch):
            assert set(record.files) == PATCH_FILES, f"{record.ref} is missing files: {record.files}"
            for file_name, digest in record.files.items():
                assert blobs.exists(digest) and blobs.verify(digest), f"{record.ref}/{file_name} is not stored whole"
        versions[patch] = [r.version for r in registry.list_versions(patch)]
    assert not any((gw.data_dir / "uploads").iterdir()), "staging left by the crash is cleared at start"
    recorded = {alias: p.ref for alias, p in registry.snapshot().items()}
    with gw.admin() as admin:
        assert admin.get("/admin/replica").json()["aliases"] == recorded
    return versions


def _serves(gw: GatewayProcess, model: str) -> str:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
    raw = client.completions.with_raw_response.create(model=model, prompt="Q: x\nA:", max_tokens=2, temperature=0)
    return raw.headers["x-patchserve-served-by"]


def test_kill_while_the_body_arrives_registers_nothing(crashing, kit_dir):
    client, gw = crashing
    name = f"crash-{uuid.uuid4().hex[:8]}"
    body, headers = _body(gw, name, kit_dir)
    sent, outcome = threading.Event(), []
    sender = threading.Thread(target=_send, args=(gw, name, body, headers, 16 << 10, 0.05, sent, outcome))
    sender.start()
    assert sent.wait(60)
    gw.kill()
    sender.join(30)
    assert outcome and not isinstance(outcome[0], int), f"a half-sent upload was answered: {outcome}"
    gw.start()
    assert name not in _check_store(client, gw)


def test_kill_at_any_moment_after_the_upload_loses_nothing_acknowledged(crashing, kit_dir):
    client, gw = crashing
    name = f"crash-{uuid.uuid4().hex[:8]}"
    with gw.admin() as admin:  # an alias on the patch, so a restart has something to restore
        body, headers = _body(gw, name, kit_dir)
        r = admin.post(f"/admin/patches/{name}/versions", content=body, headers=headers)
        assert r.status_code == 201
        assert admin.post(f"/admin/aliases/{name}/activate", json={"version": 1}).status_code == 200
    acknowledged, seen = [1], []
    for delay in KILL_DELAYS:
        sent, outcome = threading.Event(), []
        sender = threading.Thread(target=_send, args=(gw, name, body, headers, len(body), 0.0, sent, outcome))
        sender.start()
        assert sent.wait(30)
        time.sleep(delay)
        gw.kill()
        sender.join(30)
        seen.append((delay, outcome[0] if outcome else None))
        if outcome and isinstance(outcome[0], int):
            acknowledged.append(outcome[0])
        gw.start()
        versions = _check_store(client, gw)[name]
        assert set(acknowledged) <= set(versions), f"acknowledged {acknowledged}, registered {versions}"
        assert versions == list(range(1, len(versions) + 1)), "versions are numbered without gaps"
        assert _serves(gw, name) == f"base=base-v1; patch={name}@1"
        for version in versions:  # a version registered but never acknowledged is whole, so it serves
            assert _serves(gw, f"{name}@{version}") == f"base=base-v1; patch={name}@{version}"
    print("\nkill after the body (s) → outcome: " + ", ".join(f"{d}→{o}" for d, o in seen))
