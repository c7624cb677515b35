"""Scale-out: one endpoint (the router) for two bases on three gateways, as a cluster would run them.

Two gateways host base-v1 and one hosts base-v2, on one Redis and one S3 bucket (a real S3 API
server: moto's), each with a blob cache of its own, behind one `patchserve router`. Through the
official openai client and the router only:
- moving an alias to a base no live replica hosts is refused (409 naming it), as are a base named
  like an alias and an alias named like a base; `/admin/cluster` shows every replica;
- 20 moves of an alias between the two bases under streaming load from 8 clients: no request fails,
  and each answer is exactly the greedy text of the version its `x-patchserve-served-by` names;
- a rolling restart (SIGTERM, drain, start again) of both base-v1 gateways under the same load: none fails;
- a gateway killed with -9 leaves the router's view within 3 s; only the streams it was sending
  break (no one can finish those), and every request that arrives after the kill is served.
The gateways run the transformers engine (they start in seconds); the router and the heartbeats
under test are the same for both engines. No worker runs: nothing here needs a job.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field

import httpx
import openai
import pytest

from adapters_store.redis_server import EmbeddedRedis
from tests.conftest import read_jsonl
from tests.gateway_server import GatewayProcess, RouterProcess
from tests.prometheus_server import free_port
from tests.s3_server import ENV as S3_ENV
from tests.s3_server import S3Server

CLIENTS = 8
MOVES = 20


@pytest.fixture(scope="module")
def cluster(kit_dir, tmp_path_factory):
    """(router, [v1 gateway a, v1 gateway b], start base-v2's gateway, root): no base-v2 gateway yet."""
    root = tmp_path_factory.mktemp("scale-out")
    server = EmbeddedRedis(root / "redis", free_port()).start()
    s3 = S3Server(root, ("patchserve-blobs",)).start()
    shared = {"PATCHSERVE_REDIS_URL": server.url, "PATCHSERVE_BLOB_URL": "s3://patchserve-blobs/cluster",
              "PATCHSERVE_S3_ENDPOINT_URL": s3.url, **S3_ENV, "PATCHSERVE_WORKER_IN_PROCESS": "false"}
    started: list = [s3]

    def gateway(name: str, **env: str) -> GatewayProcess:
        (root / name).mkdir()
        # Its own data dir, so its own blob cache (<data_dir>/blobs): every version comes from S3.
        gw = GatewayProcess(kit_dir, "transformers", root / name, PATCHSERVE_DATA_DIR=str(root / name / "data"),
                            PATCHSERVE_REPLICA_ID=name, **shared, **env)
        started.append(gw)
        return gw.start()

    try:
        v1 = [gateway("v1-a"), gateway("v1-b")]
        router = RouterProcess(server.url, root)
        started.append(router)
        router.start()
        # base-v2's gateway as a cluster starts it: no kit, its base from its checkpoint, no `tiny`.
        v2 = lambda: gateway("v2", PATCHSERVE_BASE="base-v2", PATCHSERVE_SEED_KIT="false", PATCHSERVE_BASE_ALIASES="[]",
                             PATCHSERVE_BASE_PATH=str(kit_dir / "base-v2"), PATCHSERVE_BASE_VERSION="kit")
        yield router, v1, v2, v1[0].admin_key
    finally:
        for process in reversed(started):
            process.stop()
        server.stop()


def _admin(router: RouterProcess, key: str) -> httpx.Client:
    return httpx.Client(base_url=router.url, headers={"authorization": f"Bearer {key}"}, timeout=60)


def _client(router: RouterProcess) -> openai.OpenAI:
    # No retries of its own: a request the router failed must show as failed.
    return openai.OpenAI(base_url=f"{router.url}/v1", api_key="none", max_retries=0, timeout=60)


def _complete(router: RouterProcess, model: str, prompt: str) -> tuple[str, str]:
    raw = _client(router).completions.with_raw_response.create(
        model=model, prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    return raw.headers["x-patchserve-served-by"], raw.parse().choices[0].text


@dataclass
class Load:
    """`CLIENTS` threads streaming completions through the router until stopped; every answer is kept."""

    router: RouterProcess
    model: str
    prompt: str
    results: list = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list = field(default_factory=list)

    def __enter__(self) -> Load:
        for _ in range(CLIENTS):
            thread = threading.Thread(target=self._run, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def _run(self) -> None:
        client = _client(self.router)
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                raw = client.completions.with_raw_response.create(
                    model=self.model, prompt=self.prompt, max_tokens=12, temperature=0, stream=True,
                    extra_body={"ignore_eos": True})
                text = "".join(chunk.choices[0].text for chunk in raw.parse() if chunk.choices)
                self.results.append(("ok", raw.headers.get("x-patchserve-served-by"), text, started))
            except Exception as exc:  # a failed request is the finding, whatever its kind
                self.results.append(("failed", repr(exc), "", started))

    def failures(self) -> list:
        return [r for r in self.results if r[0] != "ok"]


def test_guards_refuse_moves_to_an_unhosted_base_and_names_that_mean_two_things(cluster, kit_dir):
    router, v1, _, key = cluster
    with _admin(router, key) as admin:
        cluster_view = admin.get("/admin/cluster").json()
        assert {r["id"] for r in cluster_view["replicas"]} == {"v1-a", "v1-b"}
        assert cluster_view["bases"] == {"base-v1": ["v1-a", "v1-b"]} and cluster_view["unserved_bases"] == []
        assert all(r["versions"] and r["heartbeat_age_s"] < 2 for r in cluster_view["replicas"]), cluster_view

        upgrade = {"name": "base-v2", "version": "kit", "path": str(kit_dir / "base-v2")}
        refused = admin.post("/admin/bases", json={**upgrade, "move": True})
        assert refused.status_code == 409 and "base-v2" in refused.json()["error"]["message"], refused.text
        assert "base-v2" not in {b["name"] for b in admin.get("/admin/bases").json()}  # nothing changed
        assert admin.post("/admin/bases", json={**upgrade, "move": True, "force": True}).status_code == 400  # no reason

        collision = admin.post("/admin/bases", json={**upgrade, "name": "sentiment"})
        assert collision.status_code == 409 and "alias" in collision.json()["error"]["message"]
        assert admin.post("/admin/bases", json=upgrade).status_code == 202  # registered; its job waits for a worker

        files = [("files", (f.name, f.read_bytes())) for f in (kit_dir / "patches" / "sentiment").iterdir()]
        uploaded = admin.post("/admin/patches/sentiment/versions", files=files, data={"base": "base-v2"})
        assert uploaded.status_code == 201 and uploaded.json()["base"] == "base-v2"
        version = uploaded.json()["version"]
        move = admin.post("/admin/aliases/sentiment/activate", json={"version": version})
        assert move.status_code == 409 and "no live replica hosts base base-v2" in move.json()["error"]["message"]
        assert admin.get("/admin/aliases/sentiment").json()["ref"] == "sentiment@1"

        for name in ("base-v2", "tiny"):  # a registered base; a name a live gateway answers to for its base
            taken = admin.post(f"/admin/aliases/{name}/activate", json={"version": 1, "patch": "sentiment"})
            assert taken.status_code == 409 and "name of a base" in taken.json()["error"]["message"], taken.text
        assert {p["alias"] for p in admin.get("/admin/aliases").json()} == {"sentiment", "reverse", "qa", "recall"}


def test_twenty_base_moves_under_streaming_load_fail_nothing(cluster, kit_dir):
    router, _, start_v2, key = cluster
    v2 = start_v2()
    with _admin(router, key) as admin:
        deadline = time.monotonic() + 5
        while set(admin.get("/admin/cluster").json()["bases"]) != {"base-v1", "base-v2"}:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        v2_version = max(v["version"] for v in admin.get("/admin/patches/sentiment").json()["versions"]
                         if v["base"] == "base-v2")
        # The reference answers, pinned to each version (greedy: the same text every time).
        # The sentiment prompts first; then facts base-v2 changed, which the two bases answer apart by design
        # (a well-trained sentiment patch gives the same label on both bases).
        prompts = [row["prompt"] for name in ("sentiment", "facts-v2-moved")
                   for row in read_jsonl(kit_dir / "eval" / f"{name}.jsonl")[:8]]
        for prompt in prompts:
            expected = dict(_complete(router, f"sentiment@{v}", prompt) for v in (1, v2_version))
            if len(set(expected.values())) == 2:
                break
        assert len(set(expected.values())) == 2, "no prompt tells the two versions apart"
        assert set(expected) == {"base=base-v1; patch=sentiment@1", f"base=base-v2; patch=sentiment@{v2_version}"}
        # The version uploaded through a base-v1 gateway reached base-v2's through S3, checked into its own cache.
        weights = hashlib.sha256((kit_dir / "patches" / "sentiment" / "adapter_model.safetensors").read_bytes())
        assert (v2.data_dir / "blobs" / "sha256" / weights.hexdigest()[:2] / weights.hexdigest()).is_file()

        forced = admin.post("/admin/aliases/sentiment/activate",
                            json={"version": v2_version, "force": True, "reason": "first move to base-v2"})
        assert forced.status_code == 200, forced.text
        with Load(router, "sentiment", prompt) as load:
            for i in range(MOVES):
                target = 1 if i % 2 == 0 else v2_version
                moved = admin.post("/admin/aliases/sentiment/activate", json={"version": target,
                                                                              "reason": f"move {i}"})
                assert moved.status_code == 200 and moved.json()["ref"] == f"sentiment@{target}", moved.text
                time.sleep(0.4)
        assert admin.get("/admin/aliases/sentiment").json()["base"] == "base-v2"
        assert admin.post("/admin/aliases/sentiment/activate", json={"version": 1}).status_code == 200
    assert not load.failures(), load.failures()[:5]
    served = {r[1] for r in load.results}
    assert served == set(expected), served  # both bases served during the moves
    wrong = [r[:3] for r in load.results if r[2] != expected[r[1]]]
    assert not wrong, f"{len(wrong)} answers not from the version named in their header: {wrong[:3]}"
    print(f"{len(load.results)} streamed requests across {MOVES} base moves, 0 failed")


def test_a_rolling_restart_behind_the_router_fails_nothing(cluster):
    router, v1, _, key = cluster
    with Load(router, "tiny", "The") as load:
        for gw in v1:
            gw.proc.terminate()  # SIGTERM: drain
            gw.proc.wait(timeout=60)
            assert gw.proc.returncode == 0, gw.log_path.read_text()[-2000:]
            gw.start()
        time.sleep(1)
    assert not load.failures(), load.failures()[:5]
    assert len(load.results) > CLIENTS * 4
    with _admin(router, key) as admin:
        assert admin.get("/admin/cluster").json()["bases"]["base-v1"] == ["v1-a", "v1-b"]
    print(f"{len(load.results)} streamed requests across a rolling restart of two gateways, 0 failed")


def test_a_killed_gateway_leaves_routing_within_three_seconds(cluster):
    router, v1, _, key = cluster
    with Load(router, "tiny", "The") as load:
        time.sleep(0.5)
        v1[1].kill()
        killed = time.monotonic()
        while any(r["id"] == "v1-b" for r in httpx.get(f"{router.url}/router").json()["replicas"]):
            time.sleep(0.05)
        gone_after = time.monotonic() - killed
        time.sleep(0.5)
    assert gone_after < 3.0, gone_after
    # The streams v1-b was sending when it died break; every request that came later is served elsewhere.
    assert all(r[3] < killed for r in load.failures()), load.failures()[:5]
    assert len(load.failures()) <= CLIENTS
    assert sum(1 for r in load.results if r[3] > killed) > CLIENTS
    with _admin(router, key) as admin:
        assert admin.get("/admin/cluster").json()["bases"]["base-v1"] == ["v1-a"]
    print(f"a gateway killed with -9 left the router's view after {gone_after:.2f} s; "
          f"{len(load.failures())} streams it was sending broke")
    v1[1].start()
