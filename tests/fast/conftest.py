"""The fast tier's fixtures: one real Redis for the session, a store under a key prefix of its own per test,
and a replica (resolver, adapter pool, registry sync, serving, live guard) wired as service/api/app.py wires
it, on tests/fake_engine.py's FakeEngine instead of a model.

Async fixtures run on the test's own event loop (loop_scope="function"): the replica's locks, tasks and
the sync's pub/sub connection must live on the loop the test awaits them from.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import pytest_asyncio
import redis

from adapters_store.redis_server import EmbeddedRedis
from adapters_store.registry import PatchVersion
from adapters_store.rollouts import Rollouts
from adapters_store.store import Store
from service.api.openai.serving import OpenAIServing
from service.replica.adapter_pool import AdapterPool, MemoryPool
from service.replica.live_guard import LiveGuard
from service.replica.registry_sync import RegistrySync
from service.replica.resolver import Resolver
from tests.fake_engine import FakeEngine
from tests.fast import support
from tests.fast.support import BASE, OTHER_BASE, subscribers
from tests.prometheus_server import free_port


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> str:
    """A real redis-server (the embedded one) for the whole tier."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("fast-redis"), free_port()).start()
    yield server.url
    server.stop()


@pytest.fixture
def store(redis_url, tmp_path) -> Store:
    """The store's parts under a fresh key prefix (its own aliases, audit and event channel); keys deleted after."""
    client = redis.Redis.from_url(redis_url)
    prefix = f"fast-{uuid.uuid4().hex[:12]}:"
    opened = Store.open(client, redis_url, prefix, tmp_path / "blobs")
    opened.registry.register_base(BASE, "1")
    opened.registry.register_base(OTHER_BASE, "2")
    yield opened
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def new_version(store) -> Callable[..., PatchVersion]:
    """Register the next version of a patch with blobs of its own (FakeEngine does not parse them)."""

    def make(patch: str, base: str = BASE, weights: bytes | None = None) -> PatchVersion:
        config = store.blobs.put_bytes(b'{"peft_type": "LORA", "r": 4}')
        model = store.blobs.put_bytes(weights or f"weights of {patch} {uuid.uuid4().hex}".encode())
        return store.registry.create_version(patch, base, {"adapter_config.json": config,
                                                           "adapter_model.safetensors": model})

    return make


@pytest.fixture
def engine() -> FakeEngine:
    fake = FakeEngine(max_model_len=256)
    yield fake
    assert fake.violations == [], "the layers above the engine broke its contract"


@pytest.fixture
def pool(engine, store, tmp_path) -> AdapterPool:
    return AdapterPool(engine, store.blobs, tmp_path / "versions")


@pytest.fixture
def memory_pool(engine, store, tmp_path) -> MemoryPool:
    return MemoryPool(engine, store.blobs, tmp_path / "memories")


@dataclass
class Replica:
    engine: FakeEngine
    store: Store
    resolver: Resolver
    pool: AdapterPool
    sync: RegistrySync
    serving: OpenAIServing
    guard: LiveGuard
    rollouts: Rollouts
    memory_pool: MemoryPool


@pytest_asyncio.fixture(loop_scope="function")
async def replica(engine, store, pool, memory_pool):
    """One gateway's replica on the FakeEngine, not yet started (`await replica.sync.start()`); stopped after."""
    resolver = Resolver(bases={BASE: BASE, "tiny": BASE})
    rollouts = Rollouts(store.registry)
    sync = RegistrySync(store.registry, resolver, pool, BASE, store.redis_url, interval_s=0.2, rollouts=rollouts,
                        memory_pool=memory_pool)
    guard = LiveGuard(store.registry, store.evals, resolver, pool, engine, rollouts)
    serving = OpenAIServing(engine, resolver, pool, max_in_flight=8, guard=guard, memories=memory_pool)
    await engine.start()
    yield Replica(engine, store, resolver, pool, sync, serving, guard, rollouts, memory_pool)
    await guard.stop()
    await sync.stop()
    await engine.stop()


@pytest.fixture
def eventually():
    """`await eventually(lambda: cond, timeout=5, what="...")`: poll on the loop, never a fixed sleep."""
    return support.eventually


@pytest.fixture
def alias() -> str:
    """An alias name of this test's own (the metrics' labels are process-wide)."""
    return f"a-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def listening(store):
    """`await listening()`: wait until the replica's sync has subscribed to the registry's events."""

    async def wait(count: int = 1) -> None:
        await support.eventually(lambda: subscribers(store) >= count,
                                 what="the sync subscribed to the registry's events")

    return wait
