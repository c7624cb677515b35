"""Base upgrade (PortLLM): base-v2 registered → every alias's patch carried to it unchanged → measured.

On a gateway of its own (the port job visits every alias, so it must not share the session's). Each
kit alias gets a report with the scores of base-v1+patch, base-v2 alone and base-v2+patch, NFR and
PFR; the reports reproduce the kit build's own measurements of the same combinations.
"""

from __future__ import annotations

import time

import pytest

from tests.gateway_server import GatewayProcess

KIT_ALIASES = {"sentiment", "reverse", "qa"}


@pytest.fixture(scope="module")
def upgraded(kit_dir, tmp_path_factory):
    gw = GatewayProcess(kit_dir, "transformers", tmp_path_factory.mktemp("upgrade")).start()
    try:
        with gw.admin() as admin:
            r = admin.post("/admin/bases", json={"name": "base-v2", "version": "kit",
                                                 "path": str(kit_dir / "base-v2")})
            assert r.status_code == 202, r.text
            assert r.json()["base"]["name"] == "base-v2"
            deadline = time.monotonic() + 300
            while (job := admin.get(r.headers["location"]).json())["state"] not in ("succeeded", "failed"):
                assert time.monotonic() < deadline, job
                time.sleep(0.5)
            yield gw, job
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
