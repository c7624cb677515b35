"""Merging the kit's patches by every method: how much of each task one merged adapter keeps, how much
each source keeps when rebuilt from TALL storage, and why the kit's patches interfere.

    .venv/bin/python loadtests/bench_merge.py [--rank 16] [--lam 0.4] [--kit .patchserve/kit] [--no-why]

For each method (service/lora/merge.py), the kit's sentiment, reverse and qa patches are merged at
`--rank` through the same code the worker's merge job runs (ΔW per layer → merge → truncated SVD →
PEFT adapter), and the merged adapter answers each task's evaluation set greedily; retention is the
merged score over the source patch's own score on that set. Also the energy the rank keeps and the
merge time. Then TALL storage of the same merge (service/lora/tall.py): each source rebuilt as
m_t ⊙ τ_MTL with its mask at `--lam`, written at `--rank`, answers its own task; and the bytes of that
storage against the patch files and against dense ΔWs. Then the fitted TALL storage (the job's default:
one shared ΔW and the masks fitted to rebuild every source with the same relative error). "Why" (unless
--no-why): each layer's ΔW norm relative to the base weight and the cosine between sources, linear merges
at weights 1, 1/2, 1/3, untruncated, and of each pair, and TALL (of linear and TIES) at λ from 0.2 to 1.

Writes loadtests/results/merge.json and merge.png; prints the tables.
"""

from __future__ import annotations

import argparse
import copy
import itertools
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
from service.lora.merge_by_distillation import DistillSource, distil_merge  # noqa: E402
from service.lora.params import DELTA_METHODS, MergeParams  # noqa: E402
from service.lora.tall import fitted_storage, mask_bytes, merged_bytes, reconstruct, tall_masks  # noqa: E402

TASKS = ("sentiment", "reverse", "qa")
FULL_RANK = 128  # the kit's hidden size: a rank-128 adapter holds any of its ΔWs exactly


class Bench:
    """The kit's base, tokenizer and evaluation sets, and how a set of ΔWs scores on them."""

    def __init__(self, kit: Path):
        self.kit, self.base_dir = kit, kit / "base-v1"
        self.tok = AutoTokenizer.from_pretrained(self.base_dir)
        self.base = AutoModelForCausalLM.from_pretrained(self.base_dir, dtype=torch.float32).eval()
        self.rows = {t: [json.loads(line) for line in (kit / "eval" / f"{t}.jsonl").read_text().splitlines() if line]
                     for t in TASKS}

    def score_dir(self, adapter: Path, tasks=TASKS) -> dict[str, float]:
        model = PeftModel.from_pretrained(copy.deepcopy(self.base), adapter).eval()
        out = {}
        for t in tasks:
            gen = greedy_generate(model, self.tok, [r["prompt"] for r in self.rows[t]])
            out[t] = sum(exact_match(answer_text(self.tok, g), r["reference"])
                         for g, r in zip(gen, self.rows[t])) / len(self.rows[t])
        return out

    def score(self, deltas: dict, rank: int, tasks=TASKS) -> tuple[dict[str, float], float]:
        """(scores, energy kept) of `deltas` written as a rank-`rank` adapter the way the merge job writes it."""
        with tempfile.TemporaryDirectory() as out:
            found = write_adapter(self.base_dir, deltas, rank, Path(out))
            return self.score_dir(Path(out), tasks), found.energy_kept


def retention(scores: dict, own: dict) -> dict:
    return {t: scores[t] / own[t] if own[t] else None for t in scores}


def least(r: dict) -> float:
    return min(v for v in r.values() if v is not None)


def line(label: str, scores: dict, kept: dict, extra: str = "") -> str:
    return f"{label:28s} " + "  ".join(f"{t} {scores[t]:.2f} ({kept[t]:4.0%})" for t in scores) + extra


