"""An alias's rollout: a candidate tried on part of the traffic (canary) or on a copy of it (shadow)."""

from __future__ import annotations

import asyncio
from dataclasses import asdict

from fastapi import APIRouter, Depends

from adapters_store.keys import ApiKey
from service import metrics
from service.api.admin import protocol as a
from service.api.admin.context import AdminContext, actor_of
from service.api.auth import require_admin
from service.api.errors import APIError


def routes(router: APIRouter, ctx: AdminContext) -> None:
    """Add the rollouts routes to the /admin router."""
    rollouts = ctx.rollouts

    @router.put("/aliases/{alias}/rollout")
    async def rollout_start(alias: str, body: a.RolloutRequest, key: ApiKey = Depends(require_admin)) -> dict:
        """Try a version on part of the alias's traffic (canary) or on a mirror of it (shadow)."""
        if body.mode == "canary" and body.percent <= 0:
            raise APIError(400, "a canary needs a percent above 0", param="percent")
        started = await asyncio.to_thread(rollouts.start, alias, body.patch or alias, body.version, body.mode,
                                          body.percent, body.min_agreement, body.min_requests, actor_of(key),
                                          body.reason)
        return asdict(started)

    @router.get("/aliases/{alias}/rollout")
    async def rollout_show(alias: str) -> dict:
        found = await asyncio.to_thread(rollouts.get, alias)
        if found is None:
            raise APIError(404, f"alias {alias!r} has no rollout", code="not_found")
        return asdict(found)

    @router.delete("/aliases/{alias}/rollout")
    async def rollout_stop(alias: str, reason: str = "", key: ApiKey = Depends(require_admin)) -> dict:
        stopped = await asyncio.to_thread(rollouts.stop, alias, actor_of(key), reason)
        metrics.rollouts_stopped.labels(alias, "operator").inc()
        return {**asdict(stopped), "stopped": True}
