"""Merging patches: the methods on small tensors, and the merge job end to end through the admin API.

The job runs on a gateway of its own (transformers engine; its aliases are moved here): the kit's three
patches merged by TIES into one version, registered with every source as a parent and a retention
report per source alias; refusals are 4xx and register nothing; a merge kept as TALL storage, each
source rebuilt from its blobs as that source's next version; one alias served by the merge and rolled
back to its own patch while another stays on the merge.
"""

from __future__ import annotations

import uuid

import httpx
import pytest
import torch

from adapters_store.blobs import LocalBlobStore, materialize
from service.lora.factors import adapter_deltas, low_rank
from service.lora.merge import merge_deltas
from service.lora.params import MergeParams
from service.lora.tall import (
    MAX_FITTED_SOURCES,
    fitted_storage,
    mask_bytes,
    merged_bytes,
    read_mask,
    read_merged,
    reconstruct,
    tall_masks,
)
from tests.gateway_server import GatewayProcess


# -- the methods -----------------------------------------------------------------------------------------
def test_linear_is_the_weighted_sum_and_a_layer_one_source_lacks_is_zero_for_it():
    a = {"l1": torch.tensor([[1.0, -2.0]]), "l2": torch.tensor([[3.0]])}
    b = {"l1": torch.tensor([[0.5, 1.0]])}
    out = merge_deltas([a, b], "linear", MergeParams(weights=(1.0, 2.0))).deltas
    assert torch.equal(out["l1"], torch.tensor([[2.0, 0.0]])) and torch.equal(out["l2"], torch.tensor([[3.0]]))


def test_ties_keeps_each_source_where_the_others_are_silent_and_elects_a_sign_where_they_clash():
    a = {"l": torch.tensor([[4.0, 0.0, 2.0]])}
    b = {"l": torch.tensor([[0.0, 6.0, -1.0]])}
    out = merge_deltas([a, b], "ties", MergeParams(density=1.0)).deltas["l"]
    assert out[0, 0] == 4.0 and out[0, 1] == 6.0  # disjoint entries: each source's own value
    assert out[0, 2] == 2.0  # 2 vs −1: the sign with more mass wins, the disagreeing value is left out


def test_breadcrumbs_drops_the_largest_and_the_smallest_magnitudes():
    a = {"l": torch.arange(1.0, 11.0).view(1, 10)}
    out = merge_deltas([a, {"l": torch.zeros(1, 10)}], "breadcrumbs", MergeParams(beta=0.1, gamma=0.3)).deltas["l"]
    assert out.tolist() == [[0, 0, 0, 4, 5, 6, 7, 8, 9, 0]]


def test_consensus_keeps_only_what_enough_tasks_use():
    a = {"l": torch.tensor([[1.0, 1.0, 0.0]])}
    b = {"l": torch.tensor([[1.0, 0.0, 1.0]])}
    merged = merge_deltas([a, b], "consensus", MergeParams(lam=0.5, k=2))
    assert merged.deltas["l"].tolist() == [[2.0, 0.0, 0.0]]  # only the entry both tasks use survives
    assert merged.kept_by_consensus["l"] == pytest.approx(1 / 3)


def test_orthogonal_adds_only_what_is_new_to_the_merged_subspace():
    a = {"l": torch.tensor([[1.0, 0.0], [0.0, 0.0]])}
    b = {"l": torch.tensor([[2.0, 0.0], [0.0, 3.0]])}
    out = merge_deltas([a, b], "orthogonal").deltas["l"]
    assert torch.allclose(out, torch.tensor([[1.0, 0.0], [0.0, 3.0]]))  # b's part along a's direction is dropped


def test_dare_ties_is_repeatable_for_a_seed():
    torch.manual_seed(1)
    a, b = {"l": torch.randn(8, 8)}, {"l": torch.randn(8, 8)}
    first = merge_deltas([a, b], "dare_ties", MergeParams(density=0.5, seed=7)).deltas["l"]
    again = merge_deltas([a, b], "dare_ties", MergeParams(density=0.5, seed=7)).deltas["l"]
    other = merge_deltas([a, b], "dare_ties", MergeParams(density=0.5, seed=8)).deltas["l"]
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize("params, word", [
    (MergeParams(weights=(1.0,)), "weights"), (MergeParams(k=3), "k"), (MergeParams(beta=0.5, gamma=0.5), "beta"),
    (MergeParams(density=0), "density")])
