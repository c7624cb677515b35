"""`kv_policy`: a KV-cache policy change, gated like any update: evaluate → gate → apply.

The proposed policy is compared with the one in force, each alias with its own version and evaluation set:
every alias the scope's policy would serve (a base: its aliases without a policy of their own; an alias: that
alias) and the in-context task (`context_alias`, the kit's `recall`), whose long prompts are where a
compressed cache shows. Each gets a compatibility report (scores, NFR/PFR, agreement, probe perplexity under
the policy) and its own gate; the change applies only if every gate passes, as a compare-and-set on the
scope's version evaluated against. Bytes per token are measured on the cache's own tensors.
"""

from __future__ import annotations

from dataclasses import asdict

from adapters_store.errors import StoreError
from adapters_store.jobs import Job
from adapters_store.kv_policies import KVPolicies
from service.evaluation.gate import gate_for
from service.evaluation.report import compare
from service.jobs.context import JobContext
from service.jobs.worker import JobRefused, Progress
from service.kv.policy import KVPolicy, KVPolicyInvalid
from service.kv.vllm_mapping import refusal


def kv_policy(ctx: JobContext, job: Job, progress: Progress) -> dict:
    """params: scope (a base or an alias), policy (dict), reason, context_alias (default: recall)."""
    p = job.params
    scope, reason = p["scope"], p.get("reason") or "gate passed"
    try:
        proposed = KVPolicy.from_dict(p["policy"])
    except (KVPolicyInvalid, TypeError) as exc:
        raise JobRefused(f"KV policy refused: {exc}") from None
    store = KVPolicies(ctx.registry)
    record = store.get(scope)
    in_force = KVPolicy.from_dict(record.policy if record else {})
    base, aliases = _served(ctx, store, scope)
    _check_replicas(ctx, base, proposed, per_alias=scope != base)
    if p.get("context_alias") and p["context_alias"] not in aliases:
        pointer = ctx.registry.get_alias(p["context_alias"])
        if pointer is not None and pointer.base == base:
            aliases.append(p["context_alias"])
    probe = ctx.evals.probe()
    reports, verdicts = {}, {}
    for i, alias in enumerate(aliases):
        progress(5 + 85 * i / max(1, len(aliases)), f"evaluating {alias} under {in_force.describe()} and "
                                                    f"{proposed.describe()}")
        reports[alias], verdicts[alias] = _compare(ctx, alias, in_force, proposed, probe)
    passed = all(v["passed"] for v in verdicts.values())
    summary = {"scope": scope, "from": in_force.as_dict(), "to": proposed.as_dict(),
               "from_label": in_force.describe(), "to_label": proposed.describe(),
               "reports": reports, "gates": verdicts, "passed": passed}
    if not passed:
        failing = "; ".join(f"{a}: {', '.join(v['reasons'])}" for a, v in verdicts.items() if not v["passed"])
        ctx.registry.record("kv_gate_refused", f"kv:{scope}", actor=job.actor, reason=failing,
                            from_ref=in_force.describe(), to_ref=proposed.describe())
        return {**summary, "applied": False}
    progress(95, "applying the policy")
    try:
        applied = store.set(scope, proposed.as_dict(), actor=job.actor, reason=reason,
                            if_version=record.version if record else 0)
    except StoreError as exc:  # changed meanwhile: the verdict no longer applies
        raise JobRefused(exc.message) from None
    return {**summary, "applied": True, "version": applied.version}


def _served(ctx: JobContext, store: KVPolicies, scope: str) -> tuple[str, list[str]]:
    """(the base the scope is served on, the aliases its policy serves)."""
    if ctx.registry.get_base(scope) is not None:
        own = set(store.all())
        return scope, sorted(a for a, ptr in ctx.registry.snapshot().items() if ptr.base == scope and a not in own)
    pointer = ctx.registry.get_alias(scope)
    if pointer is None:
        raise JobRefused(f"no base or alias {scope!r}")
    return pointer.base, [scope]


def _check_replicas(ctx: JobContext, base: str, policy: KVPolicy, per_alias: bool) -> None:
    for replica in ctx.replicas.hosting(base):
        if replica.kv and (why := refusal(policy, replica.kv.get("capabilities", {}), per_alias)):
            raise JobRefused(f"replica {replica.id} ({replica.engine}) cannot apply this policy: {why}")


def _compare(ctx: JobContext, alias: str, old: KVPolicy, new: KVPolicy, probe: list[str]) -> tuple[dict, dict]:
    pointer = ctx.registry.get_alias(alias)
    version = ctx.version(pointer.patch, pointer.version)
    found = ctx.evals.evalset(alias)
    rows, metric = found if found else ([], "exact_match")
    prompts = [r["prompt"] for r in rows]
    path = ctx.base_path(version.base)
    old_out, old_ppl = ctx.evaluator.run(path, version, prompts, probe, kv_policy=old)
    new_out, new_ppl = ctx.evaluator.run(path, version, prompts, probe, kv_policy=new)
    report = compare(f"kv:{new.describe()}", f"kv:{old.describe()}", version.base, metric, rows, old_out, new_out,
                     old_ppl, new_ppl)
    summary = report.summary()
    if prompts:
        summary["bytes_per_token_old"] = round(ctx.evaluator.kv_bytes_per_token(path, version, prompts, old), 1)
        summary["bytes_per_token_new"] = round(ctx.evaluator.kv_bytes_per_token(path, version, prompts, new), 1)
    gate = gate_for(ctx.evals, alias)
    reasons = gate.check(report)
    verdict = {"passed": not reasons, "reasons": reasons, "thresholds": asdict(gate),
               "note": None if rows else "the alias has no evaluation set: only the probe perplexity was checked"}
    return summary, verdict
