"""`merge`: several patch versions of one base folded into one new version, with a retention report.

The sources' ΔWs are merged layer by layer (service/lora/merge.py) and written back as one adapter at
`rank` — or, with method `distill`, one adapter at `rank` is trained to answer each source alias's
distillation prompts as that source does (service/lora/merge_by_distillation.py; refused if a source's
alias has no such prompts or they overlap its evaluation set); the result is validated like an upload
and registered as a version of `name` (origin `merge`, every source a parent, method and parameters in
its meta). Then each source is measured against the
merge on the evaluation set of the alias named like the source's patch: its score, the merge's score,
their ratio (retention), NFR/PFR and the probe perplexity ratio. A retry finds the version an earlier
attempt registered and measures again.

With `tall`, the sources are also kept as TALL-compressed storage (service/lora/tall.py): one shared ΔW
and one bit-mask per source, each a content-addressed blob — by default fitted to rebuild every source
(`tall_store` "fitted"), or the paper's λ-masks over the merge's ΔW before truncation ("masks") — and each
source is rebuilt from them — read back from the blob store, m_t ⊙ shared, written at `rank` — and registered as
the next version of that source's own patch (origin `merge`, every source a parent, the blobs named in
its meta). Why versions of the sources' patches and ordinary adapters: an alias moves to its own
rebuilt patch through the usual gate (against the version it serves) and rolls back to it, and every
engine loads it unchanged; one merged adapter for every task is the other half of the report.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from adapters_store.blobs import materialize, put_files
from adapters_store.errors import StoreError
from adapters_store.jobs import Job
from adapters_store.registry import PatchVersion
from adapters_store.validation import validate_upload
from service.evaluation.generation import greedy_generate
from service.evaluation.report import compare
from service.jobs.context import JobContext
from service.jobs.worker import JobRefused, Progress
from service.lora.factors import adapter_deltas, write_adapter
from service.lora.merge import MergeParams, merge_deltas
from service.lora.merge_by_distillation import DistillSource, distil_merge
from service.lora.tall import (
    fitted_storage,
    mask_bytes,
    merged_bytes,
    read_mask,
    read_merged,
    reconstruct,
    tall_masks,
)


def merge(ctx: JobContext, job: Job, progress: Progress) -> dict:
    """params: sources ['name@N', …], method, params {…}, rank, name, tall, reason."""
    p = job.params
    sources = [ctx.version(*_ref(ref)) for ref in p["sources"]]
    if len({s.base for s in sources}) != 1:
        raise JobRefused(f"the sources are built on different bases: {sorted({s.base for s in sources})}")
    base_path = ctx.base_path(sources[0].base)
    started = time.monotonic()
    record = _made_by(ctx, p["name"], job)
    if record is None:
        record = _merge_and_register(ctx, job, sources, base_path, progress)
    rebuilt = _tall_versions(ctx, job, sources, record, base_path, progress) if p.get("tall") else []
    merged_at = time.monotonic()
    progress(60, "measuring retention")
    rows, tall_rows = [], []
    for i, source in enumerate(sources):
        found = _retention(ctx, source, [record, *rebuilt[i:i + 1]], base_path)
        rows.append(found[0])
        tall_rows += found[1:]
        progress(60 + 40 * (i + 1) / len(sources), f"retention of {source.ref}")
    result = {"version": record.version, "ref": record.ref, "method": p["method"], "rank": record.meta["rank"],
              "energy_kept": record.meta["energy_kept"], "retention": rows, "min_retention": _least(rows),
              # this attempt's time: merging (and rebuilding) vs evaluating, which dominates on a CPU
              "seconds": {"merge": round(merged_at - started, 1), "retention": round(time.monotonic() - merged_at, 1)}}
    if "distillation" in record.meta:
        result["distillation"] = record.meta["distillation"]
    if rebuilt:
        result["tall"] = {"versions": [v.ref for v in rebuilt], "retention": tall_rows,
                          "min_retention": _least(tall_rows), "lam": rebuilt[0].meta["tall"]["lam"],
                          "store": record.meta["tall"].get("store", "masks"),
                          "bytes": record.meta["tall"]["bytes"]}
    return result


def _least(rows: list[dict]) -> float | None:
    measured = [r["retention"] for r in rows if r["retention"] is not None]
    return min(measured) if measured else None


def _made_by(ctx: JobContext, patch: str, job: Job, source: str | None = None) -> PatchVersion | None:
    """The version of `patch` an earlier attempt of this job registered, if any: the merge itself, or
    (`source`) that source rebuilt from TALL storage — a source's patch may also be the merge's name."""
    return next((v for v in ctx.registry.list_versions(patch)
                 if v.meta.get("job_id") == job.id and v.meta.get("tall", {}).get("source") == source), None)


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
        params = MergeParams(**{k: tuple(v) if k == "weights" else v for k, v in p.get("params", {}).items()})
        meta: dict = {}
        if p["method"] == "distill":
            files, merged_deltas, meta["distillation"] = _distil(ctx, sources, work, params, int(p["rank"]),
                                                                 base_path, progress)
            energy = None  # trained, not a truncation of a merged ΔW
        else:
            try:
                merged = merge_deltas(deltas, p["method"], params,
                                      lambda pct, stage: progress(10 + pct * 0.25, stage))
            except ValueError as exc:
                raise JobRefused(f"cannot merge: {exc}") from None
            merged_deltas = merged.deltas
            if merged.kept_by_consensus:
                kept = merged.kept_by_consensus
                meta["consensus_kept"] = round(sum(kept.values()) / len(kept), 6)
            progress(40, f"writing the merged patch at rank {p['rank']}")
            out = work / "merged"
            energy = round(write_adapter(Path(base_path), merged_deltas, int(p["rank"]), out).energy_kept, 6)
            files = {f.name: f for f in out.iterdir()}
        # With distill, TALL's masks ("masks" store) are taken over the distilled adapter's ΔW.
        tall = (_store_tall(ctx, sources, deltas, merged_deltas, params.lam, p.get("tall_store", "masks"), work)
                if p.get("tall") else None)
        base_config = json.loads((Path(base_path) / "config.json").read_text())
        try:
            summary = validate_upload(p["name"], files, base_config, ctx.limits)
        except StoreError as exc:
            raise JobRefused(f"the merged patch is refused: {exc.message}") from None
        progress(50, "storing the merged patch")
        meta = {"job_id": job.id, "method": p["method"], "params": asdict(params), "rank": int(p["rank"]),
                "energy_kept": energy, "sources": [s.ref for s in sources], **asdict(summary), **meta}
        if tall is not None:
            meta["tall"] = tall
        return ctx.registry.create_version(p["name"], sources[0].base, put_files(ctx.blobs, files), meta,
                                           origin="merge", parents=[s.ref for s in sources], actor=job.actor,
                                           reason=p.get("reason") or f"{p['method']} merge")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _distil(ctx: JobContext, sources: list[PatchVersion], work: Path, params: MergeParams, rank: int,
            base_path: str, progress: Progress) -> tuple[dict[str, Path], dict, dict]:
    """The sources merged by distillation on their aliases' prompts: (files, the adapter's ΔWs, what it did)."""
    found = [DistillSource(s.ref, work / f"source-{i}", ctx.distillation_prompts(s.name))
             for i, s in enumerate(sources)]
    try:
        made = distil_merge(Path(base_path), found, rank, params, work,
                            lambda model, tok, prompts: greedy_generate(model, tok, prompts,
                                                                        ctx.evaluator.max_new_tokens),
                            lambda pct, stage: progress(10 + pct * 0.3, stage))
    except ValueError as exc:
        raise JobRefused(f"cannot merge: {exc}") from None
    r = made.result
    return made.files, adapter_deltas(work / "merged"), {
        "init": made.init, "prompts": {s.ref: len(s.prompts) for s in found}, "steps": r.steps,
        "agreement": round(r.agreement, 4), "final_loss": round(r.final_loss, 4), "seconds": round(r.seconds, 1)}


def _store_tall(ctx: JobContext, sources: list[PatchVersion], deltas: list[dict], merged: dict, lam: float,
                store: str, work: Path) -> dict:
    """Store the shared ΔW and each source's TALL mask as blobs; their digests and what they cost in bytes."""
    extra: dict = {}
    if store == "fitted":
        try:
            fit = fitted_storage(deltas)
        except ValueError as exc:
            raise JobRefused(f"cannot keep TALL storage: {exc}") from None
        shared, found = fit.shared, fit.masks
        extra["relative_error"] = {s.ref: e for s, e in zip(sources, fit.relative_error)}
    else:  # written when the merge's ΔW was what was stored: a job queued before tall_store existed reads so
        shared, found = merged, tall_masks(deltas, merged, lam)
    empty = [s.ref for s, d in zip(sources, found.density) if d == 0]
    if empty:  # refused before anything is registered: there would be nothing to rebuild these from
        why = f"at lam {lam} the TALL mask" if store != "fitted" else "the fitted TALL mask"
        raise JobRefused(f"{why} of {', '.join(empty)} keeps nothing of the stored ΔW; lower lam or change "
                         f"tall_store")
    dense = merged_bytes(shared)
    masks = [mask_bytes(m) for m in found.masks]
    patch_bytes = sum((work / f"source-{i}" / name).stat().st_size
                      for i, s in enumerate(sources) for name in s.files)
    return {"store": store, "lam": lam if store != "fitted" else None, **extra,
            "merged_delta": ctx.blobs.put_bytes(dense),
            "masks": {s.ref: ctx.blobs.put_bytes(m) for s, m in zip(sources, masks)},
            "mask_density": {s.ref: round(d, 6) for s, d in zip(sources, found.density)},
            # What keeping the sources costs three ways: their patch files as uploaded, the TALL form
            # (merged ΔW + masks), and each source's ΔW kept dense (what TALL compresses in its paper).
            "bytes": {"sources": patch_bytes, "tall": len(dense) + sum(len(m) for m in masks),
                      "merged_delta": len(dense), "masks": sum(len(m) for m in masks),
                      "sources_dense": len(dense) * len(sources)}}


