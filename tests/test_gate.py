"""Gated activation end to end over HTTP: evaluate → compatibility report → gate → move (or refuse).

Runs on the session's transformers gateway with its in-process worker. A version identical to the
active one passes (nothing flips); a deliberately damaged copy is refused with the reasons, the alias
stays where it was, and the refusal is audited; an admin may still force it, with a reason.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from service.evaluation.gate import Gate
from service.evaluation.report import compare
from tests.conftest import read_jsonl


def test_flip_rates_follow_their_definition():
    rows = [{"prompt": f"p{i}", "reference": r} for i, r in enumerate(["a", "b", "c", "d"])]
    old = ["a", "b", "x", "x"]  # right on items 0 and 1
    new = ["a", "x", "c", "x"]  # loses item 1, gains item 2
    r = compare("p@2", "p@1", "base", "exact_match", rows, old, new, 2.0, 2.2)
    assert (r.score_old, r.score_new, r.nfr, r.pfr) == (0.5, 0.5, 0.25, 0.25)
    assert (r.mean_gain, r.mean_regression, r.agreement) == (1.0, 1.0, 0.5)
    assert r.perplexity_ratio == pytest.approx(1.1)
    assert [i["d"] for i in r.items] == [0.0, -1.0, 1.0, 0.0]
    assert Gate().check(r) == ["negative flip rate 0.250 > 0.1"]
    assert Gate(max_nfr=0.3, max_perplexity_ratio=1.05).check(r) == ["probe perplexity ratio 1.100 > 1.05"]
    rouge = compare("p@2", None, "base", "rouge_l", [{"prompt": "", "reference": "red blue green"}],
                    ["red blue"], ["red blue green"], 1.0, 1.0)
    assert 0 < rouge.score_old < 1 and rouge.score_new == 1.0 and rouge.pfr == 1.0


@pytest.fixture(scope="module")
def gw(gateways):
    return gateways.get("transformers")


def _files(directory: Path) -> list:
    return [("file", (f.name, f.read_bytes())) for f in sorted(directory.iterdir())]


def _damaged(kit_dir: Path, out: Path) -> Path:
    """The reverse patch with its LoRA B matrices negated and scaled: a patch built to regress."""
    out.mkdir()
    src = kit_dir / "patches" / "reverse"
    tensors = load_file(src / "adapter_model.safetensors")
    save_file({k: (-4 * v if "lora_B" in k else v).contiguous() for k, v in tensors.items()},
              out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_bytes((src / "adapter_config.json").read_bytes())
    assert all(torch.isfinite(v).all() for v in load_file(out / "adapter_model.safetensors").values())
    return out


def test_the_gate_passes_a_faithful_version_and_refuses_a_regression(gw, kit_dir, manifest, tmp_path):
    name = f"gate-{uuid.uuid4().hex[:8]}"
    rows = read_jsonl(kit_dir / "eval" / "reverse.jsonl")
    with gw.admin() as admin:
        # A new alias has nothing to be compared with: the upload activates it at once.
        first = admin.post(f"/admin/patches/{name}/versions", files=_files(kit_dir / "patches" / "reverse"),
                           data={"activate": "true", "reason": "launch"})
        assert first.status_code == 201 and first.json()["activation"]["ref"] == f"{name}@1"
        body = "".join(json.dumps(r) + "\n" for r in rows)
        attached = admin.put(f"/admin/aliases/{name}/evalset", content=body)
        assert attached.status_code == 200 and attached.json()["n"] == len(rows)

        # validate → evaluate → gate → activate, as one job, from one upload.
        second = admin.post(f"/admin/patches/{name}/versions", files=_files(kit_dir / "patches" / "reverse"),
                            data={"activate": "true", "reason": "same weights, new version"})
        assert second.status_code == 201 and second.json()["activation"]["job"]["type"] == "activate"
        job = gw.wait_job(f"/admin/jobs/{second.json()['activation']['job']['id']}")
        assert job["state"] == "succeeded" and job["result"]["activated"], job
        report = job["result"]["report"]
        assert (report["incumbent"], report["candidate"]) == (f"{name}@1", f"{name}@2")
        assert report["n"] == len(rows) and report["nfr"] == 0 and report["pfr"] == 0 and report["agreement"] == 1
        assert report["perplexity_ratio"] == pytest.approx(1.0)
        # The worker's evaluator reproduces the kit build's own score of this patch.
        assert report["score_new"] == pytest.approx(manifest["scores"]["tasks"]["reverse"]["base-v1+reverse"],
                                                    abs=0.05)
        assert admin.get(f"/admin/aliases/{name}").json()["ref"] == f"{name}@2"

        third = admin.post(f"/admin/patches/{name}/versions", files=_files(_damaged(kit_dir, tmp_path / "bad")))
        assert third.status_code == 201 and "activation" not in third.json()
        queued = admin.post(f"/admin/aliases/{name}/activate", json={"version": 3, "reason": "try it"})
        assert queued.status_code == 202
        job = gw.wait_job(queued.headers["location"])
        assert job["state"] == "succeeded" and job["result"]["activated"] is False
        assert any("negative flip rate" in r for r in job["result"]["gate"]["reasons"]), job["result"]["gate"]
        assert admin.get(f"/admin/aliases/{name}").json()["ref"] == f"{name}@2", "a refused version never serves"
        refusal = [e for e in admin.get("/admin/audit", params={"limit": 50}).json() if e["target"] == name][-1]
        assert refusal["action"] == "gate_refused" and "negative flip rate" in refusal["reason"]

        assert admin.get(f"/admin/patches/{name}/versions/1/compat").status_code == 404, "v1 was never evaluated"
        compat = admin.get(f"/admin/patches/{name}/versions/3/compat").json()
        print(f"\ndamaged copy vs {compat['incumbent']}: "
              f"score {compat['score_old']:.3f} → {compat['score_new']:.3f}, "
              f"NFR {compat['nfr']:.3f}, PFR {compat['pfr']:.3f}, agreement {compat['agreement']:.3f}, "
              f"perplexity ratio {compat['perplexity_ratio']:.3f}; "
              f"evaluation job {job['updated_at'] - job['created_at']:.1f} s")
        assert compat["nfr"] > 0.1 and compat["gate"]["passed"] is False and len(compat["items"]) == len(rows)
        assert all(set(i) >= {"prompt", "reference", "old", "new", "s_old", "s_new", "d"} for i in compat["items"])
        assert "items" not in admin.get(f"/admin/patches/{name}/versions/3/compat", params={"items": "false"}).json()
        assert gw.metric("patchserve_compat_nfr", patch=name, version="3") == compat["nfr"]
        assert gw.metric("patchserve_compat_gate_passed", patch=name, version="3") == 0
        assert gw.metric("patchserve_compat_gate_passed", patch=name, version="2") == 1

        # An admin may still force it: with a reason, audited as such.
        assert admin.post(f"/admin/aliases/{name}/activate", json={"version": 3, "force": True}).status_code == 400
        forced = admin.post(f"/admin/aliases/{name}/activate",
                            json={"version": 3, "force": True, "reason": "customer insists"})
        assert forced.status_code == 200 and forced.json()["action"] == "force_activate"
        # Going back to a version this alias served before needs no gate: it is an undo.
        assert admin.post(f"/admin/aliases/{name}/activate", json={"version": 2}).status_code == 200


def test_bad_evaluation_requests_are_refused_and_change_nothing(gw):
    with gw.admin() as admin:
        before = admin.get("/admin/aliases/reverse/evalset").json()
        for body in ("not json\n", '{"prompt": "x"}\n', "", '{"prompt": 1, "reference": "y"}\n'):
            r = admin.put("/admin/aliases/reverse/evalset", content=body)
            assert r.status_code == 422 and "evaluation set refused" in r.json()["error"]["message"], body
        assert admin.put("/admin/aliases/reverse/evalset", params={"metric": "bleu"},
                         content='{"prompt": "a", "reference": "b"}\n').status_code == 422
        assert admin.get("/admin/aliases/reverse/evalset").json() == before
        assert admin.put("/admin/aliases/reverse/gate", json={"max_nfr": 2}).status_code == 400
        assert admin.put("/admin/aliases/reverse/gate", json={"nfr": 0.1}).status_code == 400
        assert admin.post("/admin/aliases/reverse/evaluate", json={"version": 99}).status_code == 404
        assert admin.get("/admin/jobs/nope").status_code == 404
        assert admin.post("/admin/patches/x-y/versions", data={"activate": "maybe"},
                          files=[("file", ("adapter_config.json", b"{}"))]).status_code == 400
