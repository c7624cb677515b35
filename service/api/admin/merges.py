"""Merges: several patch versions of one base folded into one new version by a worker job (service/jobs/merge.py)."""

from __future__ import annotations

import asyncio
import re

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from adapters_store.keys import ApiKey
from adapters_store.names import NAME_RULE, is_safe_name
from service.api.admin import protocol as a
from service.api.admin.context import AdminContext, accepted, actor_of
from service.api.auth import require_admin
from service.api.errors import APIError
from service.lora.params import DELTA_METHODS, MergeParams
from service.lora.tall import MAX_FITTED_SOURCES

_REF = re.compile(r"([a-z0-9][a-z0-9-]*)@([0-9]{1,9})")


def routes(router: APIRouter, ctx: AdminContext) -> None:
    """Add the merge route to the /admin router."""

    @router.post("/merges", status_code=202)
    async def merge(body: a.MergeRequest, key: ApiKey = Depends(require_admin)) -> JSONResponse:
        """Queue a merge of `sources` by `method` into a new version of `name`, measured against each source
        (with `tall`, also each source rebuilt from the merge's TALL storage as its next version)."""
        if not is_safe_name(body.name):
            raise APIError(400, f"patch name {body.name!r} must be {NAME_RULE}", param="name")
        if body.rank > ctx.max_rank:
            raise APIError(422, f"rank {body.rank} is above the engine's limit of {ctx.max_rank}", param="rank")
        if len(set(body.sources)) != len(body.sources):
            raise APIError(400, "a source is named twice", param="sources")
        refs = []
        for ref in body.sources:
            m = _REF.fullmatch(ref)
            if m is None:
                raise APIError(400, f"{ref!r} is not a version reference like 'sentiment@1'", param="sources")
            refs.append((m[1], int(m[2])))
        versions = await asyncio.to_thread(lambda: [ctx.registry.get_version(n, v) for n, v in refs])
        for ref, version in zip(body.sources, versions):
            if version is None:
                raise APIError(404, f"no version {ref}", param="sources", code="not_found")
        if len({v.base for v in versions}) != 1:
            bases = ", ".join(f"{v.ref} on {v.base}" for v in versions)
            raise APIError(422, f"the sources are built on different bases ({bases})", param="sources")
        params = MergeParams(**{k: tuple(v) if k == "weights" else v
                                for k, v in body.params.model_dump(exclude_none=True).items()})
        try:
            params.check(len(versions))
        except ValueError as exc:
            raise APIError(400, str(exc), param="params") from None
        if body.method == "distill":
            if params.init not in ("auto", *DELTA_METHODS, *body.sources):
                raise APIError(400, f"init {params.init!r} is none of the sources", param="params")
            records = await asyncio.to_thread(lambda: [ctx.evals.prompts_record(n) for n, _ in refs])
            missing = [n for (n, _), r in zip(refs, records) if r is None]
            if missing:
                raise APIError(422, f"a merge by distillation trains on each source alias's distillation prompts; "
                                    f"none for {', '.join(missing)} (PUT /admin/aliases/{missing[0]}/prompts)",
                               param="sources")
        if body.tall and body.tall_store == "fitted" and len(versions) > MAX_FITTED_SOURCES:
            raise APIError(422, f"fitted TALL storage takes at most {MAX_FITTED_SOURCES} sources; give tall_store "
                                f"'masks' for more", param="tall_store")
        job = await asyncio.to_thread(ctx.jobs.submit, "merge", {
            "sources": body.sources, "method": body.method, "params": body.params.model_dump(exclude_none=True),
            "rank": body.rank, "name": body.name, "tall": body.tall, "tall_store": body.tall_store,
            "reason": body.reason}, actor_of(key))
        return accepted(job)