def _tall_versions(ctx: JobContext, job: Job, sources: list[PatchVersion], merged: PatchVersion, base_path: str,
                   progress: Progress) -> list[PatchVersion]:
    """Each source rebuilt from the stored TALL form and registered as the next version of its own patch.

    Every rebuilt adapter is written and validated before the first is registered, so a refusal leaves
    no source with a rebuilt version and others without.
    """
    tall, rank = merged.meta["tall"], int(job.params["rank"])
    found = {s.ref: _made_by(ctx, s.name, job, source=s.ref) for s in sources}
    work = ctx.work_dir / f"tall-{job.id}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        stored = read_merged(_blob(ctx, tall["merged_delta"]))
        base_config = json.loads((Path(base_path) / "config.json").read_text())
        made = {}
        for i, source in enumerate(sources):
            if found[source.ref] is not None:
                continue
            out = work / f"source-{i}"
            kept = write_adapter(Path(base_path), reconstruct(stored, read_mask(_blob(ctx, tall["masks"][source.ref]),
                                                                                stored)), rank, out)
            files = {f.name: f for f in out.iterdir()}
            try:
                summary = validate_upload(source.name, files, base_config, ctx.limits)
            except StoreError as exc:
                raise JobRefused(f"{source.ref} rebuilt from TALL storage is refused: {exc.message}") from None
            made[source.ref] = (files, kept, summary)
            progress(50 + 8 * (i + 1) / len(sources), f"{source.ref} rebuilt from TALL storage")
        for source in sources:
            if source.ref not in made:
                continue
            files, kept, summary = made[source.ref]
            meta = {"job_id": job.id, "rank": rank, "energy_kept": round(kept.energy_kept, 6),
                    "tall": {"source": source.ref, "merge": merged.ref, "merged_delta": tall["merged_delta"],
                             "mask": tall["masks"][source.ref], "lam": tall["lam"],
                             "mask_density": tall["mask_density"][source.ref]}, **asdict(summary)}
            found[source.ref] = ctx.registry.create_version(
                source.name, source.base, put_files(ctx.blobs, files), meta, origin="merge",
                parents=[s.ref for s in sources], actor=job.actor,
                reason=f"{source.ref} rebuilt from the TALL storage of {merged.ref}")
        progress(60, "rebuilt sources registered: " + ", ".join(v.ref for v in found.values()))
        return [found[s.ref] for s in sources]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _blob(ctx: JobContext, digest: str) -> bytes:
    with ctx.blobs.open(digest) as f:
        return f.read()


