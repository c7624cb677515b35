"""The append-only audit log (who, what, when, why)."""

from __future__ import annotations

import asyncio
import math
import re

from fastapi import APIRouter, Query

from service.api.admin import protocol as a
from service.api.admin.context import AdminContext
from service.api.errors import APIError


def routes(router: APIRouter, ctx: AdminContext) -> None:
    """Add the audit routes to the /admin router."""
    registry = ctx.registry

    @router.get("/audit")
    async def audit(limit: int = Query(100, ge=1, le=10_000), since: str | None = None) -> list[a.AuditEntry]:
        entries = await asyncio.to_thread(registry.audit, limit, _since(since))
        return [a.AuditEntry(**vars(e)) for e in entries]


_AUDIT_ID = re.compile(r"[0-9]{1,19}-[0-9]{1,19}")  # what fits a Redis stream id (64 bits a part)


def _since(since: str | None) -> str | float | None:
    # An audit entry id ("1700000000000-0") reads after that entry; a number is a Unix time in seconds.
    if since is None or _AUDIT_ID.fullmatch(since):
        return since
    try:
        seconds = float(since)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds < 1e12:  # also refuses nan and inf
        raise APIError(400, "since must be an audit entry id (like 1700000000000-0) or a Unix time in seconds",
                       param="since")
    return seconds
