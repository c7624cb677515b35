"""Writes acknowledged only once replicated: the commands of one change, then Redis's WAIT, on one connection.

WAIT counts the replicas that acknowledged every write *of its own connection*, so the change and the
WAIT go through one pipeline (one connection). With `replicas` at 0 a write is acknowledged by the
primary alone, as on a single server (the embedded default, whose AOF is fsynced on every write).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import redis

from adapters_store.errors import NotReplicated


@dataclass(frozen=True)
class Acks:
    replicas: int = 0  # replicas that must hold a change before it is acknowledged
    timeout_ms: int = 2000

    def write(self, client: redis.Redis, queue: Callable[[redis.client.Pipeline], object]) -> list:
        """Run the commands `queue` puts on a pipeline, then wait for the replicas; the commands' results."""
        pipe = client.pipeline(transaction=False)
        queue(pipe)
        if self.replicas:
            pipe.execute_command("WAIT", self.replicas, self.timeout_ms)
        results = pipe.execute()
        if self.replicas:
            acked = results.pop()
            if acked < self.replicas:
                raise NotReplicated(f"the change reached {acked} of {self.replicas} replica(s) in "
                                    f"{self.timeout_ms} ms; it may not survive a failover: check, then retry")
        return results
