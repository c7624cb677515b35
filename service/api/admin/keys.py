"""API keys with roles admin or inference; the secret is shown once, only its sha256 is stored."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends

from adapters_store.keys import ApiKey
from service.api.admin import protocol as a
from service.api.admin.context import AdminContext, actor_of
from service.api.auth import require_admin
from service.api.errors import APIError


def routes(router: APIRouter, ctx: AdminContext) -> None:
    """Add the keys routes to the /admin router."""
    keys = ctx.keys

    @router.get("/keys")
    async def keys_list() -> list[a.Key]:
        return [a.Key(**_public(k)) for k in await asyncio.to_thread(keys.list)]

    @router.post("/keys", status_code=201)
    async def key_create(body: a.KeyRequest, key: ApiKey = Depends(require_admin)) -> a.NewKey:
        try:
            record, secret = await asyncio.to_thread(keys.create, body.role, body.name, actor_of(key))
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        return a.NewKey(**_public(record), key=secret)

    @router.delete("/keys/{key_id}")
    async def key_revoke(key_id: str, key: ApiKey = Depends(require_admin)) -> dict:
        if key_id == key.id:
            raise APIError(409, "a key cannot revoke itself; use another admin key", code="conflict")
        if not await asyncio.to_thread(keys.revoke, key_id):
            raise APIError(404, f"no key {key_id!r}", code="not_found")
        return {"id": key_id, "revoked": True}


def _public(key: ApiKey) -> dict:
    return {"id": key.id, "name": key.name, "role": key.role, "created_at": key.created_at,
            "created_by": key.created_by}
