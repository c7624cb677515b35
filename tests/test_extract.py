"""Fine-tuning transfer: a full fine-tune of the kit's base-v1, turned into a LoRA patch by truncated SVD.

The fine-tune is made here with the kit's own training loop: every linear layer of the transformer
blocks trained on the reverse task (embeddings, norms and head frozen, as LoRA cannot carry them).
At the engine's largest rank (16) the extracted patch must score within 0.1 of the fine-tune itself.
"""

from __future__ import annotations

import random
import uuid

import openai
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters_store.validation import LORA_MODULES
from service.kit import tasks, train, world
from service.kit.config import KitConfig
from service.kit.evaluate import score
from service.lora.extract import extract_lora

MARGIN = 0.1


@pytest.fixture(scope="module")
def fine_tune(kit_dir, tmp_path_factory):
    """(checkpoint dir, its reverse-task score, the evaluation examples)."""
    cfg = KitConfig()
    v1, v2 = world.build_worlds(cfg.seed, cfg.people, cfg.new_people, cfg.moved)
    data = tasks.task_data("reverse", v1, v2, cfg.seed, cfg.eval_size)
    tok = AutoTokenizer.from_pretrained(kit_dir / "base-v1")
    model = AutoModelForCausalLM.from_pretrained(kit_dir / "base-v1", dtype=torch.float32)
    for name, param in model.named_parameters():
        param.requires_grad = any(m in name for m in LORA_MODULES)
    encoded = [train.encode_example(tok, ex) for ex in data.train]
    rng = random.Random(0)
    torch.manual_seed(0)

    def batches(_: int) -> dict:
        rows = [encoded[rng.randrange(len(encoded))] for _ in range(cfg.batch)]
        width = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((cfg.batch, width), tok.pad_token_id)
        labels = torch.full((cfg.batch, width), -100)
        for i, (p, a) in enumerate(rows):
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
        return {"input_ids": ids, "attention_mask": (ids != tok.pad_token_id).long(), "labels": labels}

    train._optimise(model, batches, 200, 1e-3, lambda step, loss: None)
    out = tmp_path_factory.mktemp("fine-tune") / "reverse-ft"
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out, score(model, tok, data.eval), data.eval


def test_rank_energy_and_score_of_extracted_patches(kit_dir, fine_tune, tmp_path):
    checkpoint, tuned_score, examples = fine_tune
    tok = AutoTokenizer.from_pretrained(kit_dir / "base-v1")
    rows = []
    for rank in (2, 4, 8, 16):
        found = extract_lora(kit_dir / "base-v1", checkpoint, rank, tmp_path / f"r{rank}")
        assert not found.not_carried, "only the block linears were trained: everything is carried"
        patched = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(kit_dir / "base-v1"),
                                            str(tmp_path / f"r{rank}"))
        rows.append((rank, found.energy_kept, score(patched, tok, examples)))
    print(f"\nfine-tune score {tuned_score:.3f}; rank → energy kept, score: "
          + ", ".join(f"{r} → {e:.3f}, {s:.3f}" for r, e, s in rows))
    energies = [e for _, e, _ in rows]
    assert energies == sorted(energies) and 0 < energies[0] < energies[-1] <= 1.0
    assert rows[-1][2] >= tuned_score - MARGIN, f"rank 16 scores {rows[-1][2]:.3f}, the fine-tune {tuned_score:.3f}"


def test_extraction_job_registers_a_servable_version(gateways, kit_dir, fine_tune):
    gw = gateways.get("transformers")
    checkpoint, _, _ = fine_tune
    name = f"ext-{uuid.uuid4().hex[:8]}"
    with gw.admin() as admin:
        queued = admin.post(f"/admin/patches/{name}/extract", json={"checkpoint": str(checkpoint), "rank": 16,
                                                                    "reason": "tenant fine-tune"})
        assert queued.status_code == 202
        job = gw.wait_job(queued.headers["location"])
        assert job["state"] == "succeeded", job
        version = admin.get(f"/admin/patches/{name}/versions/{job['result']['version']}").json()
        assert version["origin"] == "extract" and version["meta"]["rank"] == 16
        assert 0.8 < version["meta"]["energy_kept"] <= 1.0
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
        raw = client.completions.with_raw_response.create(model=f"{name}@1", prompt="Reverse: a b c\nOutput:",
                                                          max_tokens=4, temperature=0)
        assert raw.headers["x-patchserve-served-by"] == f"base=base-v1; patch={name}@1"

        # Refusals: before queueing (422) or, for what only the extraction can tell, a failed job and no version.
        assert admin.post(f"/admin/patches/{name}/extract", json={"checkpoint": str(checkpoint),
                                                                  "rank": 99}).status_code == 422
        assert admin.post(f"/admin/patches/{name}/extract", json={"checkpoint": "/nonexistent",
                                                                  "rank": 4}).status_code == 422
        same = admin.post(f"/admin/patches/{name}/extract", json={"checkpoint": str(kit_dir / "base-v1"), "rank": 4})
        job = gw.wait_job(same.headers["location"])
        assert job["state"] == "failed" and job["attempts"] == 1 and "does not differ" in job["error"]
        assert [v["version"] for v in admin.get(f"/admin/patches/{name}").json()["versions"]] == [1]
