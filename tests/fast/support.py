"""What the fast tier's tests and fixtures share: the bases the store registers, and polling helpers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from adapters_store.store import Store

BASE = "base-v1"  # the base the replica serves
OTHER_BASE = "base-v2"  # a registered base it does not host


async def eventually(check: Callable[[], object], timeout: float = 5.0, what: str = "") -> object:
    """Poll `check` on the loop until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"never happened: {what or check}"
        await asyncio.sleep(0.01)


def subscribers(store: Store) -> int:
    """How many connections are subscribed to the registry's event channel."""
    channel = store.registry.channel
    return dict(store.registry.r.pubsub_numsub(channel)).get(channel.encode(), 0)
