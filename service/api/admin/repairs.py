"""Compatibility repair after a base upgrade: an alias's distillation prompts, and the repair job."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from adapters_store.evaluation import parse_prompts
from adapters_store.keys import ApiKey
from service.api.admin import protocol as a
from service.api.admin.context import AdminContext, accepted, actor_of, jsonl_body
from service.api.auth import require_admin
from service.api.errors import APIError


def routes(router: APIRouter, ctx: AdminContext) -> None:
    """Add the repair routes to the /admin router."""
    registry, evals, jobs = ctx.registry, ctx.evals, ctx.jobs

    @router.put("/aliases/{alias}/prompts")
    async def prompts_put(alias: str, request: Request, key: ApiKey = Depends(require_admin)) -> dict:
        """The alias's distillation prompts: a JSONL body of {"prompt"} rows, none of them an evaluation item."""
        prompts = await jsonl_body(request, alias, parse_prompts, "distillation prompts")
        return await asyncio.to_thread(evals.attach_prompts, alias, prompts, actor_of(key))

    @router.get("/aliases/{alias}/prompts")
    async def prompts_show(alias: str) -> dict:
        record = await asyncio.to_thread(evals.prompts_record, alias)
        if record is None:
            raise APIError(404, f"alias {alias!r} has no distillation prompts", code="not_found")
        return record

    @router.post("/aliases/{alias}/repair", status_code=202)
    async def repair(alias: str, body: a.RepairRequest, key: ApiKey = Depends(require_admin)) -> JSONResponse:
        """Queue a repair of the alias's patch for `base`, distilled from its current version; moved if it passes."""
        pointer, base = await asyncio.to_thread(lambda: (registry.get_alias(alias), registry.get_base(body.base)))
        if pointer is None:
            raise APIError(404, f"no alias {alias!r}", code="not_found")
        if base is None or not base.path:
            raise APIError(422, f"unknown base {body.base!r}", param="base")
        if pointer.base == base.name:
            raise APIError(409, f"{alias!r} already serves {pointer.ref} on {base.name}", code="conflict")
        if await asyncio.to_thread(evals.prompts_record, alias) is None:
            raise APIError(422, f"alias {alias!r} has no distillation prompts: PUT /admin/aliases/{alias}/prompts "
                                f"first", param="alias")
        job = await asyncio.to_thread(jobs.submit, "repair", {"alias": alias, "base": base.name,
                                                              "reason": body.reason}, actor_of(key))
        return accepted(job)
