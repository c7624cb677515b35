"""Aliases: where each points and its history; activate (gated), evaluate, roll back; evaluation set and gate."""

from __future__ import annotations

import asyncio
from dataclasses import asdict

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from adapters_store.evaluation import parse_rows
from adapters_store.keys import ApiKey
from adapters_store.names import NAME_RULE, is_safe_name
from service.api.admin import protocol as a
from service.api.admin.context import AdminContext, accepted, actor_of, jsonl_body
from service.api.auth import require_admin
from service.api.errors import APIError
from service.evaluation.gate import gate_for


def routes(router: APIRouter, ctx: AdminContext) -> None:
    """Add the aliases routes to the /admin router."""
    registry, patches, evals, jobs = ctx.registry, ctx.patches, ctx.evals, ctx.jobs

    @router.get("/aliases")
    async def aliases() -> list[a.Alias]:
        return [a.Alias.of(p) for p in await asyncio.to_thread(registry.list_aliases)]

    @router.get("/aliases/{alias}")
    async def alias_show(alias: str) -> a.AliasDetail:
        pointer, history = await asyncio.to_thread(lambda: (registry.get_alias(alias), registry.alias_history(alias)))
        if pointer is None:
            raise APIError(404, f"no alias {alias!r}", code="not_found")
        moves = [a.AliasMove(at=h.at, action=h.action, actor=h.actor, reason=h.reason, from_ref=h.from_ref,
                             to_ref=h.to_ref, to_base=h.to_base) for h in history]
        return a.AliasDetail(**a.Alias.of(pointer).model_dump(), history=moves)

    @router.post("/aliases/{alias}/activate", responses={202: {"description": "gated: a job was queued"}})
    async def activate(alias: str, body: a.ActivateRequest, key: ApiKey = Depends(require_admin)) -> JSONResponse:
        """Point `alias` at a version: at once when no gate applies (or `force`), else through a gated job (202)."""
        return await ctx.move(alias, body.patch or alias, body.version, actor_of(key), body.reason, body.force)

    @router.post("/aliases/{alias}/evaluate", status_code=202)
    async def evaluate(alias: str, body: a.EvaluateRequest, key: ApiKey = Depends(require_admin)) -> JSONResponse:
        """Queue a compatibility report of a version against the alias's active one (or `against`)."""
        patch = body.patch or alias
        if await asyncio.to_thread(registry.get_version, patch, body.version) is None:
            raise APIError(404, f"no version {patch}@{body.version}", code="not_found")
        against = body.against
        if against is None:
            pointer = await asyncio.to_thread(registry.get_alias, alias)
            against = pointer.ref if pointer else None
        job = await asyncio.to_thread(jobs.submit, "evaluate", {"alias": alias, "patch": patch,
                                                                "version": body.version, "against": against},
                                      actor_of(key))
        return accepted(job)

    @router.put("/aliases/{alias}/evalset")
    async def evalset_put(alias: str, request: Request, metric: str = "exact_match",
                          key: ApiKey = Depends(require_admin)) -> dict:
        """The alias's evaluation set: a JSONL body of {"prompt", "reference"} rows; `metric` exact_match or rouge_l."""
        rows = await jsonl_body(request, alias, parse_rows, "evaluation set")
        try:
            return await asyncio.to_thread(evals.attach_evalset, alias, rows, metric, actor_of(key))
        except ValueError as exc:
            raise APIError(422, f"evaluation set refused: {exc}", code="unprocessable") from None

    @router.get("/aliases/{alias}/evalset")
    async def evalset_show(alias: str) -> dict:
        record = await asyncio.to_thread(evals.evalset_record, alias)
        if record is None:
            raise APIError(404, f"alias {alias!r} has no evaluation set", code="not_found")
        return record

    @router.put("/aliases/{alias}/gate")
    async def gate_put(alias: str, body: a.GateRequest) -> dict:
        """Thresholds for this alias's gate; fields left out keep their defaults."""
        if not is_safe_name(alias):
            raise APIError(400, f"alias name {alias!r} must be {NAME_RULE}", param="alias")
        await asyncio.to_thread(evals.set_gate, alias, body.model_dump(exclude_none=True))
        return asdict(await asyncio.to_thread(gate_for, evals, alias))

    @router.get("/aliases/{alias}/gate")
    async def gate_show(alias: str) -> dict:
        return asdict(await asyncio.to_thread(gate_for, evals, alias))

    @router.post("/aliases/{alias}/rollback")
    async def rollback(alias: str, body: a.RollbackRequest | None = None,
                       key: ApiKey = Depends(require_admin)) -> a.Alias:
        body = body or a.RollbackRequest()
        return a.Alias.of(await patches.rollback(alias, body.version, actor_of(key), body.reason))
