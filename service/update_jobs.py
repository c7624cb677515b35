"""The worker's jobs for updates: evaluate a candidate against what it would replace; gated activation.

`evaluate` writes a compatibility report (service/compat.py) of `patch@version` against the alias's
active version (or a named one; the base alone when the alias has none yet), on the alias's
evaluation set and the probe set, and the gate's verdict on it. `activate` is evaluate → gate →
move: the alias moves only if the gate passes, with a compare-and-set on the version evaluated
against, so a move made meanwhile is never overwritten by a stale verdict. Both are idempotent: a
retry recomputes the same report, and an alias already at the target is a success.
"""

from __future__ import annotations

from dataclasses import asdict, fields

from adapters_store.evaluation import EvaluationStore
from adapters_store.jobs import Job
from adapters_store.registry import PatchVersion, Registry, RegistryError
from service.compat import Gate, compare
from service.evaluator import Evaluator
from service.worker import JobRefused, Progress


def gate_for(evals: EvaluationStore, alias: str) -> Gate:
    """The alias's gate: its stored thresholds over the defaults."""
    known = {f.name for f in fields(Gate)}
    return Gate(**{k: v for k, v in (evals.gate(alias) or {}).items() if k in known})


class UpdateJobs:
    """Handlers for the `evaluate` and `activate` job types."""

    def __init__(self, registry: Registry, evals: EvaluationStore, evaluator: Evaluator):
        self.registry, self.evals, self.evaluator = registry, evals, evaluator

    def handlers(self) -> dict:
        return {"evaluate": self.evaluate, "activate": self.activate}

    def evaluate(self, job: Job, progress: Progress) -> dict:
        """params: alias, patch, version[, against 'name@N']."""
        p = job.params
        report, verdict = self._evaluate(p["alias"], p["patch"], int(p["version"]), p.get("against"), progress)
        return {"report": report, "gate": verdict}

    def activate(self, job: Job, progress: Progress) -> dict:
        """params: alias, patch, version, reason. Moves the alias only if the gate passes."""
        p = job.params
        alias, patch, version = p["alias"], p["patch"], int(p["version"])
        target = f"{patch}@{version}"
        current = self.registry.get_alias(alias)
        if current is not None and current.ref == target:  # done by an earlier attempt, or by someone else
            return {"activated": True, "alias": alias, "to": target, "note": "the alias already points there"}
        against = current.ref if current else None
        report, verdict = self._evaluate(alias, patch, version, against, progress)
        if not verdict["passed"]:
            self.registry.record("gate_refused", alias, actor=job.actor, reason="; ".join(verdict["reasons"]),
                                 from_ref=against or "", to_ref=target)
            return {"activated": False, "alias": alias, "to": target, "report": report, "gate": verdict}
        progress(97, "moving the alias")
        try:
            self.registry.activate(alias, patch, version, actor=job.actor,
                                   reason=p.get("reason") or "gate passed", if_current=against or "")
        except RegistryError as exc:
            raise JobRefused(exc.message) from None  # it moved meanwhile: the verdict no longer applies
        return {"activated": True, "alias": alias, "from": against, "to": target, "report": report, "gate": verdict}

    # -- the report ------------------------------------------------------------------------------------
    def _version(self, ref_or_pair) -> PatchVersion:
        patch, version = ref_or_pair
        record = self.registry.get_version(patch, version)
        if record is None:
            raise JobRefused(f"no version {patch}@{version}")
        return record

    def _base_path(self, base: str) -> str:
        record = self.registry.get_base(base)
        if record is None or not record.path:
            raise JobRefused(f"base {base!r} has no local path to evaluate on")
        return record.path

    def _evaluate(self, alias: str, patch: str, version: int, against: str | None, progress: Progress):
        candidate = self._version((patch, version))
        incumbent = None
        if against and against != candidate.ref:
            name, _, number = against.rpartition("@")
            incumbent = self._version((name, int(number)))
        found = self.evals.evalset(alias)
        rows, metric = found if found else ([], "exact_match")
        probe = self.evals.probe()
        prompts = [r["prompt"] for r in rows]
        progress(5, f"evaluating {incumbent.ref if incumbent else 'the base alone'} on {len(rows)} items")
        old_out, old_ppl = self.evaluator.run(self._base_path(incumbent.base if incumbent else candidate.base),
                                              incumbent, prompts, probe)
        progress(50, f"evaluating {candidate.ref} on {len(rows)} items")
        new_out, new_ppl = self.evaluator.run(self._base_path(candidate.base), candidate, prompts, probe)
        progress(92, "writing the report")
        report = compare(candidate.ref, incumbent.ref if incumbent else None, candidate.base, metric, rows,
                         old_out, new_out, old_ppl, new_ppl)
        gate = gate_for(self.evals, alias)
        reasons = gate.check(report)
        verdict = {"passed": not reasons, "reasons": reasons, "thresholds": asdict(gate),
                   "note": None if rows else "the alias has no evaluation set: only the probe perplexity was checked"}
        self.evals.save_report(patch, version, report.summary(), report.items, verdict)
        return report.summary(), verdict
