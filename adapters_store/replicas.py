"""Which replicas are alive and what they host: heartbeats in Redis with a time to live.

Each gateway writes its announcement (`replica:<id>`, JSON) with a TTL every heartbeat interval and
adds its id to the `replicas` set. A replica that dies stops writing and its key expires: the set
may name it a while longer, so readers keep only ids whose key still exists (and prune the rest).
Routing and the move guards read this, never a static list.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import redis

from adapters_store.errors import Conflict


@dataclass
class ReplicaInfo:
    id: str
    url: str  # how a router reaches it
    base: str  # the base its engine hosts
    names: list[str] = field(default_factory=list)  # the names it answers to for the base (base-v1, tiny)
    engine: str = ""
    ready: bool = False  # every alias loaded and the engine answering
    draining: bool = False  # SIGTERM received: finishing what it holds, admitting nothing new soon
    versions: list[str] = field(default_factory=list)  # patch versions resident in its engine (`patch@N`)
    in_flight: int = 0
    started_at: float = 0.0
    heartbeat_at: float = 0.0
    kv: dict = field(default_factory=dict)  # KV policies: what its engine can apply, and what is in force

    @property
    def routable(self) -> bool:
        """Whether new requests may be sent to it."""
        return self.ready and not self.draining


class ReplicaDirectory:
    """Heartbeats of every replica on one Redis."""

    def __init__(self, client: redis.Redis, prefix: str = "ps:"):
        self.r = client
        self._set = f"{prefix}replicas"
        self._key = f"{prefix}replica:"

    def announce(self, info: ReplicaInfo, ttl_s: float) -> None:
        """Write `info` (stamped now), alive for `ttl_s` unless announced again."""
        info.heartbeat_at = time.time()
        with self.r.pipeline(transaction=True) as pipe:
            pipe.set(self._key + info.id, json.dumps(asdict(info)), px=max(1, int(ttl_s * 1000)))
            pipe.sadd(self._set, info.id)
            pipe.execute()

    def withdraw(self, replica_id: str) -> None:
        """Remove a replica at once (a clean shutdown), instead of waiting for its TTL."""
        with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(self._key + replica_id)
            pipe.srem(self._set, replica_id)
            pipe.execute()

    def live(self) -> list[ReplicaInfo]:
        """Every replica whose heartbeat has not expired, by id."""
        ids = sorted(m.decode() if isinstance(m, bytes) else m for m in self.r.smembers(self._set))
        if not ids:
            return []
        raws = self.r.mget([self._key + i for i in ids])
        alive, gone = [], []
        for replica_id, raw in zip(ids, raws):
            if raw is None:
                gone.append(replica_id)
            else:
                alive.append(ReplicaInfo(**json.loads(raw)))
        if gone:  # expired keys: their ids need not be read again
            self.r.srem(self._set, *gone)
        return alive

    def hosting(self, base: str) -> list[ReplicaInfo]:
        """Live replicas that host `base` and take new requests."""
        return [r for r in self.live() if r.base == base and r.routable]

    def require_host(self, base: str) -> None:
        """Conflict unless a live replica serves `base`: an alias moved there would answer no one."""
        if not self.hosting(base):
            raise Conflict(f"no live replica hosts base {base}: start a gateway for it (PATCHSERVE_BASE={base}) "
                           f"before moving aliases there, or force the move with a reason", "base")
