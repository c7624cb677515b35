"""Compatibility repair after a base upgrade (MUSCLE distillation), through the admin API on live gateways.

The kit's carried patches lose most of their lift on base-v2 and fail their gates. An upgrade with
`repair` carries every patch, repairs the ones that fail by distillation from the base-v1 version on
the alias's distillation prompts, gates the repaired version against the base-v1 one, and moves each
alias that passes (each repair improves on the carried patch; which pass their gate depends on the kit
build); a gateway hosting base-v2 then serves what moved. Distillation prompts
never overlap the evaluation set: refused when set, and a job is refused if the set changed since.
"""

from __future__ import annotations

import json

import httpx
import pytest

from adapters_store.redis_server import EmbeddedRedis
from tests.gateway_server import GatewayProcess
from tests.prometheus_server import free_port

KIT_ALIASES = ("sentiment", "reverse", "qa")


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def cluster(kit_dir, tmp_path_factory):
    """A base-v1 gateway on a Redis and blob dir a base-v2 gateway can share later."""
    root = tmp_path_factory.mktemp("repair")
    server = EmbeddedRedis(root / "redis", free_port()).start()
    shared = {"PATCHSERVE_REDIS_URL": server.url, "PATCHSERVE_BLOB_DIR": str(root / "blobs")}
    (root / "v1").mkdir()
    v1 = GatewayProcess(kit_dir, "transformers", root / "v1", **shared).start()
    try:
        yield v1, shared, root
    finally:
        v1.stop()
        server.stop()


def test_distillation_prompts_never_overlap_the_evaluation_set(cluster, kit_dir):
    v1, _, _ = cluster
    evalset = [json.loads(line) for line in (kit_dir / "eval" / "sentiment.jsonl").read_text().splitlines()]
    with v1.admin() as admin:
        before = admin.get("/admin/aliases/sentiment/prompts").json()
        assert before["updated_by"] == "kit" and before["n"] > 100  # the kit's set, seeded at first start
        mixed = _jsonl([{"prompt": "Review: a fresh unseen day\nSentiment:"}, {"prompt": evalset[3]["prompt"]}])
        refused = admin.put("/admin/aliases/sentiment/prompts", content=mixed)
        assert refused.status_code == 422 and "evaluation set" in refused.json()["error"]["message"]
        for bad in (b"", b"not json\n", _jsonl([{"text": "no prompt field"}])):
            assert admin.put("/admin/aliases/sentiment/prompts", content=bad).status_code == 422
        assert admin.get("/admin/aliases/sentiment/prompts").json() == before  # nothing changed

        assert admin.post("/admin/aliases/nope/repair", json={"base": "base-v1"}).status_code == 404
        assert admin.post("/admin/aliases/sentiment/repair", json={"base": "nope"}).status_code == 422
        assert admin.post("/admin/aliases/sentiment/repair", json={"base": "base-v1"}).status_code == 409


def test_a_repair_job_refuses_prompts_the_evaluation_set_came_to_include(cluster, kit_dir):
    v1, _, _ = cluster
    with v1.admin() as admin:
        name = "repair-overlap"
        files = [("files", (f.name, f.read_bytes())) for f in (kit_dir / "patches" / "sentiment").iterdir()]
        assert admin.post(f"/admin/patches/{name}/versions", files=files).status_code == 201
        assert admin.post(f"/admin/aliases/{name}/activate", json={"version": 1}).status_code == 200
        prompts = [f"Review: day {i} fresh warm\nSentiment:" for i in range(8)]
        assert admin.put(f"/admin/aliases/{name}/prompts", content=_jsonl([{"prompt": p} for p in prompts])) \
            .status_code == 200
        # The evaluation set changes afterwards and now holds one of the prompts: the job must refuse.
        rows = [{"prompt": prompts[2], "reference": " positive"}, {"prompt": "Review: awful\nSentiment:",
                                                                   "reference": " negative"}]
        assert admin.put(f"/admin/aliases/{name}/evalset", content=_jsonl(rows)).status_code == 200
        base = admin.post("/admin/bases", json={"name": "base-v2", "version": "kit",
                                                "path": str(kit_dir / "base-v2")})
        assert base.status_code == 202
        v1.wait_job(base.headers["location"], timeout=600)  # base-v2 registered (and every alias measured)
        versions_before = admin.get(f"/admin/patches/{name}").json()["versions"]
        job = v1.wait_job(admin.post(f"/admin/aliases/{name}/repair", json={"base": "base-v2"})
                          .headers["location"])
        assert job["state"] == "failed" and "must not train on what judges it" in job["error"], job
        assert job["attempts"] == 1  # refused, not retried
        assert admin.get(f"/admin/patches/{name}").json()["versions"] == versions_before
        assert admin.get(f"/admin/aliases/{name}").json()["ref"] == f"{name}@1"


