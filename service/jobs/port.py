"""`port` (PortLLM): every alias's active patch carried to a new base unchanged, checked, measured, maybe moved.

Each carried patch is checked against the new base (shapes, modules, rank), registered as a version
with origin `port` and its source as parent, and evaluated against the version it would replace (on
the old base), with the new base alone measured too. With `move`, each alias whose gate passes is
moved to its carried version (compare-and-set); the others stay. A retry reuses what an earlier
attempt of the same job carried.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from adapters_store.blobs import materialize
from adapters_store.errors import StoreError
from adapters_store.jobs import Job
from adapters_store.validation import validate_upload
from service.evaluation.scoring import item_score
from service.jobs.context import JobContext
from service.jobs.evaluate import evaluate_candidate
from service.jobs.worker import JobRefused, Progress


def port(ctx: JobContext, job: Job, progress: Progress) -> dict:
    """params: base (the new one), move (bool)."""
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

        rows.append(_port_one(ctx, job, pointer, target, config, bool(job.params.get("move")), step))
    return {"base": target.name, "aliases": rows}


def _port_one(ctx: JobContext, job: Job, pointer, target, config: dict, move: bool, progress: Progress) -> dict:
    row = {"alias": pointer.alias, "from": pointer.ref, "from_base": pointer.base}
    source = ctx.version(pointer.patch, pointer.version)
    carried = next((v for v in ctx.registry.list_versions(source.name)
                    if v.meta.get("job_id") == job.id and v.meta.get("ported_from") == source.ref), None)
    if carried is None:  # not carried by an earlier attempt of this job
        check_dir = ctx.work_dir / f"port-{job.id}-{source.ref}"
        try:
            out = materialize(ctx.blobs, source.files, check_dir)
            validate_upload(source.name, {f.name: f for f in out.iterdir()}, config, ctx.limits)
        except StoreError as exc:
            return {**row, "ported": None, "incompatible": exc.message, "moved": False}
        finally:
            shutil.rmtree(check_dir, ignore_errors=True)
        carried = ctx.registry.create_version(
            source.name, target.name, dict(source.files), {**source.meta, "job_id": job.id,
                                                           "ported_from": source.ref},
            origin="port", parents=[source.ref], actor=job.actor, reason=f"carried to {target.name} unchanged")
    report, verdict = evaluate_candidate(ctx, pointer.alias, carried.name, carried.version, source.ref, progress)
    found = ctx.evals.evalset(pointer.alias)
    prompts = [r["prompt"] for r in found[0]] if found else []
    alone, _ = ctx.evaluator.run(target.path, None, prompts, [])
    metric = found[1] if found else "exact_match"
    new_base_alone = (sum(item_score(metric, a, r["reference"]) for a, r in zip(alone, found[0])) / len(alone)
                      if alone else 0.0)
    moved = False
    if move and verdict["passed"]:
        try:
            ctx.registry.activate(pointer.alias, carried.name, carried.version, actor=job.actor,
                                   reason=f"base upgrade to {target.name}: gate passed", if_current=source.ref)
            moved = True
        except StoreError:
            moved = False  # the alias moved meanwhile: its operator decided
    return {**row, "ported": carried.ref, "incompatible": None, "moved": moved,
            "scores": {f"{pointer.base}+patch": report["score_old"], f"{target.name}": new_base_alone,
                       f"{target.name}+patch": report["score_new"]},
            "nfr": report["nfr"], "pfr": report["pfr"], "gate": verdict}
