"""What the /admin routes share: the replica's store parts and patch operations, and small replies."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse

from adapters_store.blobs import BlobStore
from adapters_store.evaluation import EvaluationStore
from adapters_store.jobs import JobQueue
from adapters_store.keys import ApiKey, ApiKeyStore
from adapters_store.kv_policies import KVPolicies
from adapters_store.memories import Memories
from adapters_store.names import NAME_RULE, is_safe_name
from adapters_store.registry import Registry
from adapters_store.replicas import ReplicaDirectory
from adapters_store.rollouts import Rollouts
from service.api.admin import protocol as a
from service.api.errors import APIError
from service.replica.patch_admin import PatchAdmin
from service.replica.registry_sync import RegistrySync

T = TypeVar("T")


@dataclass
class AdminContext:
    registry: Registry
    patches: PatchAdmin
    keys: ApiKeyStore
    evals: EvaluationStore
    jobs: JobQueue
    rollouts: Rollouts
    max_upload_bytes: int
    max_rank: int
    replicas: ReplicaDirectory
    memories: Memories
    sync: RegistrySync  # applies a memory move here before the route answers
    base: str  # the base this gateway hosts (a new memory's default)
    blobs: BlobStore
    kv: KVPolicies | None = None

    async def move(self, alias: str, patch: str, version: int, actor: str, reason: str, force: bool) -> JSONResponse:
        """Move now (200 with the alias) or, when the gate applies, queue evaluate → gate → move (202, the job)."""
        if force and not reason.strip():
            raise APIError(400, "a forced activation skips the gate and needs a reason", param="reason")
        if await asyncio.to_thread(self.registry.get_alias, alias) is None:
            # A new alias may not take a name a live gateway answers to as its base (`tiny`); registered
            # bases are refused inside the registry's own move script.
            taken = {n for r in await asyncio.to_thread(self.replicas.live) for n in r.names}
            if alias in taken:
                raise APIError(409, f"{alias} is the name of a base; choose another name for the alias",
                               param="alias", code="conflict")
        if force or not await asyncio.to_thread(self.patches.needs_gate, alias, patch, version):
            pointer = await self.patches.activate(alias, patch, version, actor, reason, forced=force)
            return JSONResponse(a.Alias.of(pointer).model_dump(), status_code=200)
        record = await asyncio.to_thread(self.registry.get_version, patch, version)
        if record is None:
            raise APIError(404, f"no version {patch}@{version}", code="not_found")
        # Said now rather than after an evaluation: the job would refuse the move at its end anyway.
        await asyncio.to_thread(self.replicas.require_host, record.base)
        job = await asyncio.to_thread(self.jobs.submit, "activate", {"alias": alias, "patch": patch, "version": version,
                                                                "reason": reason}, actor)
        return accepted(job)


_JSONL_LIMIT = 16 << 20


async def jsonl_body(request: Request, alias: str, parse: Callable[[bytes], T], what: str) -> T:
    """A set of rows for `alias` from the request's JSONL body: 400 bad alias name, 413 too large, 422 unparseable."""
    if not is_safe_name(alias):
        raise APIError(400, f"alias name {alias!r} must be {NAME_RULE}", param="alias")
    data = await request.body()
    if len(data) > _JSONL_LIMIT:
        raise APIError(413, f"the set is {len(data)} bytes; the limit is {_JSONL_LIMIT}", code="too_large")
    try:
        return parse(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(422, f"{what} refused: {exc}", code="unprocessable") from None


def checkpoint_dir(path: str, param: str) -> Path:
    """The absolute checkpoint directory at `path` on this server, or a 422 naming `param`."""
    try:
        resolved = Path(path).resolve()
        if (resolved / "config.json").is_file():
            return resolved
    except (OSError, ValueError):  # a name too long for the filesystem, a NUL byte
        pass
    raise APIError(422, f"{path[:200]!r} is not a checkpoint directory on this server (no config.json)", param=param)


def actor_of(key: ApiKey) -> str:
    return f"key:{key.name}:{key.id}"


def accepted(job, **extra) -> JSONResponse:
    return JSONResponse({**extra, "job": a.JobView.of(job).model_dump()}, status_code=202,
                        headers={"location": f"/admin/jobs/{job.id}"})
