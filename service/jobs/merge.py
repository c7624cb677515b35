"""`merge`: several patch versions of one base folded into one new version, with a retention report.

The sources' ΔWs are merged layer by layer (service/lora/merge.py) and written back as one adapter at
`rank`; the result is validated like an upload and registered as a version of `name` (origin `merge`,
every source a parent, method and parameters in its meta). Then each source is measured against the
merge on the evaluation set of the alias named like the source's patch: its score, the merge's score,
their ratio (retention), NFR/PFR and the probe perplexity ratio. A retry finds the version an earlier
attempt registered and measures again.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from adapters_store.blobs import materialize, put_files
from adapters_store.errors import StoreError
from adapters_store.jobs import Job
from adapters_store.registry import PatchVersion
from adapters_store.validation import validate_upload
from service.evaluation.report import compare
from service.jobs.context import JobContext
from service.jobs.worker import JobRefused, Progress
from service.lora.factors import adapter_deltas, write_adapter
from service.lora.merge import MergeParams, merge_deltas


def merge(ctx: JobContext, job: Job, progress: Progress) -> dict:
    """params: sources ['name@N', …], method, params {…}, rank, name, reason."""
    p = job.params
    sources = [ctx.version(*_ref(ref)) for ref in p["sources"]]
    if len({s.base for s in sources}) != 1:
        raise JobRefused(f"the sources are built on different bases: {sorted({s.base for s in sources})}")
    base_path = ctx.base_path(sources[0].base)
    record = next((v for v in ctx.registry.list_versions(p["name"]) if v.meta.get("job_id") == job.id), None)
    if record is None:
        record = _merge_and_register(ctx, job, sources, base_path, progress)
    progress(60, "measuring retention")
    rows = []
    for i, source in enumerate(sources):
        rows.append(_retention(ctx, source, record, base_path))
        progress(60 + 40 * (i + 1) / len(sources), f"retention of {source.ref}")
    measured = [r["retention"] for r in rows if r["retention"] is not None]
    return {"version": record.version, "ref": record.ref, "method": p["method"], "rank": record.meta["rank"],
            "energy_kept": record.meta["energy_kept"], "retention": rows,
            "min_retention": min(measured) if measured else None}


def _ref(ref: str) -> tuple[str, int]:
    name, _, number = ref.rpartition("@")
    return name, int(number)


def _merge_and_register(ctx: JobContext, job: Job, sources: list[PatchVersion], base_path: str,
                        progress: Progress) -> PatchVersion:
    p = job.params
    work = ctx.work_dir / f"merge-{job.id}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        deltas = []
        for i, source in enumerate(sources):
            deltas.append(adapter_deltas(materialize(ctx.blobs, source.files, work / f"source-{i}")))
        progress(10, "sources read")
        params = MergeParams(**p.get("params", {}))
        try:
            merged = merge_deltas(deltas, p["method"], params, lambda pct, stage: progress(10 + pct * 0.3, stage))
        except ValueError as exc:
            raise JobRefused(f"cannot merge: {exc}") from None
        progress(40, f"writing the merged patch at rank {p['rank']}")
        out = work / "merged"
        found = write_adapter(Path(base_path), merged.deltas, int(p["rank"]), out)
        files = {f.name: f for f in out.iterdir()}
        base_config = json.loads((Path(base_path) / "config.json").read_text())
        try:
            summary = validate_upload(p["name"], files, base_config, ctx.limits)
        except StoreError as exc:
            raise JobRefused(f"the merged patch is refused: {exc.message}") from None
        progress(50, "storing the merged patch")
        meta = {"job_id": job.id, "method": p["method"], "params": asdict(params), "rank": int(p["rank"]),
                "energy_kept": round(found.energy_kept, 6), "sources": [s.ref for s in sources], **asdict(summary)}
        if merged.kept_by_consensus:
            meta["consensus_kept"] = round(sum(merged.kept_by_consensus.values()) / len(merged.kept_by_consensus), 6)
        return ctx.registry.create_version(p["name"], sources[0].base, put_files(ctx.blobs, files), meta,
                                           origin="merge", parents=[s.ref for s in sources], actor=job.actor,
                                           reason=p.get("reason") or f"{p['method']} merge")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _retention(ctx: JobContext, source: PatchVersion, merged: PatchVersion, base_path: str) -> dict:
    """The source and the merge on the evaluation set of the alias named like the source's patch."""
    found = ctx.evals.evalset(source.name)
    if found is None:
        return {"source": source.ref, "alias": None, "retention": None,
                "note": f"no alias {source.name!r} with an evaluation set: retention not measured"}
    rows, metric = found
    prompts = [r["prompt"] for r in rows]
    probe = ctx.evals.probe()
    old, old_ppl = ctx.evaluator.run(base_path, source, prompts, probe)
    new, new_ppl = ctx.evaluator.run(base_path, merged, prompts, probe)
    report = compare(merged.ref, source.ref, merged.base, metric, rows, old, new, old_ppl, new_ppl).summary()
    return {"source": source.ref, "alias": source.name, "metric": metric, "n": report["n"],
            "score_source": report["score_old"], "score_merged": report["score_new"],
            "retention": report["score_new"] / report["score_old"] if report["score_old"] else None,
            "nfr": report["nfr"], "pfr": report["pfr"], "perplexity_ratio": report["perplexity_ratio"]}
