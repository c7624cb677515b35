"""The router's view of the cluster: live replicas (heartbeats) and where each model name lives (registry).

Read from Redis every `refresh_s` in one thread, so a request never waits on Redis: routing a
request is a dictionary lookup. A view a moment old is safe — a gateway that no longer serves an
alias answers 421 and the router looks again (`lookup_fresh`) — and when Redis is away the last
view stays in use, so a registry outage stops no request.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field

import redis

from adapters_store.registry import Registry
from adapters_store.replicas import ReplicaDirectory, ReplicaInfo
from service import metrics

log = logging.getLogger("patchserve.router")


@dataclass
class View:
    replicas: list[ReplicaInfo] = field(default_factory=list)
    alias_base: dict[str, str] = field(default_factory=dict)  # alias → the base its version is built on
    read_at: float = 0.0


class RoutingTable:
    """Which replicas may take a request for a model name, from a view refreshed in the background."""

    def __init__(self, directory: ReplicaDirectory, registry: Registry, refresh_s: float = 0.25):
        self.directory = directory
        self.registry = registry
        self.refresh_s = refresh_s
        self.view = View()
        # replica id → the start time of the process that refused a connection: skipped until a new
        # process announces itself under that id (a restart), or its heartbeat expires (it died).
        self._down: dict[str, float] = {}
        self._gauge_bases: set[str] = set()  # so a base that lost every replica reads 0, not its last count
        self._version_base: dict[str, str] = {}  # "patch@N" → base: versions never change, so never expire
        self._task: asyncio.Task | None = None
        self._failing = False
        self.in_flight: dict[str, int] = {}  # replica id → requests this router has open on it

    async def start(self) -> None:
        """Read the view once, then keep it fresh."""
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="routing-table")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self.refresh()

    async def refresh(self) -> None:
        """Read replicas and alias pointers from Redis; keep the last view if Redis is away."""
        try:
            replicas, pointers = await asyncio.to_thread(self._read)
        except redis.RedisError as exc:
            if not self._failing:
                log.warning("registry unreachable; routing on the last known view",
                            extra={"fields": {"error": str(exc)}})
            self._failing = True
            return
        self._failing = False
        self.view = View(replicas=replicas, alias_base={p.alias: p.base for p in pointers}, read_at=time.time())
        self._gauge_bases |= {r.base for r in replicas}
        for base in self._gauge_bases:
            metrics.router_replicas.labels(base).set(sum(1 for r in replicas if r.base == base and r.routable))

    def _read(self):
        return self.directory.live(), self.registry.list_aliases()

    @property
    def registry_reachable(self) -> bool:
        return not self._failing

    def base_of(self, model: str) -> str | None:
        """The base that serves `model` as this view has it (None: unknown here; a gateway will say 404)."""
        for replica in self.view.replicas:
            if model in replica.names:
                return replica.base
        if model in self.view.alias_base:
            return self.view.alias_base[model]
        return self._version_base.get(model) or self._pinned_base(model)

    def _pinned_base(self, model: str) -> str | None:
        name, sep, number = model.partition("@")
        if not (sep and number.isdigit()):
            return None
        try:
            record = self.registry.get_version(name, int(number))
        except redis.RedisError:
            return None
        if record is not None:
            self._version_base[model] = record.base
            return record.base
        return None

    def lookup_fresh(self, model: str) -> str | None:
        """The base of `model` read from Redis now (after a gateway said it moved); falls back to the view."""
        try:
            pointer = self.registry.get_alias(model)
        except redis.RedisError:
            pointer = None
        if pointer is not None:
            self.view.alias_base[model] = pointer.base
            return pointer.base
        return self.base_of(model)

    def candidates(self, base: str | None) -> list[ReplicaInfo]:
        """Routable replicas for `base` (any base when None), least busy first, ties broken at random."""
        found = [r for r in self.view.replicas
                 if r.routable and (base is None or r.base == base) and self._down.get(r.id) != r.started_at]
        random.shuffle(found)
        return sorted(found, key=lambda r: self.in_flight.get(r.id, 0))

    def mark_down(self, replica: ReplicaInfo) -> None:
        """Skip a replica that refused a connection (see `_down`)."""
        self._down[replica.id] = replica.started_at

    def models(self) -> list[tuple[str, str]]:
        """(name, base) of every base name a live replica answers to and every alias whose base is served."""
        served = {r.base for r in self.view.replicas if r.routable}
        names = {(n, r.base) for r in self.view.replicas if r.routable for n in r.names}
        names |= {(alias, base) for alias, base in self.view.alias_base.items() if base in served}
        return sorted(names)

