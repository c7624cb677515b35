"""`evaluate`: a compatibility report of `patch@version` against what the alias serves, and the gate's verdict.

The report (service/evaluation/report.py) compares the candidate with the alias's active version (or
a named one; the base alone when the alias has none yet) on the alias's evaluation set and the probe
set. Idempotent: a retry recomputes the same report.
"""

from __future__ import annotations

from dataclasses import asdict

from adapters_store.jobs import Job
from service.evaluation.gate import gate_for
from service.evaluation.report import compare
from service.jobs.context import JobContext
from service.jobs.worker import Progress


def evaluate(ctx: JobContext, job: Job, progress: Progress) -> dict:
    """params: alias, patch, version[, against 'name@N']."""
    p = job.params
    report, verdict = evaluate_candidate(ctx, p["alias"], p["patch"], int(p["version"]), p.get("against"), progress)
    return {"report": report, "gate": verdict}


def evaluate_candidate(ctx: JobContext, alias: str, patch: str, version: int, against: str | None,
                       progress: Progress) -> tuple[dict, dict]:
    """(report summary, gate verdict) of `patch@version` against `against` (None: the base alone); both saved."""
    candidate = ctx.version(patch, version)
    incumbent = None
    if against and against != candidate.ref:
        name, _, number = against.rpartition("@")
        incumbent = ctx.version(name, int(number))
    found = ctx.evals.evalset(alias)
    rows, metric = found if found else ([], "exact_match")
    probe = ctx.evals.probe()
    prompts = [r["prompt"] for r in rows]
    progress(5, f"evaluating {incumbent.ref if incumbent else 'the base alone'} on {len(rows)} items")
    old_out, old_ppl = ctx.evaluator.run(ctx.base_path(incumbent.base if incumbent else candidate.base),
                                         incumbent, prompts, probe)
    progress(50, f"evaluating {candidate.ref} on {len(rows)} items")
    new_out, new_ppl = ctx.evaluator.run(ctx.base_path(candidate.base), candidate, prompts, probe)
    drift = 1.0
    if incumbent is not None and incumbent.base != candidate.base:
        progress(90, f"measuring {incumbent.base} and {candidate.base} alone on the probe set")
        drift = (ctx.evaluator.run(ctx.base_path(candidate.base), None, [], probe)[1]
                 / ctx.evaluator.run(ctx.base_path(incumbent.base), None, [], probe)[1])
    progress(92, "writing the report")
    report = compare(candidate.ref, incumbent.ref if incumbent else None, candidate.base, metric, rows,
                     old_out, new_out, old_ppl, new_ppl, drift)
    gate = gate_for(ctx.evals, alias)
    reasons = gate.check(report)
    verdict = {"passed": not reasons, "reasons": reasons, "thresholds": asdict(gate),
               "note": None if rows else "the alias has no evaluation set: only the probe perplexity was checked"}
    ctx.evals.save_report(patch, version, report.summary(), report.items, verdict)
    return report.summary(), verdict