def tall_row(bench: Bench, sources: list[dict], merged: dict, lam: float, rank: int, own: dict) -> dict:
    """Each source rebuilt from TALL storage of `merged` and scored on its own task; the storage's bytes."""
    found = tall_masks(sources, merged, lam)
    scores = {}
    for t, mask in zip(TASKS, found.masks):
        scores[t] = bench.score(reconstruct(merged, mask), rank, [t])[0][t]
    dense = len(merged_bytes(merged))
    masks = sum(len(mask_bytes(m)) for m in found.masks)
    kept = retention(scores, own)
    return {"lam": lam, "rank": rank, "scores": scores, "retention": kept, "min_retention": least(kept),
            "mask_density": dict(zip(TASKS, (round(d, 4) for d in found.density))),
            "bytes": {"merged_delta": dense, "masks": masks, "tall": dense + masks}}


def distill_row(bench: Bench, kit: Path, rank: int, own: dict) -> dict:
    """One adapter trained on the kit's distillation prompts of each task as each source answers them
    (service/lora/merge_by_distillation.py, the job's code and defaults), scored like the merges."""
    sources = [DistillSource(f"{t}@1", kit / "patches" / t,
                             [json.loads(line)["prompt"] for line in (kit / "distill" / f"{t}.jsonl").read_text()
                              .splitlines() if line]) for t in TASKS]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        made = distil_merge(bench.base_dir, sources, rank, MergeParams(), Path(work),
                            lambda model, tok, prompts: greedy_generate(model, tok, prompts),
                            lambda pct, stage: print(f"  {stage}", flush=True) if "step" not in stage or
                            "00/" in stage else None)
        merge_s = time.perf_counter() - started
        scores = bench.score_dir(Path(work) / "merged")
    kept = retention(scores, own)
    return {"method": "distill", "rank": rank, "energy_kept": None, "init": made.init.replace("@1", ""),
            "steps": made.result.steps, "merge_s": round(merge_s, 1),
            "merge_and_score_s": round(time.perf_counter() - started, 2), "scores": scores, "retention": kept,
            "min_retention": least(kept)}


def fitted_row(bench: Bench, sources: list[dict], rank: int, own: dict) -> dict:
    """Each source rebuilt from the fitted TALL storage (no merge method: the shared ΔW is fitted) and scored."""
    started = time.perf_counter()
    fit = fitted_storage(sources)
    fit_s = time.perf_counter() - started
    scores = {t: bench.score(reconstruct(fit.shared, mask), rank, [t])[0][t]
              for t, mask in zip(TASKS, fit.masks.masks)}
    kept = retention(scores, own)
    dense, masks = len(merged_bytes(fit.shared)), sum(len(mask_bytes(m)) for m in fit.masks.masks)
    return {"method": "fitted", "rank": rank, "scores": scores, "retention": kept, "min_retention": least(kept),
            "fit_s": round(fit_s, 2), "relative_error": dict(zip(TASKS, fit.relative_error)),
            "mask_density": dict(zip(TASKS, (round(d, 4) for d in fit.masks.density))),
            "bytes": {"merged_delta": dense, "masks": masks, "tall": dense + masks}}