def test_bad_parameters_are_refused_by_name(params, word):
    with pytest.raises(ValueError, match=word):
        merge_deltas([{"l": torch.ones(1, 1)}, {"l": torch.ones(1, 1)}], "linear", params)


# -- TALL storage -------------------------------------------------------------------------------------
def test_tall_masks_give_each_source_back_where_the_sources_do_not_overlap():
    a = {"l": torch.tensor([[3.0, 0.0], [0.0, 0.0]]), "only_a": torch.ones(2, 2)}
    b = {"l": torch.tensor([[0.0, -2.0], [0.0, 5.0]])}
    merged = merge_deltas([a, b], "linear").deltas
    found = tall_masks([a, b], merged, lam=0.5)
    assert torch.equal(reconstruct(merged, found.masks[0])["l"], a["l"])
    assert torch.equal(reconstruct(merged, found.masks[1])["l"], b["l"])
    assert "only_a" not in reconstruct(merged, found.masks[1])  # a layer only the other source changes is left out


def test_a_tall_mask_drops_entries_another_source_dominates_and_lambda_sets_how_much():
    a = {"l": torch.tensor([[1.0, 1.0]])}
    b = {"l": torch.tensor([[0.1, 4.0]])}
    merged = merge_deltas([a, b], "linear").deltas
    assert tall_masks([a, b], merged, lam=0.5).masks[0]["l"].tolist() == [[True, False]]  # 1 ≥ 0.5·4 fails
    assert tall_masks([a, b], merged, lam=0.2).masks[0]["l"].tolist() == [[True, True]]  # 1 ≥ 0.2·4 holds


def _relative_error(rebuilt: dict, tau: dict) -> float:
    layers = set(rebuilt) | set(tau)
    diff = sum(float((rebuilt.get(k, 0) - tau.get(k, 0)).pow(2).sum()) if k in tau else
               float(rebuilt[k].pow(2).sum()) for k in layers)
    return (diff / sum(float(t.pow(2).sum()) for t in tau.values())) ** 0.5


def test_fitted_storage_gives_disjoint_sources_back_exactly():
    a = {"l": torch.tensor([[3.0, 0.0], [0.0, 0.0]]), "only_a": torch.ones(2, 2)}
    b = {"l": torch.tensor([[0.0, -2.0], [0.0, 5.0]])}
    fit = fitted_storage([a, b])
    assert torch.equal(reconstruct(fit.shared, fit.masks.masks[0])["l"], a["l"])
    assert torch.equal(reconstruct(fit.shared, fit.masks.masks[1])["l"], b["l"])
    assert "only_a" not in reconstruct(fit.shared, fit.masks.masks[1])
    assert fit.relative_error == [0.0, 0.0]


def test_fitted_storage_rebuilds_a_small_source_beside_a_large_one_better_than_masks_over_any_merge():
    # Dense, overlapping task vectors of very different sizes, as LoRA ΔWs are: the paper's masks drop most of
    # the small one where the large one dominates; the fitted form balances the two relative errors.
    torch.manual_seed(0)
    small = {"l": torch.randn(64, 64) * 0.1, "m": torch.randn(32, 64) * 0.1}
    large = {"l": torch.randn(64, 64), "m": torch.randn(32, 64)}
    middle = {"l": torch.randn(64, 64) * 0.4}
    sources = [small, large, middle]
    fit = fitted_storage(sources)
    rebuilt = [reconstruct(fit.shared, m) for m in fit.masks.masks]
    errors = [_relative_error(r, t) for r, t in zip(rebuilt, sources)]
    assert errors == pytest.approx(fit.relative_error, abs=1e-4)
    assert max(errors) - min(errors) < 0.02  # balanced: no source pays for another
    for method in ("linear", "ties"):
        merged = merge_deltas(sources, method).deltas
        for lam in (0.5, 1.0):
            found = tall_masks(sources, merged, lam)
            worst = max(_relative_error(reconstruct(merged, m), t) for m, t in zip(found.masks, sources))
            assert max(errors) < worst, (method, lam)
    # the stored form is the usual one: a float ΔW per layer and one bit per entry per source
    back = read_merged(merged_bytes(fit.shared))
    assert all(torch.equal(read_mask(mask_bytes(m), back)[k], m[k]) for m in fit.masks.masks for k in m)


def test_fitted_storage_refuses_more_sources_than_it_can_enumerate():
    with pytest.raises(ValueError, match="sources"):
        fitted_storage([{"l": torch.ones(1, 1)}] * (MAX_FITTED_SOURCES + 1))


