"""The cluster as the heartbeats show it: every live replica, the base it hosts, its versions and last beat."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter

from service.api.admin import protocol as a
from service.api.admin.context import AdminContext


def routes(router: APIRouter, ctx: AdminContext) -> None:
    """Add the cluster route to the /admin router."""

    @router.get("/cluster")
    async def cluster() -> a.Cluster:
        """Live replicas by base, and the bases aliases point to that no live replica serves."""
        replicas = await asyncio.to_thread(ctx.replicas.live)
        pointers = await asyncio.to_thread(ctx.registry.list_aliases)
        now = time.time()
        hosted = {r.base for r in replicas if r.routable}
        unserved = sorted({p.base for p in pointers} - hosted)
        return a.Cluster(replicas=[a.ReplicaView.of(r, now) for r in replicas],
                         bases={b: sorted(r.id for r in replicas if r.base == b and r.routable) for b in hosted},
                         unserved_bases=unserved,
                         aliases_unserved=sorted(p.alias for p in pointers if p.base in unserved))
