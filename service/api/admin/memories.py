"""Side memories (knowledge edits): create and attach, edit (a job), list and show, activate, roll back, revoke.

Edits and revocations are jobs (the worker trains, measures, gates and activates: 202 with the job);
activation and rollback are pointer moves, applied on this replica before the answer (others follow
the registry's event or their next reconcile).
"""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Depends, Request

from adapters_store.evaluation import parse_texts
from adapters_store.keys import ApiKey
from service.api.admin import protocol as a
from service.api.admin.context import AdminContext, accepted, actor_of, jsonl_body
from service.api.auth import require_admin
from service.api.errors import APIError
from service.evaluation.memory_report import MemoryGate


def routes(router: APIRouter, ctx: AdminContext) -> None:
    """Add the memories routes to the /admin router."""
    memories, jobs = ctx.memories, ctx.jobs

    def view(record, pointer, version) -> a.Memory:
        return a.Memory(name=record.name, base=record.base, target=record.target, version=pointer.version,
                        ref=version.ref if version else None, edits=len(version.edits) if version else 0,
                        updated_at=pointer.updated_at, updated_by=pointer.updated_by)

    def read(name: str):
        record, pointer = memories.get(name), memories.pointer(name)
        if record is None or pointer is None:
            raise APIError(404, f"no memory {name!r}", code="not_found")
        version = memories.get_version(name, pointer.version) if pointer.version else None
        return record, pointer, version

    async def known(name: str):
        return await asyncio.to_thread(read, name)

    @router.get("/memories")
    async def memories_list() -> list[a.Memory]:
        def everything():
            return [view(*read(m.name)) for m in memories.list()]

        return await asyncio.to_thread(everything)

    @router.post("/memories", status_code=201)
    async def memory_create(body: a.MemoryCreateRequest, key: ApiKey = Depends(require_admin)) -> a.Memory:
        """A new memory of a base, attached to the base (every alias on it) or to one alias; it serves nothing yet."""
        await asyncio.to_thread(memories.create, body.name, body.base or ctx.base, body.target, actor_of(key))
        await ctx.sync.reconcile()
        return view(*await known(body.name))

    @router.get("/memories/{name}")
    async def memory_show(name: str) -> a.MemoryDetail:
        record, pointer, version = await known(name)
        versions, history = await asyncio.to_thread(lambda: (memories.list_versions(name), memories.history(name)))
        return a.MemoryDetail(**view(record, pointer, version).model_dump(),
                              versions=[a.MemoryVersionView.of(v) for v in versions],
                              history=[a.MemoryMoveView(**vars(h)) for h in history])

    @router.get("/memories/{name}/versions/{version}")
    async def memory_version(name: str, version: int) -> dict:
        """A version whole: its edits (with ids, to revoke one) and its report, edit by edit."""
        record = await asyncio.to_thread(memories.get_version, name, version)
        if record is None:
            raise APIError(404, f"no version {name}@{version}", code="not_found")
        return {**a.MemoryVersionView.of(record).model_dump(), "edits": [vars(e) for e in record.edits],
                "items": (record.meta.get("report") or {}).get("items", [])}

    @router.post("/memories/{name}/edits", status_code=202)
    async def memory_edits(name: str, body: a.EditsRequest, key: ApiKey = Depends(require_admin)):
        """Queue an edit job: the next version, trained on top of the one served now, measured, gated, activated."""
        await known(name)
        edits = [e.model_dump() for e in body.edits]
        for e in edits:
            e["locality"] = [x if isinstance(x, str) else x["prompt"] for x in e["locality"]]
        job = await asyncio.to_thread(jobs.submit, "edit", {"memory": name, "edits": edits, "reason": body.reason},
                                      actor_of(key))
        return accepted(job)

    @router.post("/memories/{name}/revoke", status_code=202)
    async def memory_revoke(name: str, body: a.MemoryRevokeRequest, key: ApiKey = Depends(require_admin)):
        """Queue a revoke job: a new version without one edit (trained from before it), measured, gated, activated."""
        _, _, version = await known(name)
        if version is None or body.edit not in {e.id for e in version.edits}:
            raise APIError(404, f"memory {name} serves no edit {body.edit!r}", param="edit", code="not_found")
        job = await asyncio.to_thread(jobs.submit, "revoke", {"memory": name, "edit": body.edit,
                                                              "reason": body.reason}, actor_of(key))
        return accepted(job)

    @router.post("/memories/{name}/activate")
    async def memory_activate(name: str, body: a.MemoryActivateRequest, key: ApiKey = Depends(require_admin)):
        """Serve a version (0: none). A version that failed its gate needs `force` and a reason."""
        if body.force and not body.reason.strip():
            raise APIError(400, "a forced activation skips the gate and needs a reason", param="reason")
        await known(name)
        if body.version:
            record = await asyncio.to_thread(memories.get_version, name, body.version)
            if record is None:
                raise APIError(404, f"no version {name}@{body.version}", code="not_found")
            gate = record.meta.get("gate") or {}
            if not gate.get("passed", True) and not body.force:
                raise APIError(409, f"{record.ref} failed its gate ({'; '.join(gate.get('reasons', []))}): "
                                    f"activate it with force and a reason", param="version", code="conflict")
        await asyncio.to_thread(memories.activate, name, body.version, actor_of(key), body.reason)
        await ctx.sync.reconcile()
        return view(*await known(name))

    @router.post("/memories/{name}/rollback")
    async def memory_rollback(name: str, body: a.MemoryRollbackRequest | None = None,
                              key: ApiKey = Depends(require_admin)) -> a.Memory:
        """Back to the version served before the last move (or a named one): a pointer move, never gated."""
        body = body or a.MemoryRollbackRequest()
        await asyncio.to_thread(memories.rollback, name, body.version, actor_of(key), body.reason)
        await ctx.sync.reconcile()
        return view(*await known(name))

    @router.put("/memories/{name}/attachment")
    async def memory_attach(name: str, body: a.MemoryAttachRequest, key: ApiKey = Depends(require_admin)) -> a.Memory:
        """Attach the memory to a base (every alias on it) or to one alias."""
        await asyncio.to_thread(memories.attach, name, body.target, actor_of(key), body.reason)
        await ctx.sync.reconcile()
        return view(*await known(name))

    @router.put("/memories/{name}/gate")
    async def memory_gate_put(name: str, body: a.MemoryGateRequest) -> dict:
        """Thresholds of the memory's gate (Rel, Gen, Loc over every edit; probe perplexity); left out: defaults."""
        await known(name)
        await asyncio.to_thread(memories.set_gate, name, body.model_dump(exclude_none=True))
        return MemoryGate.of(await asyncio.to_thread(memories.gate, name)).as_dict()

    @router.get("/memories/{name}/gate")
    async def memory_gate_show(name: str) -> dict:
        await known(name)
        return MemoryGate.of(await asyncio.to_thread(memories.gate, name)).as_dict()

    @router.put("/memories/{name}/irrelevant")
    async def memory_irrelevant(name: str, request: Request, key: ApiKey = Depends(require_admin)) -> dict:
        """Texts the memory must stay quiet on while it learns (JSONL of {"text"}); default: the probe set."""
        texts = await jsonl_body(request, name, parse_texts, "irrelevant set")
        await known(name)
        data = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
        digest = await asyncio.to_thread(ctx.blobs.put_bytes, data)
        return await asyncio.to_thread(memories.set_irrelevant, name, digest, len(texts), actor_of(key))
