"""Merging the kit's patches by every method: how much of each task each merge keeps.

    .venv/bin/python loadtests/bench_merge.py [--rank 16] [--kit .patchserve/kit]

For each method (service/lora/merge.py), the kit's sentiment, reverse and qa patches are merged at
`--rank` through the same code the worker's merge job runs (ΔW per layer → merge → truncated SVD →
PEFT adapter), and the merged adapter answers each task's evaluation set greedily; retention is the
merged score over the source patch's own score on that set. Also the energy the rank keeps and the
merge time. Writes loadtests/results/merge.json and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.evaluation.generation import greedy_generate  # noqa: E402
from service.evaluation.scoring import answer_text, exact_match  # noqa: E402
from service.lora.factors import adapter_deltas, write_adapter  # noqa: E402
from service.lora.merge import merge_deltas  # noqa: E402
from service.lora.params import METHODS, MergeParams  # noqa: E402

TASKS = ("sentiment", "reverse", "qa")


def score(model, tok, rows: list[dict]) -> float:
    out = greedy_generate(model, tok, [r["prompt"] for r in rows])
    return sum(exact_match(answer_text(tok, o), r["reference"]) for o, r in zip(out, rows)) / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--kit", type=Path, default=REPO / ".patchserve" / "kit")
    args = parser.parse_args()
    base_dir = args.kit / "base-v1"
    tok = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    rows = {t: [json.loads(line) for line in (args.kit / "eval" / f"{t}.jsonl").read_text().splitlines() if line]
            for t in TASKS}
    own = {}
    for t in TASKS:
        patched = PeftModel.from_pretrained(copy.deepcopy(base), args.kit / "patches" / t).eval()
        own[t] = score(patched, tok, rows[t])
    print(f"source patches alone: {', '.join(f'{t} {own[t]:.2f}' for t in TASKS)}", flush=True)
    sources = [adapter_deltas(args.kit / "patches" / t) for t in TASKS]
    results = []
    for method in METHODS:
        started = time.perf_counter()
        merged = merge_deltas(sources, method, MergeParams())
        with tempfile.TemporaryDirectory() as out:
            found = write_adapter(base_dir, merged.deltas, args.rank, Path(out))
            seconds = time.perf_counter() - started
            model = PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
            scores = {t: score(model, tok, rows[t]) for t in TASKS}
        retention = {t: scores[t] / own[t] if own[t] else None for t in TASKS}
        row = {"method": method, "rank": args.rank, "energy_kept": round(found.energy_kept, 4),
               "merge_s": round(seconds, 2), "scores": scores, "retention": retention,
               "min_retention": min(r for r in retention.values() if r is not None)}
        results.append(row)
        print(f"{method:12s} " + "  ".join(f"{t} {scores[t]:.2f} ({retention[t]:.0%})" for t in TASKS)
              + f"  energy {found.energy_kept:.3f}  {seconds:.1f} s", flush=True)
    best = max(results, key=lambda r: r["min_retention"])
    runner_up = sorted(results, key=lambda r: r["min_retention"])[-2]
    print(f"best: {best['method']} keeps at least {best['min_retention']:.0%} of every task "
          f"({runner_up['method']} next, {runner_up['min_retention']:.0%})")
    out = REPO / "loadtests" / "results" / "merge.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"sources": own, "methods": results, "best": best["method"],
                               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
