"""Base upgrade (PortLLM): base-v2 registered → every alias's patch carried to it unchanged → measured.

On a gateway of its own (the port job visits every alias, so it must not share the session's). Each
kit alias gets a report with the scores of base-v1+patch, base-v2 alone and base-v2+patch, NFR and
PFR; the reports reproduce the kit build's own measurements of the same combinations.
"""

from __future__ import annotations

import time

import httpx
import pytest

from adapters_store.redis_server import EmbeddedRedis
from tests.gateway_server import GatewayProcess
from tests.prometheus_server import free_port

KIT_ALIASES = {"sentiment", "reverse", "qa", "recall"}
PROPAGATION_S = 2.0


@pytest.fixture(scope="module")
def upgraded(kit_dir, tmp_path_factory):
    gw = GatewayProcess(kit_dir, "transformers", tmp_path_factory.mktemp("upgrade")).start()
    try:
        with gw.admin() as admin:
            r = admin.post("/admin/bases", json={"name": "base-v2", "version": "kit",
                                                 "path": str(kit_dir / "base-v2")})
            assert r.status_code == 202, r.text
            assert r.json()["base"]["name"] == "base-v2"
            yield gw, gw.wait_job(r.headers["location"])
    finally:
        gw.stop()


def test_every_patch_is_carried_and_measured(upgraded, manifest, kit_dir):
    gw, job = upgraded
    assert job["state"] == "succeeded", job
    rows = {row["alias"]: row for row in job["result"]["aliases"]}
    assert set(rows) == KIT_ALIASES
    print()
    for alias, row in sorted(rows.items()):
        kit = manifest["scores"]["tasks"][alias]
        scores = row["scores"]
        print(f"{alias}: base-v1+patch {scores['base-v1+patch']:.3f}, base-v2 {scores['base-v2']:.3f}, "
              f"base-v2+patch {scores['base-v2+patch']:.3f}, NFR {row['nfr']:.3f}, PFR {row['pfr']:.3f}, "
              f"gate {'passed' if row['gate']['passed'] else 'refused: ' + '; '.join(row['gate']['reasons'])}")
        assert row["ported"] == f"{alias}@2" and row["incompatible"] is None
        for combo in ("base-v1+patch", "base-v2", "base-v2+patch"):  # the kit measured the same combinations
            kit_key = {"base-v1+patch": f"base-v1+{alias}", "base-v2": "base-v2",
                       "base-v2+patch": f"base-v2+{alias}"}[combo]
            assert scores[combo] == pytest.approx(kit[kit_key], abs=0.05), (alias, combo)
        assert row["gate"]["passed"] == (not row["gate"]["reasons"])
        assert row["moved"] is False, "without move=true a port only measures"

    with gw.admin() as admin:
        for alias in KIT_ALIASES:
            carried = admin.get(f"/admin/patches/{alias}/versions/2").json()
            assert (carried["origin"], carried["base"], carried["parents"]) == ("port", "base-v2", [f"{alias}@1"])
            assert carried["files"] == admin.get(f"/admin/patches/{alias}/versions/1").json()["files"], "unchanged"
            report = admin.get(f"/admin/patches/{alias}/versions/2/compat", params={"items": "false"}).json()
            assert (report["candidate"], report["incumbent"], report["base"]) == (f"{alias}@2", f"{alias}@1",
                                                                                    "base-v2")
            # Nothing moved: every alias still serves its base-v1 version.
            assert admin.get(f"/admin/aliases/{alias}").json()["ref"] == f"{alias}@1"
        bases = {b["name"] for b in admin.get("/admin/bases").json()}
        assert bases >= {"base-v1", "base-v2"}
        # Registering the same base again with other details is a conflict, and a bad path never registers.
        assert admin.post("/admin/bases", json={"name": "base-v2", "version": "other",
                                                "path": str(kit_dir / "base-v2")}).status_code == 409
        assert admin.post("/admin/bases", json={"name": "base-v4", "version": "x",
                                                "path": str(gw.data_dir)}).status_code == 422
        assert admin.post("/admin/bases", json={"name": "base-v3", "version": "x",
                                                "path": "/nonexistent"}).status_code == 422
        assert not {"base-v3", "base-v4"} & {b["name"] for b in admin.get("/admin/bases").json()}