def _retention(ctx: JobContext, source: PatchVersion, candidates: list[PatchVersion], base_path: str) -> list[dict]:
    """The source and each candidate (the merge; its rebuilt self) on the evaluation set of the alias named
    like the source's patch; the source is run once for all of them."""
    found = ctx.evals.evalset(source.name)
    if found is None:
        return [{"source": source.ref, "alias": None, "retention": None,
                 "note": f"no alias {source.name!r} with an evaluation set: retention not measured"}
                for _ in candidates]
    rows, metric = found
    prompts = [r["prompt"] for r in rows]
    probe = ctx.evals.probe()
    old, old_ppl = ctx.evaluator.run(base_path, source, prompts, probe)
    out = []
    for candidate in candidates:
        new, new_ppl = ctx.evaluator.run(base_path, candidate, prompts, probe)
        report = compare(candidate.ref, source.ref, candidate.base, metric, rows, old, new, old_ppl, new_ppl).summary()
        out.append({"source": source.ref, "alias": source.name, "candidate": candidate.ref, "metric": metric,
                    "n": report["n"], "score_source": report["score_old"], "score_merged": report["score_new"],
                    "retention": report["score_new"] / report["score_old"] if report["score_old"] else None,
                    "nfr": report["nfr"], "pfr": report["pfr"], "perplexity_ratio": report["perplexity_ratio"]})
    return out
