"""Carrying a patch version to another base unchanged (PortLLM's step), shared by `port` and `repair`."""

from __future__ import annotations

import shutil

from adapters_store.blobs import materialize
from adapters_store.jobs import Job
from adapters_store.registry import BaseRecord, PatchVersion
from adapters_store.validation import validate_upload
from service.jobs.context import JobContext


def carry(ctx: JobContext, job: Job, source: PatchVersion, target: BaseRecord, config: dict) -> PatchVersion:
    """`source`'s files registered unchanged on `target` (origin `port`); StoreError if they do not fit.

    Carried once: a version already carried from `source` to `target` (an earlier attempt or job) is
    reused, since another would hold the same bytes and the same lineage.
    """
    found = next((v for v in ctx.registry.list_versions(source.name)
                  if v.base == target.name and v.meta.get("ported_from") == source.ref), None)
    if found is not None:
        return found
    check_dir = ctx.work_dir / f"port-{job.id}-{source.ref}"
    try:
        out = materialize(ctx.blobs, source.files, check_dir)
        validate_upload(source.name, {f.name: f for f in out.iterdir()}, config, ctx.limits)
    finally:
        shutil.rmtree(check_dir, ignore_errors=True)
    return ctx.registry.create_version(
        source.name, target.name, dict(source.files), {**source.meta, "job_id": job.id, "ported_from": source.ref},
        origin="port", parents=[source.ref], actor=job.actor, reason=f"carried to {target.name} unchanged")
