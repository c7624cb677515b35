"""`repair`: an alias's patch made to work on a new base by distillation from the version it replaces.

The alias's current version (on its base) is the teacher's patch; its carried copy on the new base
(PortLLM, reused if carried before) is where the student starts. The student is trained on the
alias's distillation prompts (service/lora/distill.py: MUSCLE's masked KL toward the old version
where the carried patch answers otherwise) — never on its evaluation set: the job is refused if the
two overlap. The result is registered as a new version of the patch on the new base (origin
`repair`, parents: the carried version and the old one), evaluated against the old version like any
candidate, gated, and the alias is moved only if it passes (compare-and-set on the old version). A
retry reuses the version an earlier attempt of the job registered.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from transformers import AutoTokenizer

from adapters_store.blobs import materialize, put_files
from adapters_store.errors import StoreError
from adapters_store.jobs import Job
from adapters_store.registry import BaseRecord, PatchVersion
from adapters_store.validation import validate_upload
from service.evaluation.generation import greedy_generate
from service.jobs.carry import carry
from service.jobs.context import JobContext
from service.jobs.evaluate import evaluate_candidate
from service.jobs.worker import JobRefused, Progress
from service.lora.distill import DistillParams, distil, load_patched, save_adapter


def repair(ctx: JobContext, job: Job, progress: Progress) -> dict:
    """params: alias, base (the new one), reason."""
    p = job.params
    pointer = ctx.registry.get_alias(p["alias"])
    if pointer is None:
        raise JobRefused(f"no alias {p['alias']!r}")
    target = ctx.registry.get_base(p["base"])
    if target is None or not target.path:
        raise JobRefused(f"base {p['base']!r} is not registered with a path")
    if pointer.base == target.name:
        raise JobRefused(f"{pointer.alias!r} already serves {pointer.ref} on {target.name}; a repair starts from "
                         f"the version on the base it replaces")
    source = ctx.version(pointer.patch, pointer.version)
    ctx.distillation_prompts(pointer.alias)  # refused before anything is registered
    config = json.loads((Path(target.path) / "config.json").read_text())
    try:
        carried = carry(ctx, job, source, target, config)
    except StoreError as exc:
        raise JobRefused(f"{source.ref} cannot be carried to {target.name}: {exc.message}") from None
    return repair_alias(ctx, job, pointer.alias, source, carried, target, progress, move=True)


def repair_alias(ctx: JobContext, job: Job, alias: str, source: PatchVersion, carried: PatchVersion,
                 target: BaseRecord, progress: Progress, move: bool) -> dict:
    """Distil, register, evaluate against `source`, gate, and (with `move`) move `alias`; the row of the report."""
    started = time.monotonic()
    prompts = ctx.distillation_prompts(alias)
    repaired = next((v for v in ctx.registry.list_versions(source.name)
                     if v.meta.get("job_id") == job.id and v.meta.get("repaired_from") == carried.ref), None)
    if repaired is None:
        repaired = _distil_and_register(ctx, job, source, carried, target, prompts, progress)
    report, verdict = evaluate_candidate(ctx, alias, repaired.name, repaired.version, source.ref,
                                         lambda pct, stage: progress(75 + pct / 4, stage))
    moved, held = False, None
    if move and verdict["passed"]:  # held: the alias moved meanwhile (its operator decided), or no host
        held = ctx.move(alias, repaired, source.ref, job.actor,
                        job.params.get("reason") or f"repaired for {target.name}: gate passed",
                        bool(job.params.get("force")))
        moved = held is None
    return {"alias": alias, "from": source.ref, "carried": carried.ref, "repaired": repaired.ref,
            "distillation": repaired.meta.get("distillation"), "score_old": report["score_old"],
            "score_repaired": report["score_new"], "nfr": report["nfr"], "pfr": report["pfr"],
            "perplexity_ratio": report["perplexity_ratio"], "gate": verdict, "moved": moved, "held": held,
            "seconds": round(time.monotonic() - started, 1)}


def _distil_and_register(ctx: JobContext, job: Job, source: PatchVersion, carried: PatchVersion,
                         target: BaseRecord, prompts: list[str], progress: Progress) -> PatchVersion:
    work = ctx.work_dir / f"repair-{job.id}-{carried.ref}"
    shutil.rmtree(work, ignore_errors=True)
    old_base, new_base = ctx.base_path(source.base), target.path
    try:
        tok = AutoTokenizer.from_pretrained(new_base)
        if AutoTokenizer.from_pretrained(old_base).get_vocab() != tok.get_vocab():
            raise JobRefused(f"{source.base} and {target.name} have different vocabularies: "
                             f"distillation compares their next-token distributions")
        progress(2, f"the teacher ({source.ref} on {source.base}) answers {len(prompts)} distillation prompts")
        teacher = load_patched(old_base, materialize(ctx.blobs, source.files, work / "old"))
        answers = greedy_generate(teacher, tok, prompts, ctx.evaluator.max_new_tokens)
        student = load_patched(new_base, materialize(ctx.blobs, carried.files, work / "carried"), trainable=True)
        params = DistillParams(**job.params.get("distill", {}))

        def step(i: int, steps: int, loss: float) -> None:
            if i % 10 == 0 or i == steps - 1:
                progress(10 + 60 * (i + 1) / steps, f"distilling on {target.name}: step {i + 1}/{steps}, "
                                                    f"loss {loss:.3f}")

        result = distil(teacher, student, [(tok(p)["input_ids"], a) for p, a in zip(prompts, answers)],
                        tok.pad_token_id, params, step)
        files = save_adapter(student, work / "repaired")
        base_config = json.loads((Path(new_base) / "config.json").read_text())
        try:
            summary = validate_upload(source.name, files, base_config, ctx.limits)
        except StoreError as exc:
            raise JobRefused(f"the repaired patch is refused: {exc.message}") from None
        progress(72, "storing the repaired patch")
        meta = {"job_id": job.id, "repaired_from": carried.ref, "replaces": source.ref,
                "distillation": {**asdict(params), **{k: round(v, 4) if isinstance(v, float) else v
                                                      for k, v in asdict(result).items()}},
                **asdict(summary)}
        return ctx.registry.create_version(source.name, target.name, put_files(ctx.blobs, files), meta,
                                           origin="repair", parents=[carried.ref, source.ref], actor=job.actor,
                                           reason=f"repaired for {target.name} by distillation from {source.ref}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