def why(bench: Bench, sources: list[dict], own: dict, rank: int) -> dict:
    """What the interference is made of: layer norms and cosines, weights, truncation, pairs, TALL's λ."""
    out: dict = {"layers": []}
    weights = bench.base.state_dict()
    for layer in sorted({name for s in sources for name in s}):
        norm = weights[f"{layer}.weight"].norm()
        row = {"layer": layer, "relative_norm": {t: round((s[layer].norm() / norm).item(), 4)
                                                 for t, s in zip(TASKS, sources) if layer in s}, "cosine": {}}
        for (i, a), (j, b) in itertools.combinations(enumerate(sources), 2):
            if layer in a and layer in b:
                x, y = a[layer].flatten(), b[layer].flatten()
                row["cosine"][f"{TASKS[i]}/{TASKS[j]}"] = round((x @ y / (x.norm() * y.norm())).item(), 4)
        out["layers"].append(row)
    cosines = [abs(c) for r in out["layers"] for c in r["cosine"].values()]
    print(f"layers: ΔW/W norm {min(v for r in out['layers'] for v in r['relative_norm'].values()):.2f}–"
          f"{max(v for r in out['layers'] for v in r['relative_norm'].values()):.2f}; |cosine| between sources "
          f"at most {max(cosines):.2f} (mean {sum(cosines) / len(cosines):.2f}): the sources are large and close to "
          f"orthogonal, so the merge is their sum, each one's edit acting on every prompt", flush=True)
    out["weights"] = []
    for w in (1.0, 0.5, 1 / 3):
        scores, _ = bench.score(merge_deltas(sources, "linear", MergeParams(weights=(w,) * 3)).deltas, rank)
        out["weights"].append({"weight": round(w, 4), "scores": scores, "retention": retention(scores, own)})
        print(line(f"linear, weights {w:.2f}", scores, retention(scores, own)), flush=True)
    scores, _ = bench.score(merge_deltas(sources, "linear").deltas, FULL_RANK)
    out["untruncated"] = {"rank": FULL_RANK, "scores": scores, "retention": retention(scores, own)}
    print(line(f"linear, rank {FULL_RANK} (exact)", scores, retention(scores, own)), flush=True)
    out["pairs"] = []
    for (i, a), (j, b) in itertools.combinations(enumerate(sources), 2):
        tasks = (TASKS[i], TASKS[j])
        scores, _ = bench.score(merge_deltas([a, b], "linear").deltas, rank, tasks)
        kept = retention(scores, own)
        out["pairs"].append({"sources": list(tasks), "scores": scores, "retention": kept})
        print(line(f"linear pair {'+'.join(tasks)}", scores, kept), flush=True)
    # TALL picks λ per task on validation data; here every λ is shown on the evaluation sets themselves, so
    # the best of these rows is an upper bound, not a figure a merge would reach without looking at the test.
    out["tall_lambda"] = []
    for method in ("linear", "ties"):
        merged = merge_deltas(sources, method, MergeParams()).deltas
        for lam in (0.2, 0.3, 0.4, 0.5, 0.6, 1.0):
            row = tall_row(bench, sources, merged, lam, rank, own)
            out["tall_lambda"].append({"method": method, **row})
            print(line(f"TALL of {method}, λ {lam}", row["scores"], row["retention"],
                       f"  mask density {row['mask_density']}"), flush=True)
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [r["method"] for r in results["methods"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    ax = axes[0]
    width = 0.13
    for k, t in enumerate(TASKS):
        for n, (rows, hatch) in enumerate(((results["methods"], ""), (results["tall"], "//"))):
            # distill has no TALL row: its bars sit at its own position, one group of three
            xs = [methods.index(r["method"]) + (k + 3 * n) * width - (2.5 if r["method"] != "distill" else 1) * width
                  for r in rows]
            ax.bar(xs, [r["retention"][t] for r in rows], width, color=f"C{k}", hatch=hatch, edgecolor="white",
                   label=f"{t}, {'one merged adapter' if n == 0 else 'rebuilt from TALL storage'}")
        ax.bar(len(methods) + (k - 1) * width, results["tall_fitted"]["retention"][t], width, color=f"C{k}",
               hatch="//", edgecolor="white")
    ax.axhline(0.95, color="black", lw=0.8, ls="--")
    ax.text(len(methods) - 0.5, 0.96, "95 %", ha="right", fontsize=8)
    ax.set_xticks(range(len(methods) + 1), [*methods, "fitted\n(TALL only)"])
    ax.set_ylabel("retention: merged score / source score")
    ax.set_ylim(0, 1.25)
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    ax.set_title(f"kit patches merged at rank {results['rank']} (TALL λ {results['lam']})")
    ax = axes[1]
    sizes = results["bytes"]
    labels = ["patch files", "TALL: merged ΔW\n+ masks", "dense ΔW\nper source"]
    ax.bar(labels, [sizes["sources"] / 1024, sizes["tall"] / 1024, sizes["sources_dense"] / 1024],
           color=["C0", "C1", "C7"])
    ax.set_ylabel("store KiB for the three sources")
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lam", type=float, default=MergeParams().lam, help="λ of the TALL masks")
    parser.add_argument("--kit", type=Path, default=REPO / ".patchserve" / "kit")
    parser.add_argument("--no-why", action="store_true", help="skip the interference diagnostics")
    args = parser.parse_args()
    torch.manual_seed(0)
    bench = Bench(args.kit)
    own = {t: bench.score_dir(args.kit / "patches" / t, [t])[t] for t in TASKS}
    print(f"source patches alone: {', '.join(f'{t} {own[t]:.2f}' for t in TASKS)}", flush=True)
    sources = [adapter_deltas(args.kit / "patches" / t) for t in TASKS]
    results: dict = {"sources": own, "rank": args.rank, "lam": args.lam, "methods": [], "tall": []}
    for method in DELTA_METHODS:
        started = time.perf_counter()
        merged = merge_deltas(sources, method, MergeParams())
        scores, energy = bench.score(merged.deltas, args.rank)
        seconds = time.perf_counter() - started  # merge + SVD + writing + scoring: the scoring dominates
        kept = retention(scores, own)
        results["methods"].append({"method": method, "rank": args.rank, "energy_kept": round(energy, 4),
                                   "merge_and_score_s": round(seconds, 2), "scores": scores, "retention": kept,
                                   "min_retention": least(kept)})
        print(line(method, scores, kept, f"  energy {energy:.3f}"), flush=True)
        row = tall_row(bench, sources, merged.deltas, args.lam, args.rank, own)
        results["tall"].append({"method": method, **row})
        print(line(f"  TALL of {method}", row["scores"], row["retention"],
                   f"  mask density {row['mask_density']}"), flush=True)
    row = distill_row(bench, args.kit, args.rank, own)
    results["methods"].append(row)
    print(line("distill", row["scores"], row["retention"],
               f"  from {row['init']}, {row['steps']} steps, {row['merge_and_score_s']:.0f} s"), flush=True)
    patch_bytes = sum(f.stat().st_size for t in TASKS for f in (args.kit / "patches" / t).iterdir())
    tall_bytes = results["tall"][0]["bytes"]
    results["bytes"] = {"sources": patch_bytes, **tall_bytes, "sources_dense": tall_bytes["merged_delta"] * 3}
    best = max(results["methods"], key=lambda r: r["min_retention"])
    runner_up = sorted(results["methods"], key=lambda r: r["min_retention"])[-2]
    row = fitted_row(bench, sources, args.rank, own)
    results["tall_fitted"] = row
    print(line("TALL fitted", row["scores"], row["retention"],
               f"  relative error {row['relative_error']}  mask density {row['mask_density']}"), flush=True)
    best_tall = max([*results["tall"], row], key=lambda r: r["min_retention"])
    results.update(best=best["method"], best_tall=best_tall["method"])
    print(f"best single adapter: {best['method']} keeps at least {best['min_retention']:.1%} of every task "
          f"({runner_up['method']} next, {runner_up['min_retention']:.0%})")
    print(f"best TALL storage: {best_tall['method']}, each source rebuilt keeps at least "
          f"{best_tall['min_retention']:.0%}")
    b = results["bytes"]
    print(f"store bytes for the three sources: patch files {b['sources']:,}; TALL (merged ΔW {b['merged_delta']:,} "
          f"+ masks {b['masks']:,}) {b['tall']:,}; dense ΔW per source {b['sources_dense']:,}")
    if not args.no_why:
        results["why"] = why(bench, sources, own, args.rank)
    results["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out = REPO / "loadtests" / "results" / "merge.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
