"""Knowledge edits end to end: the kit's side memory `facts`, edited, served, rolled back and revoked through
the admin API, and answered through `/v1` by both engines.

Two replicas share one Redis and one blob directory: A runs vLLM (the memory inside its forward pass,
through the plugin's model class and worker extension), B runs transformers (hooks on the same layer).
A batch of the kit's edits is trained by the worker, gated and activated; then both engines answer every
edit, paraphrase and locality prompt, alone and under a patch, token for token alike; a rollback brings
back exactly the answers from before the edits, on both replicas; a restarted replica serves the
recorded version; one edit is revoked; and refusals change nothing.
"""

from __future__ import annotations

import time

import httpx
import pytest

from adapters_store.redis_server import EmbeddedRedis
from tests.conftest import read_jsonl
from tests.gateway_server import GatewayProcess
from tests.prometheus_server import free_port

MEMORY = "facts"
BATCH = 10
# The gate's default Loc floor. It was 0.8 here (Loc on 10 of the kit's edits sat at 0.8-0.9) until the edit job
# trained the memory to stay quiet on the base's own answers too, not only on the texts it reads: the bare base
# answers task prompts with a sentence about someone's job, and the per-token router spoke there.
LOC_FLOOR = 0.9


@pytest.fixture(scope="module")
def pair(kit_dir, tmp_path_factory):
    """(replica A on vLLM, replica B on transformers, the admin key): one Redis, one blob directory."""
    root = tmp_path_factory.mktemp("memory")
    server = EmbeddedRedis(root / "redis", free_port()).start()
    shared = {"PATCHSERVE_REDIS_URL": server.url, "PATCHSERVE_BLOB_DIR": str(root / "blobs")}
    started = []
    try:
        for name, engine in (("a", "vllm"), ("b", "transformers")):
            (root / name).mkdir()
            started.append(GatewayProcess(kit_dir, engine, root / name, PATCHSERVE_DATA_DIR=str(root / name / "data"),
                                          **shared).start())
        yield started[0], started[1], started[0].admin_key
    finally:
        for gw in started:
            gw.stop()
        server.stop()


@pytest.fixture(scope="module")
def edits(kit_dir, manifest) -> list[dict]:
    return read_jsonl(kit_dir / manifest["edit_set"])[:BATCH]


def _prompts(edits: list[dict]) -> list[str]:
    return [p for e in edits for p in (e["prompt"], *e["paraphrases"], *e["locality"])]


def _answers(gw: GatewayProcess, model: str, prompts: list[str]) -> tuple[list[str], set[str]]:
    """Greedy answers through /v1 (8 tokens), and the served-by headers seen."""
    texts, served = [], set()
    with httpx.Client(base_url=gw.url, timeout=60) as c:
        for prompt in prompts:
            r = c.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200, r.text
            texts.append(r.json()["choices"][0]["text"])
            served.add(r.headers["x-patchserve-served-by"])
    return texts, served


def _first_line(text: str) -> str:
    return text.split("\n", 1)[0].strip().removesuffix(".").strip()


@pytest.fixture(scope="module")
def before(pair, edits) -> dict[str, list[str]]:
    """Every prompt's answers before the first edit, on A, for the base and under the sentiment patch."""
    a, _, _ = pair
    return {model: _answers(a, model, _prompts(edits))[0] for model in ("tiny", "sentiment")}


@pytest.fixture(scope="module")
def edited(pair, edits, before) -> dict:
    """The edit job's result: the first batch trained, gated and activated."""
    a, _, key = pair
    with a.admin(key) as admin:
        assert admin.put(f"/admin/memories/{MEMORY}/gate", json={"min_loc": LOC_FLOOR}).status_code == 200
        r = admin.post(f"/admin/memories/{MEMORY}/edits", json={"edits": edits, "reason": "week 48 facts"})
        assert r.status_code == 202, r.text
    job = a.wait_job(r.headers["location"])
    assert job["state"] == "succeeded", job
    return job["result"]


