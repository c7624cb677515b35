"""The admin API under `/admin`, one module per resource; every route needs an admin key.

Refusals are OpenAI-shaped errors (service/api/errors.py maps the store's refusals to statuses):
400 malformed, 401/403 keys, 404 unknown, 409 conflicts, 413 too large, 415 pickle, 422 incompatible
with the base or the engine.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service.api.admin import (
    aliases,
    audit,
    bases,
    cluster,
    jobs,
    keys,
    kv,
    memories,
    merges,
    patches,
    repairs,
    rollouts,
)
from service.api.admin.context import AdminContext
from service.api.auth import require_admin


def admin_router(ctx: AdminContext) -> APIRouter:
    """The `/admin` routes over one replica's store and patch operations."""
    router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])
    for part in (bases, patches, merges, aliases, repairs, rollouts, memories, audit, jobs, keys, cluster, kv):
        part.routes(router, ctx)
    return router
