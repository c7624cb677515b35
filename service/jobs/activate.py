"""`activate`: evaluate → gate → move. The alias moves only if the gate passes.

The move is a compare-and-set on the version evaluated against, so a move made meanwhile is never
overwritten by a stale verdict. Idempotent: an alias already at the target is a success.
"""

from __future__ import annotations

from adapters_store.jobs import Job
from service.jobs.context import JobContext
from service.jobs.evaluate import evaluate_candidate
from service.jobs.worker import JobRefused, Progress


def activate(ctx: JobContext, job: Job, progress: Progress) -> dict:
    """params: alias, patch, version, reason."""
    p = job.params
    alias, patch, version = p["alias"], p["patch"], int(p["version"])
    target = f"{patch}@{version}"
    current = ctx.registry.get_alias(alias)
    if current is not None and current.ref == target:  # done by an earlier attempt, or by someone else
        return {"activated": True, "alias": alias, "to": target, "note": "the alias already points there"}
    against = current.ref if current else None
    report, verdict = evaluate_candidate(ctx, alias, patch, version, against, progress)
    if not verdict["passed"]:
        ctx.registry.record("gate_refused", alias, actor=job.actor, reason="; ".join(verdict["reasons"]),
                            from_ref=against or "", to_ref=target)
        return {"activated": False, "alias": alias, "to": target, "report": report, "gate": verdict}
    progress(97, "moving the alias")
    # Refused if it moved meanwhile (the verdict no longer applies) or its base has no live replica.
    if (why_not := ctx.move(alias, ctx.version(patch, version), against or "", job.actor,
                            p.get("reason") or "gate passed")) is not None:
        raise JobRefused(why_not)
    return {"activated": True, "alias": alias, "from": against, "to": target, "report": report, "gate": verdict}
