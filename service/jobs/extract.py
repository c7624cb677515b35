"""`extract`: a LoRA patch from a full fine-tune of a base, by truncated SVD of each layer's ΔW (service/lora).

The extracted patch is validated like an upload and registered as a version (origin `extract`), with
the energy kept and the parameters it could not carry in its metadata. A retry returns the version
an earlier attempt made.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from adapters_store.blobs import put_files
from adapters_store.errors import StoreError
from adapters_store.jobs import Job
from adapters_store.validation import validate_upload
from service.jobs.context import JobContext
from service.jobs.worker import JobRefused, Progress
from service.lora.extract import extract_lora


def extract(ctx: JobContext, job: Job, progress: Progress) -> dict:
    """params: name, base, checkpoint (a directory), rank, reason. Registers the extracted patch as a version."""
    p = job.params
    for record in ctx.registry.list_versions(p["name"]):  # a retry after the version was made: that one
        if record.meta.get("job_id") == job.id:
            return {"version": record.version, **{k: record.meta[k] for k in ("rank", "energy_kept")}}
    base = ctx.registry.get_base(p["base"])
    if base is None or not base.path:
        raise JobRefused(f"base {p['base']!r} has no local path")
    out = ctx.work_dir / f"extract-{job.id}"
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
            summary = validate_upload(p["name"], files, base_config, ctx.limits)
        except StoreError as exc:
            raise JobRefused(f"the extracted patch is refused: {exc.message}") from None
        progress(92, "storing the patch")
        digests = put_files(ctx.blobs, files)
        meta = {"job_id": job.id, "rank": found.rank, "energy_kept": round(found.energy_kept, 6),
                "modules": len(found.modules), "not_carried": found.not_carried,
                "checkpoint": str(p["checkpoint"]), **asdict(summary)}
        record = ctx.registry.create_version(p["name"], base.name, digests, meta, origin="extract",
                                             actor=job.actor, reason=p.get("reason") or "extracted")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"version": record.version, "rank": found.rank, "energy_kept": found.energy_kept,
            "modules": len(found.modules), "not_carried": found.not_carried}
