"""Bases: list them; register a new release and queue its port job (every alias's patch carried to it)."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from adapters_store.keys import ApiKey
from adapters_store.validation import base_module_shapes
from service.api.admin import protocol as a
from service.api.admin.context import AdminContext, accepted, actor_of, checkpoint_dir
from service.api.auth import require_admin
from service.api.errors import APIError


def routes(router: APIRouter, ctx: AdminContext) -> None:
    """Add the bases routes to the /admin router."""
    registry, jobs = ctx.registry, ctx.jobs

    @router.get("/bases")
    async def bases() -> list[a.Base]:
        return [a.Base(**vars(b)) for b in await asyncio.to_thread(registry.list_bases)]

    @router.post("/bases", status_code=202)
    async def base_register(body: a.BaseRequest, key: ApiKey = Depends(require_admin)) -> JSONResponse:
        """Register a new base release, then queue the port job: every alias's patch carried to it and measured."""
        checkpoint = checkpoint_dir(body.path, "path")
        if body.move and body.force and not body.reason.strip():
            raise APIError(400, "a forced move to a base no replica hosts needs a reason", param="reason")
        if body.move and not body.force and not await asyncio.to_thread(ctx.replicas.hosting, body.name):
            # Registering first (without move) is what lets a gateway for the base start.
            raise APIError(409, f"no live replica hosts base {body.name}: register it without move, start a gateway "
                                f"for it (PATCHSERVE_BASE={body.name}), then register it again with move: true "
                                f"(or force the move with a reason)", param="move", code="base_not_hosted")
        try:
            shapes = base_module_shapes(json.loads((checkpoint / "config.json").read_text()))
        except (ValueError, KeyError) as exc:
            raise APIError(422, f"cannot read the base's config: {exc}", param="path") from None
        record = await asyncio.to_thread(registry.register_base, body.name, body.version,
                                         path=str(checkpoint), module_shapes=shapes,
                                         actor=actor_of(key))
        job = await asyncio.to_thread(jobs.submit, "port", {"base": record.name, "move": body.move,
                                                              "repair": body.repair, "force": body.force,
                                                              "reason": body.reason}, actor_of(key))
        return accepted(job, base=a.Base(**vars(record)).model_dump())