def _wait(gw: GatewayProcess, key: str, ref: str | None, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    with gw.admin(key) as admin:
        while (now := admin.get("/admin/replica").json()["memories"].get(MEMORY)) != ref:
            assert time.monotonic() < deadline, f"{gw.url} serves {MEMORY} as {now}, not {ref}"
            time.sleep(0.05)


def test_an_edit_batch_is_trained_gated_and_activated(pair, edited):
    result = edited
    assert result["activated"] and result["version"] == 1 and result["gate"]["passed"]
    batch = result["report"]["batch"]
    assert batch["edits"] == BATCH and batch["rel"] >= 0.9 and batch["loc"] >= LOC_FLOOR, result["report"]
    # The memory is on the base, so it reaches every kit alias under its patch: each keeps its held-out answers.
    tasks = result["report"]["tasks"]
    assert set(tasks) == {"sentiment", "reverse", "qa", "recall"}, tasks
    assert all(t["held_out"] >= 0.9 and t["patch"] == f"{alias}@1" for alias, t in tasks.items()), tasks
    a, b, key = pair
    with a.admin(key) as admin:
        memory = admin.get(f"/admin/memories/{MEMORY}").json()
        assert memory["version"] == 1 and memory["ref"] == f"{MEMORY}@1" and memory["edits"] == BATCH
        assert [(h["from_version"], h["to_version"]) for h in memory["history"]] == [(0, 1)]
        version = admin.get(f"/admin/memories/{MEMORY}/versions/1").json()
        assert len(version["edits"]) == BATCH and len(version["items"]) == BATCH and version["added"]
        audit = [e["action"] for e in admin.get("/admin/audit", params={"limit": 200}).json()]
        assert "create_memory_version" in audit and "memory_activate" in audit


def test_both_engines_answer_with_the_memory_token_for_token(pair, edits, edited, before):
    a, b, key = pair
    _wait(a, key, f"{MEMORY}@1"), _wait(b, key, f"{MEMORY}@1")
    prompts = _prompts(edits)
    for model in ("tiny", "sentiment"):
        on_vllm, served_a = _answers(a, model, prompts)
        on_transformers, served_b = _answers(b, model, prompts)
        assert served_a == served_b and all(s.endswith(f"memory={MEMORY}@1") for s in served_a)
        assert on_vllm == on_transformers, f"{model}: the engines disagree"
    answers = dict(zip(prompts, _answers(a, "tiny", prompts)[0]))
    hits = sum(_first_line(answers[e["prompt"]]) == e["target"].strip() for e in edits)
    assert hits >= BATCH - 1, "the served answers carry the edits"
    unchanged = [p for e in edits for p in e["locality"]]
    kept = sum(answers[p] == b_ for p, b_ in zip(prompts, before["tiny"]) if p in unchanged)
    assert kept / len(unchanged) >= LOC_FLOOR, "locality prompts answer as before the edits"


def test_routed_tokens_are_counted_per_memory_version(pair, edits, edited):
    a, _, _ = pair
    _answers(a, "tiny", [e["prompt"] for e in edits])
    metrics = httpx.get(f"{a.url}/metrics", timeout=30).text
    routed = [line for line in metrics.splitlines()
              if line.startswith(f'patchserve_memory_routed_tokens_total{{memory="{MEMORY}",version="1"}}')]
    assert routed and float(routed[0].split()[-1]) > 0
    assert 'patchserve_memory_slots{engine="vllm",state="used"}' in metrics


def test_rollback_brings_back_the_answers_from_before_the_edits(pair, edits, edited, before):
    a, b, key = pair
    with a.admin(key) as admin:
        r = admin.post(f"/admin/memories/{MEMORY}/rollback", json={"reason": "complaints"})
        assert r.status_code == 200 and r.json()["version"] == 0
    # Applied on A before the call answered; B follows the event.
    after, served = _answers(a, "tiny", _prompts(edits))
    assert served == {"base=base-v1; patch=none"} and after == before["tiny"]
    _wait(b, key, None)
    assert _answers(b, "tiny", _prompts(edits))[0] == before["tiny"]
    with a.admin(key) as admin:  # undo the undo: version 1 again, still resident
        assert admin.post(f"/admin/memories/{MEMORY}/rollback", json={}).json()["version"] == 1
        # A named rollback may name no memory at all (version 0), as `patchserve admin memories rollback --to 0`.
        named = admin.post(f"/admin/memories/{MEMORY}/rollback", json={"version": 0, "reason": "none at all"})
        assert named.status_code == 200 and named.json()["version"] == 0, named.text
        assert admin.post(f"/admin/memories/{MEMORY}/rollback", json={}).json()["version"] == 1
    _wait(b, key, f"{MEMORY}@1")


def test_a_restarted_replica_serves_the_recorded_version(pair, edits, edited):
    _, b, key = pair
    b.stop()
    b.start()
    _wait(b, key, f"{MEMORY}@1", timeout=1)  # ready means every alias and memory applied
    assert all(s.endswith(f"memory={MEMORY}@1") for s in _answers(b, "tiny", [edits[0]["prompt"]])[1])


def test_refusals_are_4xx_and_change_nothing(pair, edits, edited):
    a, _, key = pair
    with a.admin(key) as admin:
        state = admin.get(f"/admin/memories/{MEMORY}").json()
        refused = [
            admin.post(f"/admin/memories/{MEMORY}/edits", json={"edits": []}),
            admin.post(f"/admin/memories/{MEMORY}/edits", json={"edits": [{"prompt": "x", "target": "y" * 201}]}),
            admin.post(f"/admin/memories/{MEMORY}/edits", json={"edits": [{"prompt": "x", "target": "y", "z": 1}]}),
            admin.post("/admin/memories/no-such/edits", json={"edits": [{"prompt": "x", "target": "y"}]}),
            admin.post(f"/admin/memories/{MEMORY}/revoke", json={"edit": "e999"}),
            admin.post(f"/admin/memories/{MEMORY}/activate", json={"version": 9}),
            admin.post("/admin/memories", json={"name": "other", "target": "base-v1"}),  # base-v1 has one
            admin.put(f"/admin/memories/{MEMORY}/attachment", json={"target": "no-such-alias"}),
        ]
        assert [r.status_code for r in refused] == [400, 400, 400, 404, 404, 404, 409, 404], \
            [r.text for r in refused]
        assert all(r.json()["error"]["message"] for r in refused)
        assert admin.get(f"/admin/memories/{MEMORY}").json() == state


def test_a_batch_that_fails_its_gate_is_not_served(pair, edits, edited):
    a, _, key = pair
    with a.admin(key) as admin:
        strict = {"min_gen": 1.0, "min_loc": LOC_FLOOR}
        assert admin.put(f"/admin/memories/{MEMORY}/gate", json=strict).status_code == 200
        try:
            # The same two facts again: answered, but no memory here reaches Gen 1.0 on every paraphrase.
            r = admin.post(f"/admin/memories/{MEMORY}/edits", json={"edits": edits[:2]})
            job = a.wait_job(r.headers["location"])
        finally:
            admin.put(f"/admin/memories/{MEMORY}/gate", json={"min_gen": 0.0, "min_loc": LOC_FLOOR})
        assert job["state"] == "succeeded" and not job["result"]["activated"], job["result"]
        refused = job["result"]["version"]
        assert any("gen" in reason for reason in job["result"]["gate"]["reasons"])
        assert admin.get(f"/admin/memories/{MEMORY}").json()["version"] == 1, "the served version is unchanged"
        r = admin.post(f"/admin/memories/{MEMORY}/activate", json={"version": refused})
        assert r.status_code == 409 and "failed its gate" in r.json()["error"]["message"]


def test_revoking_one_edit_takes_back_that_fact_only(pair, edits, edited, before):
    a, b, key = pair
    with a.admin(key) as admin:
        version = admin.get(f"/admin/memories/{MEMORY}/versions/1").json()
        gone = version["edits"][0]
        r = admin.post(f"/admin/memories/{MEMORY}/revoke", json={"edit": gone["id"], "reason": "wrong fact"})
        assert r.status_code == 202
        job = a.wait_job(r.headers["location"])
        assert job["state"] == "succeeded" and job["result"]["activated"], job
        new = admin.get(f"/admin/memories/{MEMORY}/versions/{job['result']['version']}").json()
        assert new["revoked"] == [gone["id"]] and gone["id"] not in {e["id"] for e in new["edits"]}
        assert len(new["edits"]) == BATCH - 1
    _wait(a, key, f"{MEMORY}@{job['result']['version']}")
    prompts = [e["prompt"] for e in edits]
    answers = dict(zip(prompts, _answers(a, "tiny", prompts)[0]))
    old = dict(zip(_prompts(edits), before["tiny"]))
    assert answers[gone["prompt"]] == old[gone["prompt"]], "the revoked fact is answered as before the edits"
    kept = sum(_first_line(answers[e["prompt"]]) == e["target"].strip() for e in edits if e["prompt"] != gone["prompt"])
    assert kept >= BATCH - 2, "the other edits stay"
