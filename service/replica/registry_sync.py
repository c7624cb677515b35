"""Keeps this replica's resolver and engine in step with the registry: events, plus a periodic reconcile.

The registry's pub/sub event says *that* something changed; what changed is always read back from
Redis, so events that arrive late or out of order can never move an alias backwards. A missed event
is repaired by the reconcile that runs every `reconcile_interval_s`. An alias is moved here only after
its new version is loaded, so no request is ever admitted on a version the engine lacks; the version it
leaves stays resident (the alias's previous version) so that a rollback is a pointer move.

All state changes happen on the event loop under one lock; Redis calls run in a thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

import redis
import redis.asyncio as aioredis

from adapters_store.memories import Memories, MemoryVersion
from adapters_store.registry import AliasPointer, PatchVersion, Registry
from adapters_store.rollouts import Rollouts
from service import metrics
from service.replica.adapter_pool import AdapterPool, MemoryPool
from service.replica.kv_state import KVState
from service.replica.resolver import Resolver, Trial

log = logging.getLogger("patchserve.sync")


def _reason(pointer: AliasPointer) -> str:
    # A bounded label: who moved it, not the free-text reason (which the audit log keeps).
    return "automatic" if pointer.action == "auto_rollback" else "operator"  # force_activate is an operator's


class RegistrySync:
    """Applies the registry's aliases and versions to one replica's resolver and adapter pool."""

    def __init__(self, registry: Registry, resolver: Resolver, pool: AdapterPool, served_base: str,
                 redis_url: str, interval_s: float = 1.0, rollouts: Rollouts | None = None,
                 events_client: Callable[[], aioredis.Redis] | None = None,
                 memory_pool: MemoryPool | None = None, kv: KVState | None = None):
        self.registry = registry
        self.memories = Memories(registry)
        self.memory_pool = memory_pool
        self.kv = kv  # KV policies follow the same events and reconcile (applied after the aliases they name)
        self.rollouts = rollouts or Rollouts(registry)
        self.resolver = resolver
        self.pool = pool
        self.served_base = served_base
        self.redis_url = redis_url
        # A new client per subscription: under Sentinel each one connects to the primary of the moment.
        self.events_client = events_client or (lambda: aioredis.Redis.from_url(redis_url))
        self.interval_s = interval_s
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self.last_reconcile = 0.0
        self.registry_reachable = True  # as of the last reconcile

    async def start(self) -> None:
        """Apply the registry's state once (aliases at their recorded versions), then follow it."""
        await self.reconcile()
        self._tasks = [asyncio.create_task(self._listen(), name="registry-events"),
                       asyncio.create_task(self._periodic(), name="registry-reconcile")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def reconcile(self) -> None:
        """Read versions and every alias pointer from Redis and apply whatever differs here."""
        # Read under the lock: a snapshot read before another apply and applied after it would move an alias back.
        async with self._lock:
            try:
                snapshot, versions, previous, trials, memories = await asyncio.to_thread(self._read_all)
            except redis.RedisError as exc:
                self.registry_reachable = False
                metrics.redis_up.set(0)
                log.warning("registry unreachable; serving the last known state",
                            extra={"fields": {"error": str(exc)}})
                return
            self.registry_reachable = True
            metrics.redis_up.set(1)
            self.resolver.versions = versions
            for alias in [a for a in {*self.resolver.aliases, *self.resolver.elsewhere} if a not in snapshot]:
                self._forget(alias)
            for pointer in snapshot.values():
                if await self._apply(pointer) and self.last_reconcile:
                    metrics.registry_repairs.inc()  # not the first apply at start: an event went missing
            await self._apply_rollouts(trials)
            await self._keep(previous)
            await self._apply_memories(*memories)
            await self._apply_kv()
        self.last_reconcile = time.time()

    async def _apply_kv(self) -> None:
        if self.kv is None:
            return
        try:
            records = await asyncio.to_thread(self.kv.read)
        except redis.RedisError:
            return  # the registry away: the policies in force stay; the next reconcile reads them again
        await self.kv.apply(records)

    async def sync_alias(self, alias: str) -> None:
        """Read one alias's pointer back from Redis and apply it (after a move here or an event)."""
        async with self._lock:
            pointer, record, previous = await asyncio.to_thread(self._read_alias, alias)
            if record is not None:
                self.resolver.versions.setdefault(record.name, {})[record.version] = record
            if pointer is None:
                self._forget(alias)
            else:
                await self._apply(pointer)
            await self._keep(previous)

    # -- reading (in a thread) ------------------------------------------------------------------------
    def _read_all(self):
        snapshot = self.registry.snapshot()
        versions = {name: {v.version: v for v in self.registry.list_versions(name)}
                    for name in self.registry.list_patches()}
        return snapshot, versions, self._previous_versions(snapshot), self.rollouts.all(), self._read_memories()

    def _read_memories(self) -> tuple[dict[str, str], dict[str, MemoryVersion | None], list[MemoryVersion]]:
        """Targets, the active version of each memory of this base (None: none), and each one's previous version."""
        targets = self.memories.targets()
        active: dict[str, MemoryVersion | None] = {}
        previous: list[MemoryVersion] = []
        records = {m.name: m for m in self.memories.list() if m.base == self.served_base}
        for name, pointer in self.memories.pointers().items():
            if name not in records:
                continue
            active[name] = self.memories.get_version(name, pointer.version) if pointer.version else None
            history = self.memories.history(name)
            if history and history[-1].from_version:
                before = self.memories.get_version(name, history[-1].from_version)
                if before is not None:
                    previous.append(before)
        return targets, active, previous

    def _read_alias(self, alias: str):
        pointer = self.registry.get_alias(alias)
        record = self.registry.get_version(pointer.patch, pointer.version) if pointer else None
        return pointer, record, self._previous_versions()

    def _previous_versions(self, snapshot: dict[str, AliasPointer] | None = None) -> list[PatchVersion]:
        """Each alias's previous version (what a rollback would return to), kept resident for a fast rollback."""
        out = []
        for alias in snapshot or self.registry.snapshot():
            last = self.registry.last_move(alias)
            if last and last.from_patch:
                record = self.registry.get_version(last.from_patch, last.from_version)
                if record is not None and record.base == self.served_base:
                    out.append(record)
        return out

    # -- applying (on the loop, under the lock) -------------------------------------------------------
    async def _apply(self, pointer: AliasPointer) -> bool:
        """Serve `pointer` here (load first, then move); True when the alias moved."""
        if self.resolver.aliases.get(pointer.alias) == (pointer.patch, pointer.version):
            return False
        if pointer.base != self.served_base:
            # A gateway of that base serves it (base upgrades); here it answers 421, never an old version.
            if self.resolver.elsewhere.get(pointer.alias) == pointer.base:
                return False
            self._forget(pointer.alias)
            self.resolver.elsewhere[pointer.alias] = pointer.base
            log.warning("alias moved to a base this gateway does not host",
                        extra={"fields": {"alias": pointer.alias, "base": pointer.base}})
            return True
        version = self.resolver.versions.setdefault(pointer.patch, {}).get(pointer.version)
        if version is None:
            record = await asyncio.to_thread(self.registry.get_version, pointer.patch, pointer.version)
            if record is None:
                return False
            version = self.resolver.versions[pointer.patch][pointer.version] = record
        await self.pool.ensure(version)  # loaded first …
        self.resolver.elsewhere.pop(pointer.alias, None)
        before = self.resolver.pointer(pointer.alias)
        self.resolver.aliases[pointer.alias] = (pointer.patch, pointer.version)  # … then the alias moves here
        if before is not None:
            metrics.alias_active.remove(pointer.alias, before.name, str(before.version), before.base)
            metrics.hot_swaps.labels(pointer.alias, pointer.action, _reason(pointer)).inc()
        metrics.alias_active.labels(pointer.alias, pointer.patch, str(pointer.version), pointer.base).set(1)
        log.info("alias moved", extra={"fields": {"alias": pointer.alias, "to": pointer.ref,
                                                  "from": before.ref if before else None}})
        return True

    async def _apply_rollouts(self, trials: dict) -> None:
        """Serve each alias's rollout candidate here (loaded first); drop rollouts that ended."""
        for alias in [a for a in self.resolver.rollouts if a not in trials]:
            del self.resolver.rollouts[alias]
        for alias, r in trials.items():
            candidate = self.resolver.versions.get(r.patch, {}).get(r.version)
            if candidate is None or candidate.base != self.served_base or alias not in self.resolver.aliases:
                self.resolver.rollouts.pop(alias, None)
                continue
            trial = Trial(r, candidate)
            if self.resolver.rollouts.get(alias) != trial:
                await self.pool.ensure(candidate)
                self.resolver.rollouts[alias] = trial

    async def _apply_memories(self, targets: dict[str, str], active: dict[str, MemoryVersion | None],
                              previous: list[MemoryVersion]) -> None:
        """Serve each memory's active version here (loaded first, then resolved); keep the previous ones loaded."""
        if self.memory_pool is None or self.memory_pool.engine.memory_layer is None:
            return
        wanted = {v.ref: v for v in previous}
        wanted.update({v.ref: v for v in active.values() if v is not None})
        try:
            # Slots are few: idle versions nobody wants leave before new ones come in.
            await self.memory_pool.keep(wanted, unload_first=True)
        except Exception as exc:  # full slots, a file the engine refuses: serve what is loaded
            log.error("memory versions could not be loaded", extra={"fields": {"error": str(exc)}})
        for name in [n for n in self.resolver.memories if active.get(n) is None]:
            gone = self.resolver.memories.pop(name)
            metrics.memory_active.remove(name, str(gone.version), gone.base)
            log.info("memory moved", extra={"fields": {"memory": name, "to": None, "from": gone.ref}})
        for name, version in active.items():
            current = self.resolver.memories.get(name)
            if version is None or current == version:
                continue
            if not self.memory_pool.is_loaded(version.ref):
                continue  # the old version serves on until the new one is loaded
            self.resolver.memories[name] = version
            if current is not None:
                metrics.memory_active.remove(name, str(current.version), current.base)
            metrics.memory_active.labels(name, str(version.version), version.base).set(1)
            log.info("memory moved", extra={"fields": {"memory": name, "to": version.ref,
                                                       "from": current.ref if current else None}})
        for name in active:
            served = self.resolver.memories.get(name)
            metrics.memory_edits.labels(name).set(len(served.edits) if served else 0)
        self.resolver.memory_targets = targets

    def _forget(self, alias: str) -> None:
        before = self.resolver.pointer(alias)
        self.resolver.aliases.pop(alias, None)
        self.resolver.elsewhere.pop(alias, None)
        if before is not None:
            metrics.alias_active.remove(alias, before.name, str(before.version), before.base)

    async def _keep(self, previous: list[PatchVersion]) -> None:
        wanted = {v.ref: v for v in previous if v.version in self.resolver.versions.get(v.name, {})}
        for alias in self.resolver.aliases:
            active = self.resolver.pointer(alias)
            wanted[active.ref] = active
        for trial in self.resolver.rollouts.values():
            wanted[trial.candidate.ref] = trial.candidate
        await self.pool.keep(wanted)

    # -- following ------------------------------------------------------------------------------------
    async def _listen(self) -> None:
        while True:
            try:
                async with self.events_client() as client, client.pubsub() as pubsub:
                    await pubsub.subscribe(self.registry.channel)
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            await self._on_event(json.loads(message["data"]))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis gone: the periodic reconcile covers the gap; retry the channel
                log.warning("registry events lost; resubscribing", extra={"fields": {"error": repr(exc)}})
                await asyncio.sleep(self.interval_s)

    async def _on_event(self, event: dict) -> None:
        if event.get("type") == "alias_moved":
            await self.sync_alias(event["alias"])
        elif event.get("type") in ("version_created", "version_deleted", "rollout_changed", "memory_changed"):
            await self.reconcile()
        elif event.get("type") == "kv_policy_changed":
            async with self._lock:
                await self._apply_kv()

    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconcile failed")