def test_the_stored_form_reads_back_exactly_at_one_bit_per_entry():
    torch.manual_seed(0)
    merged = {"x.q_proj": torch.randn(128, 128), "x.up_proj": torch.randn(512, 128)}
    mask = {layer: torch.rand(t.shape) > 0.7 for layer, t in merged.items()}
    back = read_merged(merged_bytes(merged))
    assert all(torch.equal(back[k], merged[k]) for k in merged)
    packed = mask_bytes(mask)
    assert all(torch.equal(read_mask(packed, back)[k], mask[k]) for k in mask)
    entries = sum(t.numel() for t in merged.values())
    assert entries / 8 <= len(packed) < entries / 8 + 1024  # the bits, plus a small safetensors header


# -- the job, through the API ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gw(kit_dir, tmp_path_factory):
    gateway = GatewayProcess(kit_dir, "transformers", tmp_path_factory.mktemp("merge")).start()
    yield gateway
    gateway.stop()


def _versions(admin: httpx.Client) -> set[str]:
    return {f"{p['name']}@{v['version']}" for p in admin.get("/admin/patches").json() for v in p["versions"]}


def test_a_merge_job_registers_one_version_with_a_retention_report_per_source(gw):
    name = f"merged-{uuid.uuid4().hex[:6]}"
    sources = ["sentiment@1", "reverse@1", "qa@1"]
    with gw.admin() as admin:
        r = admin.post("/admin/merges", json={"sources": sources, "method": "ties", "rank": 16, "name": name,
                                              "params": {"density": 0.5}, "reason": "one adapter for three"})
        assert r.status_code == 202, r.text
        job = gw.wait_job(r.headers["location"], timeout=600)
        assert job["state"] == "succeeded", job["error"]
        result = job["result"]
        version = admin.get(f"/admin/patches/{name}/versions/{result['version']}").json()
    assert version["origin"] == "merge" and sorted(version["parents"]) == sorted(sources)
    assert version["meta"]["method"] == "ties" and version["meta"]["params"]["density"] == 0.5
    assert 0 < result["energy_kept"] <= 1
    rows = {row["alias"]: row for row in result["retention"]}
    assert set(rows) == {"sentiment", "reverse", "qa"}
    for row in rows.values():
        assert row["score_source"] > 0 and 0 <= row["score_merged"] <= 1 and row["n"] > 0
        assert row["retention"] == pytest.approx(row["score_merged"] / row["score_source"])
    assert result["min_retention"] == min(row["retention"] for row in rows.values())
    assert result["seconds"]["merge"] > 0 and result["seconds"]["retention"] > 0


@pytest.mark.parametrize("body, status, word", [
    ({"sources": ["sentiment@1", "nope@1"]}, 404, "no version nope@1"),
    ({"sources": ["sentiment@1", "sentiment@1"]}, 400, "named twice"),
    ({"sources": ["sentiment@1"]}, 400, "sources"),
    ({"sources": ["sentiment@1", "reverse"]}, 400, "version reference"),
    ({"rank": 64}, 422, "rank"),
    ({"name": "../evil"}, 400, "name"),
    ({"method": "magic"}, 400, "method"),
    ({"params": {"k": 5}}, 400, "k must be"),
    ({"params": {"weights": [1.0]}}, 400, "weights"),
    ({"params": {"beta": 0.6, "gamma": 0.5}}, 400, "beta + gamma"),
    ({"params": {"bogus": 1}}, 400, "bogus"),
    ({"tall": True, "tall_store": "magic"}, 400, "tall_store"),
    ({"params": {"init": "magic"}}, 400, "init must be"),
    ({"method": "distill", "params": {"init": "qa@1"}}, 400, "none of the sources"),
    ({"method": "distill", "params": {"steps": 0}}, 400, "steps"),
])
def test_refused_merges_register_nothing(gw, body, status, word):
    request = {"sources": ["sentiment@1", "reverse@1"], "method": "linear", "rank": 8, "name": "refused", **body}
    with gw.admin() as admin:
        before = _versions(admin)
        r = admin.post("/admin/merges", json=request)
        assert r.status_code == status, r.text
        assert word in r.json()["error"]["message"], r.json()
        assert not [j for j in admin.get("/admin/jobs").json() if j["params"].get("name") == "refused"]
        assert _versions(admin) == before


