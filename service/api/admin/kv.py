"""KV-cache policies: the one in force per base (its deployments' default) and per alias; propose (a gated job),
roll back (at once, never gated: undo must not wait for an evaluation), history."""

from __future__ import annotations

import asyncio
from dataclasses import asdict

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from adapters_store.keys import ApiKey
from service.api.admin import protocol as a
from service.api.admin.context import AdminContext, accepted, actor_of
from service.api.auth import require_admin
from service.api.errors import APIError
from service.kv.policy import KVPolicy, KVPolicyInvalid
from service.kv.vllm_mapping import refusal


def routes(router: APIRouter, ctx: AdminContext) -> None:
    """Add the KV policy routes to the /admin router."""
    registry, kv, jobs = ctx.registry, ctx.kv, ctx.jobs

    async def scope_base(scope: str) -> tuple[str, bool]:
        """(the base the scope is served on, whether it is an alias); 404 for neither a base nor an alias."""
        base, pointer = await asyncio.to_thread(lambda: (registry.get_base(scope), registry.get_alias(scope)))
        if base is not None:
            return base.name, False
        if pointer is not None:
            return pointer.base, True
        raise APIError(404, f"no base or alias {scope!r}", code="not_found")

    @router.get("/kv")
    async def kv_all() -> dict:
        """Every scope's KV policy record (scopes never set serve the default: nothing compressed)."""
        return {scope: asdict(r) for scope, r in (await asyncio.to_thread(kv.all)).items()}

    @router.get("/kv/{scope}")
    async def kv_show(scope: str) -> dict:
        """A scope's policy record and its history, oldest change first."""
        await scope_base(scope)
        record, history = await asyncio.to_thread(lambda: (kv.get(scope), kv.history(scope)))
        try:
            policy = KVPolicy.from_dict(record.policy if record else {}).as_dict()
        except KVPolicyInvalid:  # written by something other than this API: shown as stored, never served
            policy = None
        return {"scope": scope, "record": asdict(record) if record else None, "policy": policy,
                "history": [asdict(h) for h in history]}

    @router.post("/kv/{scope}", status_code=202, responses={200: {"description": "forced: applied at once"}})
    async def kv_propose(scope: str, body: a.KVProposal, key: ApiKey = Depends(require_admin)) -> JSONResponse:
        """Propose a policy: a job evaluates it against the one in force on every alias it would serve and the
        in-context task, gates it like a patch, and applies it (202: the job); `force` applies it at once."""
        if body.force and not body.reason.strip():
            raise APIError(400, "a forced KV policy skips the gate and needs a reason", param="reason")
        try:
            policy = KVPolicy(**body.policy.model_dump())
        except KVPolicyInvalid as exc:
            raise APIError(422, f"KV policy refused: {exc}", param="policy", code="unprocessable") from None
        base, is_alias = await scope_base(scope)
        # Said now rather than after an evaluation: a replica that cannot apply it would refuse it anyway.
        for replica in await asyncio.to_thread(ctx.replicas.hosting, base):
            if replica.kv and (why := refusal(policy, replica.kv.get("capabilities", {}), is_alias)):
                raise APIError(422, f"replica {replica.id} ({replica.engine}) cannot apply this policy: {why}",
                               param="policy", code="unprocessable")
        if body.force:
            record = await asyncio.to_thread(kv.set, scope, policy.as_dict(), actor_of(key), body.reason,
                                             action="kv_policy_force_set")
            return JSONResponse(asdict(record), status_code=200)
        job = await asyncio.to_thread(jobs.submit, "kv_policy", {
            "scope": scope, "policy": policy.as_dict(), "reason": body.reason,
            "context_alias": body.context_alias}, actor_of(key))
        return accepted(job)

    @router.post("/kv/{scope}/rollback")
    async def kv_rollback(scope: str, body: a.KVRollbackRequest | None = None,
                          key: ApiKey = Depends(require_admin)) -> dict:
        """Restore the policy in force before the scope's last change (not gated)."""
        await scope_base(scope)
        body = body or a.KVRollbackRequest()
        return asdict(await asyncio.to_thread(kv.rollback, scope, actor_of(key), body.reason))