def _served_by(gw: GatewayProcess, model: str) -> tuple[int, str]:
    r = httpx.post(f"{gw.url}/v1/completions", timeout=60,
                   json={"model": model, "prompt": "Q: x\nA:", "max_tokens": 2, "temperature": 0})
    return r.status_code, r.headers.get("x-patchserve-served-by") or r.json()["error"]["code"]


def _until(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.05)
    return result


def test_aliases_that_pass_move_and_two_bases_serve_side_by_side(kit_dir, manifest, tmp_path):
    """With move=true, the alias whose gate passes moves to base-v2 and a gateway of base-v2 serves it;
    the others stay on base-v1; each gateway answers 421 for an alias on the base it does not host."""
    server = EmbeddedRedis(tmp_path / "redis", free_port()).start()
    shared = {"PATCHSERVE_REDIS_URL": server.url, "PATCHSERVE_BLOB_DIR": str(tmp_path / "blobs")}
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    gateways = []
    try:
        v1 = GatewayProcess(kit_dir, "transformers", tmp_path / "v1", **shared).start()
        gateways.append(v1)
        with v1.admin() as admin:
            # qa's owner accepts some regression for the new base; the other aliases keep the default gate.
            # What it accepts is what this kit's build measured (builds differ across CPUs), with a margin.
            qa = manifest["scores"]["tasks"]["qa"]
            relaxed = {"max_nfr": 0.5, "min_score_delta": round(qa["base-v2+qa"] - qa["base-v1+qa"] - 0.05, 3),
                       "max_perplexity_ratio": 3.0}
            assert admin.put("/admin/aliases/qa/gate", json=relaxed).status_code == 200
            # sentiment's owner asks the new base to do better by half the items: it stays on base-v1 whatever
            # this build's carried patch scores (builds differ: 0.21 to 0.98 seen).
            assert admin.put("/admin/aliases/sentiment/gate", json={"min_score_delta": 0.5}).status_code == 200
            upgrade = {"name": "base-v2", "version": "kit", "path": str(kit_dir / "base-v2"), "move": True}
            # No gateway hosts base-v2 yet: moving aliases there is refused, and nothing is registered.
            refused = admin.post("/admin/bases", json=upgrade)
            assert refused.status_code == 409 and "base-v2" in refused.json()["error"]["message"], refused.text
            assert "base-v2" not in {b["name"] for b in admin.get("/admin/bases").json()}
            # Forced, with a reason: the operator starts base-v2's gateway next (tests/test_scale_out.py
            # shows the unforced order: register, start the gateway, then move).
            r = admin.post("/admin/bases", json={**upgrade, "force": True, "reason": "base-v2 gateway starts next"})
            job = v1.wait_job(r.headers["location"])
            assert job["state"] == "succeeded", job
            moved = {row["alias"]: row["moved"] for row in job["result"]["aliases"]}
            gates = {row["alias"]: row["gate"] for row in job["result"]["aliases"]}
            assert moved["qa"] and not moved["sentiment"], gates
            # The aliases on the default gate move exactly when it passes (which do differs between builds).
            assert all(moved[a] == gates[a]["passed"] for a in moved), gates
            pointers = {p["alias"]: (p["ref"], p["base"]) for p in admin.get("/admin/aliases").json()}
            assert pointers["qa"] == ("qa@2", "base-v2") and pointers["sentiment"] == ("sentiment@1", "base-v1")

        # base-v1's gateway answers to `tiny`: this one takes no other name.
        v2 = GatewayProcess(kit_dir, "transformers", tmp_path / "v2", PATCHSERVE_BASE="base-v2",
                            PATCHSERVE_BASE_ALIASES="[]", **shared).start()
        gateways.append(v2)
        assert _served_by(v2, "qa") == (200, "base=base-v2; patch=qa@2")
        assert _served_by(v2, "sentiment") == (421, "base_not_hosted")
        assert _until(lambda: _served_by(v1, "qa") == (421, "base_not_hosted"))
        assert _served_by(v1, "sentiment") == (200, "base=base-v1; patch=sentiment@1")

        with v1.admin(v1.admin_key) as admin:  # one call undoes the upgrade for qa
            back = admin.post("/admin/aliases/qa/rollback", json={"reason": "customers prefer the old base"})
            assert back.status_code == 200 and back.json()["ref"] == "qa@1"
        assert _served_by(v1, "qa") == (200, "base=base-v1; patch=qa@1")
        assert _until(lambda: _served_by(v2, "qa") == (421, "base_not_hosted"), timeout=PROPAGATION_S)
    finally:
        for gw in gateways:
            gw.stop()
        server.stop()
