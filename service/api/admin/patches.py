"""Patches and their versions: list, upload, show, delete, the compatibility report, extraction from a fine-tune."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from adapters_store.keys import ApiKey
from adapters_store.names import NAME_RULE, is_safe_name
from adapters_store.registry import Registry
from service.api.admin import protocol as a
from service.api.admin.context import AdminContext, accepted, actor_of, checkpoint_dir
from service.api.auth import require_admin
from service.api.errors import APIError

_FORM_FIELDS = {"base", "reason", "activate", "alias"}
_MULTIPART_SLACK = 256 << 10  # boundaries, part headers, the config file and form fields


def routes(router: APIRouter, ctx: AdminContext) -> None:
    """Add the patches routes to the /admin router."""
    registry, patches, evals, jobs = ctx.registry, ctx.patches, ctx.evals, ctx.jobs
    max_upload_bytes, max_rank = ctx.max_upload_bytes, ctx.max_rank

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
        """Multipart: the files `adapter_config.json` and `adapter_model.safetensors`; fields `base`, `reason`.

        The body streams to disk (each file part spools to a temporary file past 1 MiB), so memory
        stays flat whatever the size; the limit is checked on the bytes as they arrive, so a chunked
        upload without Content-Length is refused as soon as it passes the limit.
        """
        limit = max_upload_bytes + _MULTIPART_SLACK
        length = int(request.headers.get("content-length") or 0)
        if length > limit:
            raise APIError(413, f"the upload is {length} bytes; the limit is {max_upload_bytes}", code="too_large")
        if "multipart/form-data" not in request.headers.get("content-type", ""):
            raise APIError(400, "not a valid multipart upload: send multipart/form-data with the adapter's files")
        try:
            form = await MultiPartParser(request.headers, _limited(request.stream(), limit, max_upload_bytes),
                                         max_files=4, max_fields=8).parse()
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
            record = await patches.upload(name, parts, fields.get("base"), actor_of(key), fields.get("reason", ""))
        finally:
            await form.close()
        body = a.Version.of(record).model_dump()
        if activate == "true":  # validated above; now evaluate → gate → activate (or at once for a new alias)
            moved = await ctx.move(alias, name, record.version, actor_of(key), fields.get("reason", ""), False)
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
        return a.Version.of(await patches.delete(name, version, actor_of(key), reason))

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
        checkpoint = checkpoint_dir(body.checkpoint, "checkpoint")
        job = await asyncio.to_thread(jobs.submit, "extract", {"name": name, "base": base, "rank": body.rank,
                                                               "checkpoint": str(checkpoint),
                                                               "reason": body.reason}, actor_of(key))
        return accepted(job)

    @router.get("/patches/{name}/versions/{version}/compat")
    async def compat(name: str, version: int, items: bool = True) -> dict:
        """The compatibility report of a version (its latest evaluation), with per-item rows unless items=false."""
        report = await asyncio.to_thread(evals.report, name, version, items)
        if report is None:
            raise APIError(404, f"{name}@{version} has no compatibility report yet", code="not_found")
        return report


async def _limited(stream: AsyncIterator[bytes], limit: int, announced_limit: int) -> AsyncIterator[bytes]:
    """`stream`, refused with 413 once more than `limit` bytes have arrived."""
    size = 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the upload passed the limit of {announced_limit} bytes", code="too_large")
        yield chunk


def _patch(registry: Registry, name: str) -> a.Patch:
    pointing = [p.alias for p in registry.list_aliases() if p.patch == name]
    return a.Patch(name=name, versions=[a.Version.of(v) for v in registry.list_versions(name)], aliases=pointing)
