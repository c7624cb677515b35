"""The worker's jobs for updates: evaluate a candidate; gated activation; extraction from a fine-tune.

`evaluate` writes a compatibility report (service/compat.py) of `patch@version` against the alias's
active version (or a named one; the base alone when the alias has none yet), on the alias's
evaluation set and the probe set, and the gate's verdict on it. `activate` is evaluate → gate →
move: the alias moves only if the gate passes, with a compare-and-set on the version evaluated
against, so a move made meanwhile is never overwritten by a stale verdict. Both are idempotent: a
retry recomputes the same report, and an alias already at the target is a success.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, fields
from pathlib import Path

from adapters_store.blobs import BlobStore, materialize
from adapters_store.evaluation import EvaluationStore
from adapters_store.jobs import Job
from adapters_store.registry import PatchVersion, Registry, RegistryError
from adapters_store.validation import Limits, ValidationError, validate_upload
from service.compat import Gate, compare, item_score
from service.evaluator import Evaluator
from service.extract import extract_lora
from service.worker import JobRefused, Progress


def gate_for(evals: EvaluationStore, alias: str) -> Gate:
    """The alias's gate: its stored thresholds over the defaults."""
    known = {f.name for f in fields(Gate)}
    return Gate(**{k: v for k, v in (evals.gate(alias) or {}).items() if k in known})


class UpdateJobs:
    """Handlers for the `evaluate`, `activate` and `extract` job types."""

    def __init__(self, registry: Registry, evals: EvaluationStore, evaluator: Evaluator, blobs: BlobStore,
                 limits: Limits, work_dir: Path):
        self.registry, self.evals, self.evaluator = registry, evals, evaluator
        self.blobs, self.limits, self.work_dir = blobs, limits, Path(work_dir)

    def handlers(self) -> dict:
        return {"evaluate": self.evaluate, "activate": self.activate, "extract": self.extract, "port": self.port}

    def extract(self, job: Job, progress: Progress) -> dict:
        """params: name, base, checkpoint (a directory), rank, reason. Registers the extracted patch as a version."""
        p = job.params
        for record in self.registry.list_versions(p["name"]):  # a retry after the version was made: that one
            if record.meta.get("job_id") == job.id:
                return {"version": record.version, **{k: record.meta[k] for k in ("rank", "energy_kept")}}
        base = self.registry.get_base(p["base"])
        if base is None or not base.path:
            raise JobRefused(f"base {p['base']!r} has no local path")
        out = self.work_dir / f"extract-{job.id}"
        shutil.rmtree(out, ignore_errors=True)
        try:
            try:
                found = extract_lora(Path(base.path), Path(p["checkpoint"]), int(p["rank"]), out,
                                     lambda pct, stage: progress(pct * 0.9, stage))
            except (ValueError, OSError) as exc:
                raise JobRefused(f"cannot extract a patch: {exc}") from None
            files = {f.name: f for f in out.iterdir()}
            base_config = json.loads((Path(base.path) / "config.json").read_text())
            try:
                summary = validate_upload(p["name"], files, base_config, self.limits)
            except ValidationError as exc:
                raise JobRefused(f"the extracted patch is refused: {exc.message}") from None
            progress(92, "storing the patch")
            digests = {}
            for name, path in files.items():
                with path.open("rb") as f:
                    digests[name] = self.blobs.put_file(f)
            meta = {"job_id": job.id, "rank": found.rank, "energy_kept": round(found.energy_kept, 6),
                    "modules": len(found.modules), "not_carried": found.not_carried,
                    "checkpoint": str(p["checkpoint"]), **asdict(summary)}
            record = self.registry.create_version(p["name"], base.name, digests, meta, origin="extract",
                                                  actor=job.actor, reason=p.get("reason") or "extracted")
        finally:
            shutil.rmtree(out, ignore_errors=True)
        return {"version": record.version, "rank": found.rank, "energy_kept": found.energy_kept,
                "modules": len(found.modules), "not_carried": found.not_carried}

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

    def port(self, job: Job, progress: Progress) -> dict:
        """params: base (the new one), move (bool). PortLLM: carry every alias's active patch to `base` unchanged.

        Each carried patch is checked against the new base (shapes, modules, rank), registered as a
        version with origin `port` and its source as parent, and evaluated against the version it
        would replace (on the old base), with the new base alone measured too. With `move`, each alias
        whose gate passes is moved to its carried version (compare-and-set); the others stay.
        """
        target = self.registry.get_base(job.params["base"])
        if target is None or not target.path:
            raise JobRefused(f"base {job.params['base']!r} is not registered with a path")
        config = json.loads((Path(target.path) / "config.json").read_text())
        pointers = [p for p in self.registry.list_aliases() if p.base != target.name]
        rows = []
        for i, pointer in enumerate(pointers):
            share = 100 / max(1, len(pointers))

            def step(pct: float, stage: str, i=i, alias=pointer.alias) -> None:
                progress(i * share + pct * share / 100, f"{alias}: {stage}")

            rows.append(self._port_one(job, pointer, target, config, bool(job.params.get("move")), step))
        return {"base": target.name, "aliases": rows}

    def _port_one(self, job: Job, pointer, target, config: dict, move: bool, progress: Progress) -> dict:
        row = {"alias": pointer.alias, "from": pointer.ref, "from_base": pointer.base}
        source = self._version((pointer.patch, pointer.version))
        carried = next((v for v in self.registry.list_versions(source.name)
                        if v.meta.get("job_id") == job.id and v.meta.get("ported_from") == source.ref), None)
        if carried is None:  # not carried by an earlier attempt of this job
            check_dir = self.work_dir / f"port-{job.id}-{source.ref}"
            try:
                out = materialize(self.blobs, source.files, check_dir)
                validate_upload(source.name, {f.name: f for f in out.iterdir()}, config, self.limits)
            except ValidationError as exc:
                return {**row, "ported": None, "incompatible": exc.message, "moved": False}
            finally:
                shutil.rmtree(check_dir, ignore_errors=True)
            carried = self.registry.create_version(
                source.name, target.name, dict(source.files), {**source.meta, "job_id": job.id,
                                                               "ported_from": source.ref},
                origin="port", parents=[source.ref], actor=job.actor, reason=f"carried to {target.name} unchanged")
        report, verdict = self._evaluate(pointer.alias, carried.name, carried.version, source.ref, progress)
        found = self.evals.evalset(pointer.alias)
        prompts = [r["prompt"] for r in found[0]] if found else []
        alone, _ = self.evaluator.run(target.path, None, prompts, [])
        metric = found[1] if found else "exact_match"
        new_base_alone = (sum(item_score(metric, a, r["reference"]) for a, r in zip(alone, found[0])) / len(alone)
                          if alone else 0.0)
        moved = False
        if move and verdict["passed"]:
            try:
                self.registry.activate(pointer.alias, carried.name, carried.version, actor=job.actor,
                                       reason=f"base upgrade to {target.name}: gate passed", if_current=source.ref)
                moved = True
            except RegistryError:
                moved = False  # the alias moved meanwhile: its operator decided
        return {**row, "ported": carried.ref, "incompatible": None, "moved": moved,
                "scores": {f"{pointer.base}+patch": report["score_old"], f"{target.name}": new_base_alone,
                           f"{target.name}+patch": report["score_new"]},
                "nfr": report["nfr"], "pfr": report["pfr"], "gate": verdict}

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
