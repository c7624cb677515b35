"""Base upgrade with compatibility repair, per kit task: old version, carried (PortLLM), repaired (MUSCLE
distillation), and a patch trained from scratch on base-v2 with the kit's training data (the upper reference).

    .venv/bin/python loadtests/bench_port.py

Starts a gateway (transformers engine) on a fresh data dir, registers base-v2 with move + repair through
the admin API and follows the job; then trains a from-scratch patch per task on base-v2 exactly as the kit
trains its base-v1 patches, and scores it with the same greedy generation. Writes
loadtests/results/port.json and prints the table: scores, NFR against the base-v1 version, lift kept
((score − base-v2 alone) / (base-v1 version − base-v1 alone)), time.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.evaluation.generation import greedy_generate  # noqa: E402
from service.evaluation.scoring import answer_text, exact_match  # noqa: E402
from service.kit import tasks, train, world  # noqa: E402
from service.kit.config import KitConfig  # noqa: E402
from service.lora.distill import load_patched  # noqa: E402
from tests.gateway_server import GatewayProcess  # noqa: E402

RESULTS = REPO / "loadtests" / "results" / "port.json"
KIT = REPO / ".patchserve" / "kit"
TASKS = ("sentiment", "reverse", "qa")


def scores_of(model, tok, rows: list[dict]) -> list[float]:
    outs = greedy_generate(model, tok, [r["prompt"] for r in rows], 24)
    return [exact_match(answer_text(tok, o), r["reference"]) for o, r in zip(outs, rows)]


def from_scratch(task: str, tok, rows: list[dict], old: list[float]) -> dict:
    """A patch of the kit's spec trained on base-v2 from a fresh LoRA with the kit's training data."""
    cfg = KitConfig()
    v1, v2 = world.build_worlds(cfg.seed, cfg.people, cfg.new_people, cfg.moved)
    spec = next(s for s in tasks.PATCHES if s.task == task)
    data = tasks.task_data(task, v1, v2, cfg.seed, cfg.eval_size)
    base = AutoModelForCausalLM.from_pretrained(str(KIT / "base-v2"), dtype=torch.float32)
    started = time.monotonic()
    model = train.train_patch(copy.deepcopy(base), tok, spec, data.train, batch=cfg.batch, seed=cfg.seed,
                              on_step=lambda step, loss: None)
    seconds = time.monotonic() - started
    model.eval()
    new = scores_of(model, tok, rows)
    return {"score": sum(new) / len(new), "nfr": sum(n < o for n, o in zip(new, old)) / len(new),
            "seconds": round(seconds, 1)}


def main() -> None:
    torch.set_num_threads(2)
    manifest = json.loads((KIT / "manifest.json").read_text())
    with tempfile.TemporaryDirectory(prefix="bench-port-") as tmp:
        print("bench_port: starting a gateway (transformers engine) …", flush=True)
        gw = GatewayProcess(KIT, "transformers", Path(tmp)).start()
        try:
            with gw.admin() as admin:
                started = time.monotonic()
                r = admin.post("/admin/bases", json={"name": "base-v2", "version": "kit", "path": str(KIT / "base-v2"),
                                                     "move": True, "repair": True})
                r.raise_for_status()
                print("bench_port: base-v2 registered; carrying, measuring and repairing every alias …", flush=True)
                job = gw.wait_job(r.headers["location"], timeout=3600)
                job_seconds = time.monotonic() - started
        finally:
            gw.stop()
    if job["state"] != "succeeded":
        raise SystemExit(f"bench_port: the port job failed: {job['error']}")
    tok = AutoTokenizer.from_pretrained(str(KIT / "base-v1"))
    rows_by_alias = {row["alias"]: row for row in job["result"]["aliases"]}
    table = {}
    for task in TASKS:
        row = rows_by_alias[task]
        kit_scores = manifest["scores"]["tasks"][task]
        alone_v1, alone_v2 = kit_scores["base-v1"], row["scores"]["base-v2"]
        old = row["scores"]["base-v1+patch"]
        evalset = [json.loads(line) for line in (KIT / "eval" / f"{task}.jsonl").read_text().splitlines()]
        teacher = load_patched(KIT / "base-v1", KIT / "patches" / task)
        old_items = scores_of(teacher, tok, evalset)
        print(f"bench_port: training {task} from scratch on base-v2 …", flush=True)
        scratch = from_scratch(task, tok, evalset, old_items)
        fixed = row.get("repair") or {}
        lift = old - alone_v1

        def kept(score: float, alone_v2: float = alone_v2, lift: float = lift) -> float:
            return round((score - alone_v2) / lift, 3) if lift else float("nan")

        repaired_score = fixed.get("score_repaired", row["scores"]["base-v2+patch"])
        table[task] = {
            "base-v1": alone_v1, "old (base-v1+patch)": old, "base-v2": alone_v2,
            "carried": row["scores"]["base-v2+patch"], "carried_nfr": row["nfr"],
            "carried_passed": row["gate"]["passed"], "repaired": repaired_score, "repaired_nfr": fixed.get("nfr"),
            "repaired_passed": (fixed.get("gate") or {}).get("passed"), "repair_seconds": fixed.get("seconds"),
            "distill_seconds": (fixed.get("distillation") or {}).get("seconds"),
            "from_scratch": scratch["score"], "from_scratch_nfr": scratch["nfr"],
            "from_scratch_seconds": scratch["seconds"], "lift_kept_carried": kept(row["scores"]["base-v2+patch"]),
            "lift_kept_repaired": kept(repaired_score), "lift_kept_from_scratch": kept(scratch["score"]),
            "moved_to": rows_by_alias[task].get("repair", {}).get("repaired") if row["moved"] else None,
        }
    out = {"job_seconds": round(job_seconds, 1), "tasks": table}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))
    print(f"\n{'task':10} {'old':>6} {'carried':>8} {'NFR':>6} {'repaired':>9} {'NFR':>6} {'scratch':>8} {'NFR':>6} "
          f"{'kept c/r/s':>18} {'repair s':>9} {'scratch s':>10}")
    for task, t in table.items():
        print(f"{task:10} {t['old (base-v1+patch)']:6.3f} {t['carried']:8.3f} {t['carried_nfr']:6.3f} "
              f"{t['repaired']:9.3f} {t['repaired_nfr'] or 0:6.3f} {t['from_scratch']:8.3f} "
              f"{t['from_scratch_nfr']:6.3f} "
              f"{t['lift_kept_carried']:>5.0%}/{t['lift_kept_repaired']:>5.0%}/{t['lift_kept_from_scratch']:>5.0%} "
              f"{t['repair_seconds'] or 0:9.1f} {t['from_scratch_seconds']:10.1f}")
    print(f"\nupgrade job (carry + measure + repair + gate, 3 aliases): {job_seconds:.0f} s; results in {RESULTS}")


if __name__ == "__main__":
    main()
