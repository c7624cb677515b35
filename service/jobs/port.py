"""`port` (PortLLM): every alias's active patch carried to a new base unchanged, checked, measured, maybe moved.

Each carried patch is checked against the new base (shapes, modules, rank), registered as a version
with origin `port` and its source as parent, and evaluated against the version it would replace (on
the old base), with the new base alone measured too. With `move`, each alias whose gate passes is
moved to its carried version (compare-and-set); the others stay. With `repair`, each carried patch
that fails its gate is repaired (service/jobs/repair.py) and the repaired version, if it passes, is
the one moved to; a carried patch that passes is never repaired. A retry reuses what an earlier
attempt carried or repaired.
"""

from __future__ import annotations

import json
from pathlib import Path

from adapters_store.errors import StoreError
from adapters_store.jobs import Job
from service.evaluation.scoring import item_score
from service.jobs.carry import carry
from service.jobs.context import JobContext
from service.jobs.evaluate import evaluate_candidate
from service.jobs.repair import repair_alias
from service.jobs.worker import JobRefused, Progress


def port(ctx: JobContext, job: Job, progress: Progress) -> dict:
    """params: base (the new one), move (bool), repair (bool)."""
    target = ctx.registry.get_base(job.params["base"])
    if target is None or not target.path:
        raise JobRefused(f"base {job.params['base']!r} is not registered with a path")
    config = json.loads((Path(target.path) / "config.json").read_text())
    pointers = [p for p in ctx.registry.list_aliases() if p.base != target.name]
    rows = []
    share = 100 / max(1, len(pointers))
    for i, pointer in enumerate(pointers):
        def step(pct: float, stage: str, i=i, alias=pointer.alias) -> None:
            progress(i * share + pct * share / 100, f"{alias}: {stage}")

        rows.append(_port_one(ctx, job, pointer, target, config, bool(job.params.get("move")),
                              bool(job.params.get("repair")), step))
    return {"base": target.name, "aliases": rows}


def _port_one(ctx: JobContext, job: Job, pointer, target, config: dict, move: bool, repair: bool,
              progress: Progress) -> dict:
    row = {"alias": pointer.alias, "from": pointer.ref, "from_base": pointer.base}
    source = ctx.version(pointer.patch, pointer.version)
    try:
        carried = carry(ctx, job, source, target, config)
    except StoreError as exc:
        return {**row, "ported": None, "incompatible": exc.message, "moved": False}
    carry_progress = progress if not repair else (lambda pct, stage: progress(pct * 0.4, stage))
    report, verdict = evaluate_candidate(ctx, pointer.alias, carried.name, carried.version, source.ref,
                                         carry_progress)
    found = ctx.evals.evalset(pointer.alias)
    prompts = [r["prompt"] for r in found[0]] if found else []
    alone, _ = ctx.evaluator.run(target.path, None, prompts, [])
    metric = found[1] if found else "exact_match"
    new_base_alone = (sum(item_score(metric, a, r["reference"]) for a, r in zip(alone, found[0])) / len(alone)
                      if alone else 0.0)
    moved, held = False, None
    if move and verdict["passed"]:  # held: the alias moved meanwhile (its operator decided), or no host
        held = ctx.move(pointer.alias, carried, source.ref, job.actor, f"base upgrade to {target.name}: gate passed",
                        bool(job.params.get("force")))
        moved = held is None
    out = {**row, "ported": carried.ref, "incompatible": None, "moved": moved, "held": held,
           "scores": {f"{pointer.base}+patch": report["score_old"], f"{target.name}": new_base_alone,
                      f"{target.name}+patch": report["score_new"]},
           "nfr": report["nfr"], "pfr": report["pfr"], "gate": verdict}
    if repair and not verdict["passed"]:
        try:
            fixed = repair_alias(ctx, job, pointer.alias, source, carried, target,
                                 lambda pct, stage: progress(40 + pct * 0.6, f"repair: {stage}"), move)
        except JobRefused as exc:  # this alias cannot be repaired (no prompts …); the others still can
            fixed = {"refused": str(exc), "moved": False}
        out["repair"] = fixed
        out["moved"] = fixed["moved"]
        if "score_repaired" in fixed:
            out["scores"][f"{target.name}+repaired"] = fixed["score_repaired"]
    return out