def test_a_merge_by_distillation_keeps_every_task_where_a_merge_of_deltas_keeps_none(gw):
    """The kit's patches each act on every prompt, so TIES keeps almost nothing of any task; one adapter
    trained on the aliases' distillation prompts (the job's defaults) keeps them."""
    sources = ["sentiment@1", "reverse@1", "qa@1"]
    results = {}
    with gw.admin() as admin:
        for method, params in (("ties", {}), ("distill", {})):
            r = admin.post("/admin/merges", json={"sources": sources, "method": method, "rank": 16, "params": params,
                                                  "name": f"{method}-{uuid.uuid4().hex[:6]}"})
            assert r.status_code == 202, r.text
            job = gw.wait_job(r.headers["location"], timeout=600)
            assert job["state"] == "succeeded", job["error"]
            results[method] = job["result"]
        version = admin.get(f"/admin/patches/{results['distill']['ref'].replace('@', '/versions/')}").json()
    made = results["distill"]["distillation"]
    # auto: the sources rank 16 holds exactly, fewest prompts first (qa: 96, rank 8), then smallest (sentiment: 8)
    assert made["init"] == "qa@1+sentiment@1" and made["prompts"] == {"sentiment@1": 512, "reverse@1": 512, "qa@1": 96}
    assert made["steps"] == MergeParams().steps and made["agreement"] > 0.9
    assert version["meta"]["method"] == "distill" and sorted(version["parents"]) == sorted(sources)
    assert results["distill"]["energy_kept"] is None  # trained, not truncated
    kept = {row["alias"]: row["retention"] for row in results["distill"]["retention"]}
    ties = {row["alias"]: row["retention"] for row in results["ties"]["retention"]}
    assert max(ties.values()) < 0.5 and min(kept.values()) >= 0.6, (ties, kept)


def test_a_merge_by_distillation_needs_each_source_alias_s_prompts(gw, kit_dir):
    name = f"bare-{uuid.uuid4().hex[:6]}"
    files = [("file", (f.name, f.read_bytes())) for f in sorted((kit_dir / "patches" / "reverse").iterdir())]
    with gw.admin() as admin:
        assert admin.post(f"/admin/patches/{name}/versions", files=files, data={"activate": "true"}).status_code == 201
        before = _versions(admin)
        r = admin.post("/admin/merges", json={"sources": ["sentiment@1", f"{name}@1"], "method": "distill",
                                              "rank": 8, "name": "refused"})
        assert r.status_code == 422 and "distillation prompts" in r.json()["error"]["message"], r.text
        assert name in r.json()["error"]["message"] and _versions(admin) == before


@pytest.fixture(scope="module")
def tall_merge(gw):
    """One linear merge of sentiment@1 and qa@1, kept as TALL storage too: the finished job."""
    with gw.admin() as admin:
        r = admin.post("/admin/merges", json={"sources": ["sentiment@1", "qa@1"], "method": "linear", "rank": 16,
                                              "name": f"shared-{uuid.uuid4().hex[:6]}", "tall": True})
        assert r.status_code == 202, r.text
    job = gw.wait_job(r.headers["location"], timeout=600)
    assert job["state"] == "succeeded", job["error"]
    return job


