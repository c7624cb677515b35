"""What the admin API does to patches: upload a version, activate it on an alias, roll back, delete.

Upload order makes a crash harmless: the files are checked in a staging directory, stored as blobs
(fsynced), and only then registered by one atomic registry script. A crash before that last step
leaves unreferenced blobs at most, never a half-registered version; staging left by a crash is
removed at the next start.

Activation loads the version into this replica's engine *before* the alias moves in Redis; the other
replicas load it when the event reaches them and move their own view only once it is loaded.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import BinaryIO

from adapters_store.blobs import BlobStore, put_files
from adapters_store.errors import Conflict, Incompatible, Invalid, NotFound, TooLarge
from adapters_store.registry import AliasPointer, PatchVersion, Registry
from adapters_store.replicas import ReplicaDirectory
from adapters_store.validation import Limits, check_file_names, check_name, validate_upload
from service.replica.adapter_pool import AdapterPool
from service.replica.registry_sync import RegistrySync

_COPY_CHUNK = 1 << 20


class PatchAdmin:
    """Admin operations on one replica: the registry, the blob store, and this replica's engine."""

    def __init__(self, registry: Registry, blobs: BlobStore, pool: AdapterPool, sync: RegistrySync,
                 staging_dir: Path, limits: Limits, served_base: str, replicas: ReplicaDirectory):
        self.registry = registry
        self.replicas = replicas
        self.blobs = blobs
        self.pool = pool
        self.sync = sync
        self.staging_dir = Path(staging_dir)
        self.limits = limits
        self.served_base = served_base

    def clear_staging(self) -> None:
        """Remove what uploads interrupted by a crash left behind (never registered, so never referenced)."""
        shutil.rmtree(self.staging_dir, ignore_errors=True)
        self.staging_dir.mkdir(parents=True, exist_ok=True)

    # -- upload ---------------------------------------------------------------------------------------
    async def upload(self, name: str, parts: list[tuple[str, BinaryIO]], base: str | None, actor: str,
                     reason: str = "", meta: dict | None = None) -> PatchVersion:
        """Validate an uploaded patch and register it as the next version of `name`; nothing is kept on refusal."""
        check_name(name, "name")
        names = [file_name for file_name, _ in parts]
        if len(set(names)) != len(names):
            raise Invalid("the same file was sent twice", "files")
        check_file_names(names)  # before any byte is written: traversal names and pickles end here
        base = base or self.served_base
        record = await asyncio.to_thread(self.registry.get_base, base)
        if record is None or not record.path:
            raise Incompatible(f"unknown base {base!r}", "base")
        return await asyncio.to_thread(self._store_upload, name, parts, record, actor, reason, meta or {})

    def _store_upload(self, name, parts, base_record, actor, reason, meta) -> PatchVersion:
        staging = self.staging_dir / uuid.uuid4().hex
        staging.mkdir(parents=True)
        try:
            files = {}
            for file_name, stream in parts:
                files[file_name] = staging / file_name
                _copy_limited(stream, files[file_name], self.limits.max_weights_bytes, file_name)
            base_config = json.loads((Path(base_record.path) / "config.json").read_text())
            summary = validate_upload(name, files, base_config, self.limits)
            digests = put_files(self.blobs, files)
            return self.registry.create_version(name, base_record.name, digests, {**meta, **asdict(summary)},
                                                actor=actor, reason=reason)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # -- aliases --------------------------------------------------------------------------------------
    def needs_gate(self, alias: str, patch: str, version: int) -> bool:
        """Whether moving `alias` to `patch@version` must pass the gate first.

        Not for an alias's first version (there is nothing to compare with), nor for a version the
        alias has served before (it was vetted then; going back is an undo, like a rollback).
        """
        current = self.registry.get_alias(alias)
        if current is None or (current.patch, current.version) == (patch, version):
            return False
        return not any((h.to_patch, h.to_version) == (patch, version) for h in self.registry.alias_history(alias))

    async def activate(self, alias: str, patch: str, version: int, actor: str, reason: str = "",
                       forced: bool = False) -> AliasPointer:
        """Load `patch@version` here, then move `alias` to it atomically in the registry (no gate: see needs_gate)."""
        check_name(alias, "alias")
        record = await asyncio.to_thread(self.registry.get_version, patch, version)
        if record is None:
            raise NotFound(f"no version {patch}@{version}")
        await self._load_then(record, lambda: self.registry.activate(alias, patch, version, actor=actor,
                                                                        reason=reason, forced=forced), forced)
        await self.sync.sync_alias(alias)
        return await asyncio.to_thread(self.registry.get_alias, alias)

    async def rollback(self, alias: str, to_version: int | None, actor: str, reason: str = "") -> AliasPointer:
        """Move `alias` back to its previous version (or `to_version`), loaded here first if it is not resident."""
        current = await asyncio.to_thread(self.registry.get_alias, alias)
        if current is None:
            raise NotFound(f"no alias {alias!r}")
        if to_version is not None:
            target = (current.patch, to_version)
        else:
            last = await asyncio.to_thread(self.registry.last_move, alias)
            if last is None or last.from_patch is None:
                raise Conflict(f"alias {alias!r} has no previous version to roll back to")
            target = (last.from_patch, last.from_version)
        record = await asyncio.to_thread(self.registry.get_version, *target)
        if record is None:
            raise NotFound(f"no version {target[0]}@{target[1]}")
        await self._load_then(record, lambda: self.registry.rollback(alias, to_version, actor=actor, reason=reason))
        await self.sync.sync_alias(alias)
        return await asyncio.to_thread(self.registry.get_alias, alias)

    async def _load_then(self, record: PatchVersion, move, forced: bool = False) -> None:
        if record.base != self.served_base:
            # Another base's gateways load it when the event reaches them, and move their own view only
            # once it is loaded; here there is nothing to load. Unless forced, some replica must host it.
            if not forced:
                await asyncio.to_thread(self.replicas.require_host, record.base)
            await asyncio.to_thread(move)
            return
        version, name = record, record.ref
        # A lease for the length of the move, so no reconcile unloads the version between its load and the move.
        self.pool.acquire(name)
        try:
            try:
                await self.pool.ensure(version)
            except Exception as exc:
                raise Incompatible(f"the engine could not load {name}: {exc}") from exc
            await asyncio.to_thread(move)
        finally:
            self.pool.release(name)

    # -- versions -------------------------------------------------------------------------------------
    async def delete(self, patch: str, version: int, actor: str, reason: str = "") -> PatchVersion:
        """Delete a version no alias points to; requests already running on it finish first."""
        deleted = await asyncio.to_thread(self.registry.delete_version, patch, version, actor, reason)
        await self.sync.reconcile()
        return deleted


def _copy_limited(stream: BinaryIO, dest: Path, limit: int, file_name: str) -> None:
    size = 0
    with dest.open("wb") as out:
        while chunk := stream.read(_COPY_CHUNK):
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"{file_name} is larger than the limit of {limit} bytes", file_name)
            out.write(chunk)


