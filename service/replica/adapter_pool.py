"""Which patch versions (and, through MemoryPool, memory versions) are loaded in the engine, and when one may leave.

A request holds a lease on the version it was admitted with until its last token; a version is
removed from the engine only when no lease is left and it is no longer wanted (not active, not the
previous version of an alias, which stays resident so a rollback is only a pointer move). Loads and
unloads of one version are serialised by a per-version lock, so a request that arrives while its
version is being unloaded waits and has it loaded again rather than failing.

Everything here runs on the gateway's event loop; leases are plain counters (no awaits between
resolving a request and taking its lease, so no unload can slip in between).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from adapters_store.blobs import BlobStore, materialize
from adapters_store.memories import MemoryVersion
from adapters_store.registry import PatchVersion
from service.engines.protocol import AdapterRef, Engine, MemoryRef
from service.memory.memory_file import FILE_NAME

log = logging.getLogger("patchserve.adapters")


@dataclass
class _Slot:
    leases: int = 0
    loaded: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class AdapterPool:
    """The engine's resident adapters, with leases held by requests and a set of versions to keep."""

    def __init__(self, engine: Engine, blobs: BlobStore, versions_dir: Path):
        self.engine = engine
        self.blobs = blobs
        self.versions_dir = Path(versions_dir)
        self._slots: dict[str, _Slot] = {}
        self._wanted: dict[str, PatchVersion] = {}

    def _slot(self, name: str) -> _Slot:
        return self._slots.setdefault(name, _Slot())

    kind = "adapter"

    def ref(self, version: PatchVersion) -> AdapterRef:
        """How a request names `version` to the engine."""
        return AdapterRef(name=version.ref, path=str(self.versions_dir / version.ref))

    async def _load(self, version: PatchVersion) -> None:
        ref = self.ref(version)
        await asyncio.to_thread(materialize, self.blobs, version.files, Path(ref.path))
        await self.engine.add_adapter(ref)

    async def _unload(self, name: str) -> None:
        await self.engine.remove_adapter(name)

    def leases_held(self) -> dict[str, int]:
        """Engine name → requests holding it now (only names with at least one)."""
        return {n: s.leases for n, s in self._slots.items() if s.leases}

    async def ensure(self, version: PatchVersion) -> None:
        """Load `version` into the engine if it is not there (materialising its files from the blob store)."""
        slot = self._slot(version.ref)
        if slot.loaded:
            return
        async with slot.lock:
            if slot.loaded:
                return
            await self._load(version)
            slot.loaded = True
            log.info(f"{self.kind} loaded", extra={"fields": {self.kind: version.ref}})

    def acquire(self, name: str) -> None:
        """Take a lease: `name` stays loaded until the matching release."""
        self._slot(name).leases += 1

    def release(self, name: str) -> None:
        """Give a lease back; the last one out of an unwanted version unloads it."""
        slot = self._slots[name]
        slot.leases -= 1
        if slot.leases == 0 and name not in self._wanted:
            asyncio.get_running_loop().create_task(self._unload_if_idle(name))

    async def keep(self, wanted: dict[str, PatchVersion], unload_first: bool = False) -> None:
        """Make exactly `wanted` (engine name → version) the versions kept resident: load them, unload idle others.

        `unload_first`: idle unwanted versions leave before wanted ones load (an engine with few slots).
        """
        self._wanted = dict(wanted)
        idle = lambda: [n for n, s in self._slots.items() if n not in wanted and s.leases == 0]  # noqa: E731
        if unload_first:
            for name in idle():
                await self._unload_if_idle(name)
        for version in wanted.values():
            await self.ensure(version)
        for name in idle():
            await self._unload_if_idle(name)

    def is_loaded(self, name: str) -> bool:
        """Whether `name` is in the engine now."""
        slot = self._slots.get(name)
        return slot is not None and slot.loaded

    async def _unload_if_idle(self, name: str) -> None:
        slot = self._slots.get(name)
        if slot is None:
            return
        async with slot.lock:
            # Checked under the lock: a request may have taken a lease while we waited for it.
            if slot.leases or name in self._wanted:
                return
            if slot.loaded:
                # Not loaded from here on: a request arriving during the removal must wait for the lock
                # and load it again, not take the lock-free path into an engine that is dropping it.
                slot.loaded = False
                await self._unload(name)
                log.info(f"{self.kind} unloaded", extra={"fields": {self.kind: name}})
            if not slot.leases and self._slots.get(name) is slot:
                del self._slots[name]


class MemoryPool(AdapterPool):
    """The engine's resident side-memory versions (in its memory slots), with the same leases and keeping.

    A slot is freed only when no request admitted with its version is left, so no request ever meets
    another version in the slot it was admitted with.
    """

    kind = "memory"

    def ref(self, version: MemoryVersion) -> MemoryRef:
        return MemoryRef(key=version.ref, path=str(self.versions_dir / version.ref / FILE_NAME))

    async def _load(self, version: MemoryVersion) -> None:
        ref = self.ref(version)
        await asyncio.to_thread(materialize, self.blobs, version.files, Path(ref.path).parent)
        await self.engine.add_memory(ref)

    async def _unload(self, name: str) -> None:
        await self.engine.remove_memory(name)