def test_an_upgrade_with_repair_moves_what_passes_its_gate(cluster, kit_dir, manifest):
    v1, shared, root = cluster
    with v1.admin() as admin:
        # The kit's reverse patch rewrites every layer: its base-v1 version already has ~180× its base's probe
        # perplexity, a region where the ratio swings 1.5–3.5× between trainings that answer alike; its owner
        # accepts up to 4× there (the other aliases keep the default gate).
        assert admin.put("/admin/aliases/reverse/gate", json={"max_perplexity_ratio": 4.0}).status_code == 200
        # recall's owner takes the carried patch (0.70 → 0.68 on base-v2): its 192-token prompts would cost
        # the repair minutes here and show nothing the three others do not.
        assert admin.put("/admin/aliases/recall/gate", json={"max_nfr": 1.0, "min_score_delta": -1.0,
                                                            "max_perplexity_ratio": 100.0}).status_code == 200
        # An alias whose owner accepts what the carried patch does: it must move as carried, never repaired.
        keep = "keep-carried"
        files = [("files", (f.name, f.read_bytes())) for f in (kit_dir / "patches" / "qa").iterdir()]
        assert admin.post(f"/admin/patches/{keep}/versions", files=files).status_code == 201
        assert admin.post(f"/admin/aliases/{keep}/activate", json={"version": 1}).status_code == 200
        qa_rows = (kit_dir / "eval" / "qa.jsonl").read_bytes().splitlines(keepends=True)[:16]
        assert admin.put(f"/admin/aliases/{keep}/evalset", content=b"".join(qa_rows)).status_code == 200
        assert admin.put(f"/admin/aliases/{keep}/prompts", content=(kit_dir / "distill" / "qa.jsonl").read_bytes()) \
            .status_code == 200
        assert admin.put(f"/admin/aliases/{keep}/gate", json={"max_nfr": 1.0, "min_score_delta": -1.0,
                                                             "max_perplexity_ratio": 100.0}).status_code == 200
        r = admin.post("/admin/bases", json={"name": "base-v2", "version": "kit", "path": str(kit_dir / "base-v2"),
                                             "move": True, "repair": True, "force": True,
                                             "reason": "the base-v2 gateway starts once the aliases moved"})
        assert r.status_code == 202, r.text
        job = v1.wait_job(r.headers["location"], timeout=1500)
        assert job["state"] == "succeeded", (job["error"], job["stage"])
        rows = {row["alias"]: row for row in job["result"]["aliases"]}
        kept = rows["keep-carried"]
        assert kept["gate"]["passed"] and "repair" not in kept and kept["moved"], kept  # no work wasted
        print()
        repaired_aliases = []
        for alias in KIT_ALIASES:
            row = rows[alias]
            if row["gate"]["passed"]:  # a carried patch that passes moves as carried (builds differ across CPUs)
                assert "repair" not in row and row["moved"], row
                continue
            # The carried patch fails its gate (the kit's base-v2 drifts far), so it was repaired …
            assert "repair" in row, row
            repaired_aliases.append(alias)
            fixed = row["repair"]
            old, carried, repaired = row["scores"]["base-v1+patch"], row["scores"]["base-v2+patch"], \
                fixed["score_repaired"]
            alone_v1, alone_v2 = manifest["scores"]["tasks"][alias]["base-v1"], row["scores"]["base-v2"]
            lift_kept = (repaired - alone_v2) / (old - alone_v1)
            print(f"  {alias}: base-v1+patch {old:.3f}, carried {carried:.3f}, repaired {repaired:.3f} "
                  f"(NFR {fixed['nfr']:.3f}, lift kept {lift_kept:.0%}, distilled in "
                  f"{fixed['distillation']['seconds']:.0f} s, gate passed: {fixed['gate']['passed']})")
            # … and the repair never does worse than what was carried; it moves exactly when its gate passes.
            # Which repairs pass differs between kit builds (README: builds differ across CPUs): on some, sentiment
            # is carried to within one item of its gate and its repair agrees with the old version on its own
            # prompts at once; on some, reverse's repair stays above its probe-perplexity bound.
            assert repaired >= carried and fixed["moved"] == fixed["gate"]["passed"], json.dumps(fixed)
            if not fixed["gate"]["passed"]:
                continue
            assert repaired >= old - 0.02
            version = admin.get(f"/admin/patches/{alias}/versions/{fixed['repaired'].split('@')[1]}").json()
            assert version["origin"] == "repair" and version["base"] == "base-v2"
            assert version["parents"] == [fixed["carried"], row["from"]]
        pointers = {p["alias"]: (p["ref"], p["base"]) for p in admin.get("/admin/aliases").json()}
        assert repaired_aliases, "the kit's base-v2 drifts far enough that some carried patch needs a repair"
        moved = [a for a in repaired_aliases if rows[a]["repair"]["moved"]]
        assert any(rows[a]["repair"]["score_repaired"] > rows[a]["scores"]["base-v2+patch"] for a in repaired_aliases)
        assert all(pointers[a] == (rows[a]["repair"]["repaired"], "base-v2") for a in moved), pointers
        assert all(pointers[a] == (f"{a}@1", "base-v1") for a in repaired_aliases if a not in moved), pointers
        assert all(pointers[a] == (rows[a]["ported"], "base-v2") for a in KIT_ALIASES if rows[a]["gate"]["passed"])
        assert pointers["keep-carried"] == (kept["ported"], "base-v2")

    (root / "v2").mkdir()
    # base-v1's gateway still answers to `tiny`: this one takes no other name.
    v2 = GatewayProcess(kit_dir, "transformers", root / "v2", PATCHSERVE_BASE="base-v2", PATCHSERVE_BASE_ALIASES="[]",
                        **shared).start()
    try:
        # The alias whose owner took the carried patch is served by base-v2's gateway now.
        row = json.loads((kit_dir / "eval" / "qa.jsonl").read_text().splitlines()[0])
        r = httpx.post(f"{v2.url}/v1/completions", json={"model": keep, "prompt": row["prompt"],
                                                         "max_tokens": 8, "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.headers["x-patchserve-served-by"] == f"base=base-v2; patch={kept['ported']}"
        with v1.admin() as admin:  # one call undoes it: back to the base-v1 version
            back = admin.post(f"/admin/aliases/{keep}/rollback", json={"reason": "undo the upgrade"})
            assert back.status_code == 200 and back.json()["ref"] == f"{keep}@1"
    finally:
        v2.stop()