def test_tall_storage_rebuilds_each_source_as_its_next_version_from_shared_blobs(gw, tall_merge, tmp_path):
    result = tall_merge["result"]
    tall = result["tall"]
    with gw.admin() as admin:
        rebuilt = [admin.get(f"/admin/patches/{ref.replace('@', '/versions/')}").json() for ref in tall["versions"]]
        merged = admin.get(f"/admin/patches/{result['ref'].replace('@', '/versions/')}").json()
    assert [f"{v['name']}@{v['version']}" for v in rebuilt] == tall["versions"]
    assert [v["name"] for v in rebuilt] == ["sentiment", "qa"] and all(v["version"] > 1 for v in rebuilt)
    # the default store: shared ΔW and masks fitted to the sources, each rebuilt with the same relative error
    assert tall["store"] == merged["meta"]["tall"]["store"] == "fitted" and tall["lam"] is None
    errors = merged["meta"]["tall"]["relative_error"]
    assert set(errors) == {"sentiment@1", "qa@1"} and all(0 < e < 1 for e in errors.values())
    assert max(errors.values()) - min(errors.values()) < 0.02
    for version, source in zip(rebuilt, ["sentiment@1", "qa@1"]):
        assert version["origin"] == "merge" and sorted(version["parents"]) == ["qa@1", "sentiment@1"]
        meta = version["meta"]["tall"]
        assert meta["source"] == source and meta["merge"] == result["ref"]
        # One merged ΔW shared by every rebuilt source, one mask each, all in the merge's own record.
        assert meta["merged_delta"] == merged["meta"]["tall"]["merged_delta"]
        assert meta["mask"] == merged["meta"]["tall"]["masks"][source]
        assert 0 < meta["mask_density"] < 1
    # What was registered is what the stored form rebuilds: m_t ⊙ τ_MTL, read from the blobs, at rank 16.
    blobs = LocalBlobStore(gw.data_dir / "blobs")
    stored = read_merged(blobs.path_of(merged["meta"]["tall"]["merged_delta"]).read_bytes())
    for version in rebuilt:
        mask = read_mask(blobs.path_of(version["meta"]["tall"]["mask"]).read_bytes(), stored)
        expected = reconstruct(stored, mask)
        served = adapter_deltas(materialize(blobs, version["files"], tmp_path / version["meta"]["tall"]["source"]))
        assert set(served) == set(expected)
        for layer, delta in expected.items():
            a, b, _, _ = low_rank(delta, 16)
            assert torch.allclose(served[layer], b @ a, atol=1e-5)
    sizes = tall["bytes"]
    assert sizes["tall"] == sizes["merged_delta"] + sizes["masks"] and sizes["sources"] > 0
    assert sizes["sources_dense"] == 2 * sizes["merged_delta"]
    assert sizes["masks"] < 2 * sizes["merged_delta"] / 32 + 4096  # a bit per float32 entry, per source
    rows = {row["alias"]: row for row in tall["retention"]}
    assert set(rows) == {"sentiment", "qa"}
    assert [row["candidate"] for row in tall["retention"]] == tall["versions"]
    for row in rows.values():
        assert row["retention"] == pytest.approx(row["score_merged"] / row["score_source"])
    assert tall["min_retention"] == min(row["retention"] for row in rows.values())


def test_tall_storage_of_the_papers_masks_keeps_the_merge_and_one_lambda_mask_per_source(gw, tmp_path):
    with gw.admin() as admin:
        r = admin.post("/admin/merges", json={"sources": ["sentiment@1", "qa@1"], "method": "linear", "rank": 8,
                                              "name": f"masks-{uuid.uuid4().hex[:6]}", "tall": True,
                                              "tall_store": "masks", "params": {"lam": 0.5}})
        assert r.status_code == 202, r.text
        job = gw.wait_job(r.headers["location"], timeout=600)
        assert job["state"] == "succeeded", job["error"]
        merged = admin.get(f"/admin/patches/{job['result']['ref'].replace('@', '/versions/')}").json()
        sources = [admin.get(f"/admin/patches/{ref}/versions/1").json() for ref in ("sentiment", "qa")]
    meta = merged["meta"]["tall"]
    assert meta["store"] == job["result"]["tall"]["store"] == "masks" and meta["lam"] == 0.5
    blobs = LocalBlobStore(gw.data_dir / "blobs")
    taus = [adapter_deltas(materialize(blobs, s["files"], tmp_path / s["name"])) for s in sources]
    stored = read_merged(blobs.path_of(meta["merged_delta"]).read_bytes())
    expected = merge_deltas(taus, "linear").deltas  # the merge's ΔW before truncation
    assert set(stored) == set(expected) and all(torch.allclose(stored[k], expected[k], atol=1e-6) for k in stored)
    for ref, found in zip(("sentiment@1", "qa@1"), tall_masks(taus, expected, 0.5).masks):
        mask = read_mask(blobs.path_of(meta["masks"][ref]).read_bytes(), stored)
        assert all(torch.equal(mask[k], found[k]) for k in mask)


def test_several_aliases_served_by_one_merge_and_one_rolled_back_alone(gw, tall_merge):
    name, version = tall_merge["result"]["ref"].split("@")
    with gw.admin() as admin:
        for alias in ("sentiment", "qa"):
            moved = admin.post(f"/admin/aliases/{alias}/activate",
                               json={"patch": name, "version": int(version), "force": True,
                                     "reason": "serve the merge"})
            assert moved.status_code == 200, moved.text

        def served_by(alias: str) -> str:
            return httpx.post(f"{gw.url}/v1/completions", timeout=60,
                              json={"model": alias, "prompt": "x", "max_tokens": 1}).headers["x-patchserve-served-by"]

        assert served_by("sentiment") == served_by("qa") == f"base=base-v1; patch={name}@{version}"
        assert admin.post("/admin/aliases/sentiment/rollback", json={"reason": "back"}).status_code == 200
        assert served_by("sentiment") == "base=base-v1; patch=sentiment@1"
        assert served_by("qa") == f"base=base-v1; patch={name}@{version}"
