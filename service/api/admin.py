"""The admin API under `/admin`: patches and versions, aliases (activate, roll back), audit log, API keys.

Every route needs an admin key. Refusals are OpenAI-shaped errors with the status the store or the
validation chose (400 malformed, 401/403 keys, 404 unknown, 409 conflicts, 413 too large, 415 pickle,
422 incompatible with the base or the engine).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from dataclasses import asdict
from pathlib import Path

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from adapters_store.evaluation import EvaluationStore, parse_rows
from adapters_store.jobs import JobQueue
from adapters_store.keys import ApiKey, ApiKeyStore
from adapters_store.names import NAME_RULE, is_safe_name
from adapters_store.registry import Registry
from adapters_store.rollouts import Rollouts
from adapters_store.validation import base_module_shapes
from service import metrics
from service.api import admin_protocol as a
from service.api.auth import require_admin
from service.api.errors import APIError
from service.patch_admin import PatchAdmin
from service.update_jobs import gate_for

_FORM_FIELDS = {"base", "reason", "activate", "alias"}
_MULTIPART_SLACK = 256 << 10
_EVALSET_LIMIT = 16 << 20  # boundaries, part headers, the config file and form fields


def _checkpoint_dir(path: str, param: str) -> Path:
    """The absolute checkpoint directory at `path` on this server, or a 422 naming `param`."""
    try:
        resolved = Path(path).resolve()
        if (resolved / "config.json").is_file():
            return resolved
    except (OSError, ValueError):  # a name too long for the filesystem, a NUL byte
        pass
    raise APIError(422, f"{path[:200]!r} is not a checkpoint directory on this server (no config.json)", param=param)


def _actor(key: ApiKey) -> str:
    return f"key:{key.name}:{key.id}"


def admin_router(registry: Registry, patches: PatchAdmin, keys: ApiKeyStore, evals: EvaluationStore,
                 jobs: JobQueue, rollouts: Rollouts, max_upload_bytes: int, max_rank: int) -> APIRouter:
    """The `/admin` routes over one replica's registry, patch operations, key store, evaluations and jobs."""
    router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])

    async def _move(alias: str, patch: str, version: int, actor: str, reason: str, force: bool) -> JSONResponse:
        """Move now (200 with the alias) or, when the gate applies, queue evaluate → gate → move (202, the job)."""
        if force and not reason.strip():
            raise APIError(400, "a forced activation skips the gate and needs a reason", param="reason")
        if force or not await asyncio.to_thread(patches.needs_gate, alias, patch, version):
            pointer = await patches.activate(alias, patch, version, actor, reason, forced=force)
            return JSONResponse(a.Alias.of(pointer).model_dump(), status_code=200)
        if await asyncio.to_thread(registry.get_version, patch, version) is None:
            raise APIError(404, f"no version {patch}@{version}", code="not_found")
        job = await asyncio.to_thread(jobs.submit, "activate", {"alias": alias, "patch": patch, "version": version,
                                                                "reason": reason}, actor)
        return _accepted(job)

    # -- bases and patches ----------------------------------------------------------------------------
    @router.get("/bases")
    async def bases() -> list[a.Base]:
        return [a.Base(**vars(b)) for b in await asyncio.to_thread(registry.list_bases)]

    @router.post("/bases", status_code=202)
    async def base_register(body: a.BaseRequest, key: ApiKey = Depends(require_admin)) -> JSONResponse:
        """Register a new base release, then queue the port job: every alias's patch carried to it and measured."""
        checkpoint = _checkpoint_dir(body.path, "path")
        try:
            shapes = base_module_shapes(json.loads((checkpoint / "config.json").read_text()))
        except (ValueError, KeyError) as exc:
            raise APIError(422, f"cannot read the base's config: {exc}", param="path") from None
        record = await asyncio.to_thread(registry.register_base, body.name, body.version,
                                         path=str(checkpoint), module_shapes=shapes,
                                         actor=_actor(key))
        job = await asyncio.to_thread(jobs.submit, "port", {"base": record.name, "move": body.move}, _actor(key))
        return _accepted(job, base=a.Base(**vars(record)).model_dump())

    @router.get("/patches")
    async def patches_list() -> list[a.Patch]:
        return await asyncio.to_thread(lambda: [_patch(registry, n) for n in registry.list_patches()])

    @router.get("/patches/{name}")
    async def patch_show(name: str) -> a.Patch:
        if name not in await asyncio.to_thread(registry.list_patches):
            raise APIError(404, f"no patch {name!r}", code="not_found")
        return await asyncio.to_thread(_patch, registry, name)

    @router.post("/patches/{name}/versions", status_code=201)
    async def upload(name: str, request: Request, key: ApiKey = Depends(require_admin)) -> JSONResponse:
        """Multipart: the files `adapter_config.json` and `adapter_model.safetensors`; fields `base`, `reason`."""
        length = int(request.headers.get("content-length") or 0)
        if length > max_upload_bytes + _MULTIPART_SLACK:
            raise APIError(413, f"the upload is {length} bytes; the limit is {max_upload_bytes}", code="too_large")
        try:
            form = await request.form(max_files=4, max_fields=8)
        except MultiPartException as exc:
            raise APIError(400, f"not a valid multipart upload: {exc.message}") from None
        try:
            parts, fields = [], {}
            for field, value in form.multi_items():
                if isinstance(value, UploadFile):
                    parts.append((value.filename or field, value.file))
                elif field in _FORM_FIELDS:
                    fields[field] = value
                else:
                    raise APIError(400, f"unknown form field {field!r}; known: files, "
                                        f"{', '.join(sorted(_FORM_FIELDS))}", param=field)
            activate = fields.get("activate", "false").strip().lower()
            if activate not in ("true", "false"):
                raise APIError(400, "activate must be true or false", param="activate")
            alias = fields.get("alias") or name
            record = await patches.upload(name, parts, fields.get("base"), _actor(key), fields.get("reason", ""))
        finally:
            await form.close()
        body = a.Version.of(record).model_dump()
        if activate == "true":  # validated above; now evaluate → gate → activate (or at once for a new alias)
            moved = await _move(alias, name, record.version, _actor(key), fields.get("reason", ""), False)
            body["activation"] = json.loads(moved.body)
        return JSONResponse(body, status_code=201,
                            headers={"location": f"/admin/patches/{name}/versions/{record.version}"})

    @router.get("/patches/{name}/versions/{version}")
    async def version_show(name: str, version: int) -> a.Version:
        record = await asyncio.to_thread(registry.get_version, name, version)
        if record is None:
            raise APIError(404, f"no version {name}@{version}", code="not_found")
        return a.Version.of(record)

    @router.delete("/patches/{name}/versions/{version}")
    async def version_delete(name: str, version: int, reason: str = "",
                             key: ApiKey = Depends(require_admin)) -> a.Version:
        return a.Version.of(await patches.delete(name, version, _actor(key), reason))

    # -- aliases --------------------------------------------------------------------------------------
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
        return await _move(alias, body.patch or alias, body.version, _actor(key), body.reason, body.force)

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
                                      _actor(key))
        return _accepted(job)

    @router.put("/aliases/{alias}/rollout")
    async def rollout_start(alias: str, body: a.RolloutRequest, key: ApiKey = Depends(require_admin)) -> dict:
        """Try a version on part of the alias's traffic (canary) or on a mirror of it (shadow)."""
        if body.mode == "canary" and body.percent <= 0:
            raise APIError(400, "a canary needs a percent above 0", param="percent")
        started = await asyncio.to_thread(rollouts.start, alias, body.patch or alias, body.version, body.mode,
                                          body.percent, body.min_agreement, body.min_requests, _actor(key),
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
        stopped = await asyncio.to_thread(rollouts.stop, alias, _actor(key), reason)
        metrics.rollouts_stopped.labels(alias, "operator").inc()
        return {**asdict(stopped), "stopped": True}

    @router.put("/aliases/{alias}/evalset")
    async def evalset_put(alias: str, request: Request, metric: str = "exact_match",
                          key: ApiKey = Depends(require_admin)) -> dict:
        """The alias's evaluation set: a JSONL body of {"prompt", "reference"} rows; `metric` exact_match or rouge_l."""
        if not is_safe_name(alias):
            raise APIError(400, f"alias name {alias!r} must be {NAME_RULE}", param="alias")
        data = await request.body()
        if len(data) > _EVALSET_LIMIT:
            raise APIError(413, f"the set is {len(data)} bytes; the limit is {_EVALSET_LIMIT}", code="too_large")
        try:
            rows = parse_rows(data)
            return await asyncio.to_thread(evals.attach_evalset, alias, rows, metric, _actor(key))
        except (ValueError, UnicodeDecodeError) as exc:
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
        return a.Alias.of(await patches.rollback(alias, body.version, _actor(key), body.reason))

    # -- audit and keys -------------------------------------------------------------------------------
    @router.get("/audit")
    async def audit(limit: int = Query(100, ge=1, le=10_000), since: str | None = None) -> list[a.AuditEntry]:
        entries = await asyncio.to_thread(registry.audit, limit, _since(since))
        return [a.AuditEntry(**vars(e)) for e in entries]

    @router.post("/patches/{name}/extract", status_code=202)
    async def extract(name: str, body: a.ExtractRequest, key: ApiKey = Depends(require_admin)) -> JSONResponse:
        """Queue the extraction of a LoRA patch (truncated SVD at `rank`) from a full fine-tune of a base."""
        if not is_safe_name(name):
            raise APIError(400, f"patch name {name!r} must be {NAME_RULE}", param="name")
        if body.rank > max_rank:
            raise APIError(422, f"rank {body.rank} is above the engine's limit of {max_rank}", param="rank")
        base = body.base or patches.served_base
        if await asyncio.to_thread(registry.get_base, base) is None:
            raise APIError(422, f"unknown base {base!r}", param="base")
        checkpoint = _checkpoint_dir(body.checkpoint, "checkpoint")
        job = await asyncio.to_thread(jobs.submit, "extract", {"name": name, "base": base, "rank": body.rank,
                                                               "checkpoint": str(checkpoint),
                                                               "reason": body.reason}, _actor(key))
        return _accepted(job)

    @router.get("/patches/{name}/versions/{version}/compat")
    async def compat(name: str, version: int, items: bool = True) -> dict:
        """The compatibility report of a version (its latest evaluation), with per-item rows unless items=false."""
        report = await asyncio.to_thread(evals.report, name, version, items)
        if report is None:
            raise APIError(404, f"{name}@{version} has no compatibility report yet", code="not_found")
        return report

    # -- jobs -----------------------------------------------------------------------------------------
    @router.get("/jobs")
    async def jobs_list(limit: int = Query(50, ge=1, le=500)) -> list[a.JobView]:
        return [a.JobView.of(j) for j in await asyncio.to_thread(jobs.recent, limit)]

    @router.get("/jobs/dead-letters")
    async def dead_letters(limit: int = Query(100, ge=1, le=1000)) -> list[dict]:
        return await asyncio.to_thread(jobs.dead_letters, limit)

    @router.get("/jobs/{job_id}")
    async def job_show(job_id: str) -> a.JobView:
        job = await asyncio.to_thread(jobs.get, job_id)
        if job is None:
            raise APIError(404, f"no job {job_id!r}", code="not_found")
        return a.JobView.of(job)

    @router.get("/keys")
    async def keys_list() -> list[a.Key]:
        return [a.Key(**_public(k)) for k in await asyncio.to_thread(keys.list)]

    @router.post("/keys", status_code=201)
    async def key_create(body: a.KeyRequest, key: ApiKey = Depends(require_admin)) -> a.NewKey:
        try:
            record, secret = await asyncio.to_thread(keys.create, body.role, body.name, _actor(key))
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

    return router


def _accepted(job, **extra) -> JSONResponse:
    return JSONResponse({**extra, "job": a.JobView.of(job).model_dump()}, status_code=202,
                        headers={"location": f"/admin/jobs/{job.id}"})


def _patch(registry: Registry, name: str) -> a.Patch:
    pointing = [p.alias for p in registry.list_aliases() if p.patch == name]
    return a.Patch(name=name, versions=[a.Version.of(v) for v in registry.list_versions(name)], aliases=pointing)


def _public(key: ApiKey) -> dict:
    return {"id": key.id, "name": key.name, "role": key.role, "created_at": key.created_at,
            "created_by": key.created_by}


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


