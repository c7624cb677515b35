"""This replica's heartbeat: what it hosts and whether it takes requests, re-announced before its TTL runs out.

Routers and the move guards read these announcements (adapters_store/replicas.py). A lost Redis only
stops the announcements: serving goes on, and the replica reappears with the next beat that lands.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import redis

from adapters_store.replicas import ReplicaDirectory, ReplicaInfo

log = logging.getLogger("patchserve.heartbeat")


class Heartbeat:
    """Announces `describe()` every `interval_s`, alive for `ttl_s`; withdraws it at stop."""

    def __init__(self, directory: ReplicaDirectory, describe: Callable[[], ReplicaInfo], interval_s: float,
                 ttl_s: float):
        self.directory = directory
        self.describe = describe
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self._task: asyncio.Task | None = None
        self._failing = False

    async def start(self) -> None:
        """Announce once now, then keep announcing."""
        await self.beat()
        self._task = asyncio.create_task(self._loop(), name="heartbeat")

    async def beat(self) -> None:
        """Announce the current state at once (a change such as draining need not wait for the next beat)."""
        info = self.describe()
        try:
            await asyncio.to_thread(self.directory.announce, info, self.ttl_s)
        except redis.RedisError as exc:
            if not self._failing:  # one line per outage, not one per beat
                log.warning("heartbeat not written; routers will drop this replica until Redis is back",
                            extra={"fields": {"error": str(exc)}})
            self._failing = True
            return
        if self._failing:
            log.warning("heartbeat written again")
        self._failing = False

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.beat()

    async def stop(self) -> None:
        """Stop beating and remove the announcement, so routers drop this replica at once."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await asyncio.to_thread(self.directory.withdraw, self.describe().id)
        except redis.RedisError:
            pass  # the TTL removes it
