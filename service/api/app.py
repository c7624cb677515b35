"""The FastAPI app: routes, OpenAI-style errors, health, metrics. Serving logic lives in serving.py."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from adapters_store.kv_policies import KVPolicies
from adapters_store.replicas import ReplicaInfo
from adapters_store.rollouts import Rollouts
from adapters_store.store import Store
from adapters_store.validation import Limits
from service import metrics
from service.api.admin import admin_router
from service.api.admin.context import AdminContext
from service.api.auth import require_admin
from service.api.errors import install_error_handlers
from service.api.openai.routes import openai_router
from service.api.openai.serving import OpenAIServing
from service.drain import Drain
from service.engines.protocol import Engine, GenerationRequest, SamplingConfig
from service.replica.adapter_pool import AdapterPool, MemoryPool
from service.replica.heartbeat import Heartbeat
from service.replica.kv_state import KVState
from service.replica.live_guard import LiveGuard
from service.replica.patch_admin import PatchAdmin
from service.replica.registry_sync import RegistrySync
from service.replica.resolver import Resolver
from service.settings import Settings

if TYPE_CHECKING:  # the app starts and stops a worker it is given; it never builds one
    from service.jobs.worker import Worker

log = logging.getLogger("patchserve.api")
SERVED_BY = "x-patchserve-served-by"


def create_app(settings: Settings, engine: Engine, store: Store, worker: Worker | None = None,
               on_ready: Callable[[], None] | None = None, drain: Drain | None = None,
               url: str | None = None) -> FastAPI:
    """The gateway over `engine`, following the registry in `store`; the engine (and `worker`) start with the app.

    `on_ready` is called once every alias is loaded and the first request can be admitted. `drain`
    (SIGTERM) makes it not ready and announces it; `url` is where routers reach it (its heartbeat).
    """
    drain = drain or Drain()
    url = settings.advertise_url or url or f"http://{settings.host}:{settings.port}"
    replica_id = settings.replica_id or f"{socket.gethostname()}-{url.rsplit(':', 1)[-1].strip('/')}"
    names = [settings.base, *settings.base_aliases]
    resolver = Resolver(bases={name: settings.base for name in names})
    pool = AdapterPool(engine, store.blobs, settings.data_dir / "versions")
    memory_pool = MemoryPool(engine, store.blobs, settings.data_dir / "memories")
    rollouts = Rollouts(store.registry)
    kv_policies = KVPolicies(store.registry)
    kv = KVState(kv_policies, engine, resolver, settings.base)
    sync = RegistrySync(store.registry, resolver, pool, settings.base, store.redis_url, settings.reconcile_interval_s,
                        rollouts, events_client=store.events, memory_pool=memory_pool, kv=kv)
    patches = PatchAdmin(store.registry, store.blobs, pool, sync, settings.data_dir / "uploads",
                         Limits.from_settings(settings), settings.base, store.replicas)
    serving = OpenAIServing(engine, resolver, pool, settings.max_in_flight,
                            guard=LiveGuard(store.registry, store.evals, resolver, pool, engine, rollouts),
                            memories=memory_pool)
    started_at, state = time.time(), {"ready": False}

    def describe() -> ReplicaInfo:
        return ReplicaInfo(id=replica_id, url=url, base=settings.base, names=names, engine=engine.name,
                           ready=state["ready"] and not drain.draining, draining=drain.draining,
                           versions=sorted(engine.adapters()), in_flight=serving.in_flight, started_at=started_at,
                           kv=kv.announcement())

    heartbeat = Heartbeat(store.replicas, describe, settings.heartbeat_interval_s, settings.heartbeat_ttl_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        patches.clear_staging()
        store.blobs.sweep_interrupted()
        await kv.initial_policy()  # vLLM takes its KV dtype at start: start with the recorded one
        await engine.start()
        # Every alias at its recorded version, loaded, before the first request is admitted.
        await sync.start()
        # Gauges read at scrape time, so they are never stale.
        metrics.running_requests.labels(engine.name).set_function(engine.running)
        metrics.queue_depth.labels(engine.name).set_function(serving.waiting)
        metrics.adapters_resident.labels(engine.name).set_function(lambda: len(engine.adapters()))
        metrics.memory_slots.labels(engine.name, "used").set_function(lambda: len(engine.memories()))
        metrics.memory_slots.labels(engine.name, "total").set(settings.memory_slots if engine.memory_layer is not None
                                                              else 0)
        metrics.engine_ready.labels(engine.name).set(1)
        metrics.job_queue_lag.set_function(metrics.or_nan(store.jobs.lag_s))
        metrics.compatibility.source = store.evals.reports
        if worker is not None:
            worker.start()
        state["ready"] = True
        await heartbeat.start()  # routers send requests from here on
        # Draining is announced at once, not at the next beat: routers stop sending sooner.
        loop = asyncio.get_running_loop()
        drain.listeners.append(lambda: loop.call_soon_threadsafe(lambda: asyncio.ensure_future(heartbeat.beat())))
        if on_ready is not None:
            on_ready()
        yield
        await heartbeat.stop()
        metrics.engine_ready.labels(engine.name).set(0)
        await serving.guard.stop()
        if worker is not None:
            await asyncio.to_thread(worker.stop)
        await sync.stop()
        await engine.stop()

    app = FastAPI(title="patchserve", lifespan=lifespan)
    app.state.serving = serving
    app.state.keys = store.keys
    app.state.sync = sync
    app.include_router(admin_router(AdminContext(store.registry, patches, store.keys, store.evals, store.jobs, rollouts,
                                                 settings.max_upload_bytes, settings.max_lora_rank, store.replicas,
                                                 store.memories, sync, settings.base, store.blobs, kv_policies)))

    install_error_handlers(app)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if drain.draining:
            return JSONResponse({"status": "not ready", "reason": "draining: finishing requests in flight, then "
                                                                  "stopping"}, status_code=503)
        try:
            await asyncio.wait_for(_probe(engine), timeout=10)
        except Exception as exc:  # readiness answers; it never raises
            metrics.engine_ready.labels(engine.name).set(0)
            return JSONResponse({"status": "not ready", "reason": repr(exc)}, status_code=503)
        metrics.engine_ready.labels(engine.name).set(1)
        # Ready for inference whatever the registry's state; a lost registry only freezes changes.
        return JSONResponse({"status": "ready", "engine": engine.name, "adapters": engine.adapters(),
                             "registry": "reachable" if sync.registry_reachable else "unreachable (serving the "
                                         "last known versions; changes wait for it)"})

    @app.get("/admin/replica", dependencies=[Depends(require_admin)])
    async def replica() -> dict:
        """What this replica serves now, read at one instant (no engine round trip, unlike /readyz)."""
        aliases = {alias: resolver.pointer(alias).ref for alias in resolver.aliases}
        return {"id": replica_id, "url": url, "draining": drain.draining,
                "engine": engine.name, "base": settings.base, "aliases": aliases, "elsewhere": resolver.elsewhere,
                "adapters": engine.adapters(),
                "memories": {name: v.ref for name, v in resolver.memories.items()},
                "memory_targets": resolver.memory_targets, "memory_slots": engine.memories(),
                "memory_layer": engine.memory_layer,
                "leases": pool.leases_held(), "in_flight": serving.in_flight, "last_reconcile": sync.last_reconcile,
                "kv": kv.describe()}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        try:  # the engine counts routed tokens where the forward pass runs: read them for this scrape
            metrics.memory_tokens.update(await asyncio.wait_for(engine.memory_stats(), timeout=2))
        except Exception:  # the scrape never fails for it; the last snapshot stands
            pass
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    app.include_router(openai_router(serving, resolver))
    return app


async def _probe(engine: Engine) -> None:
    """One greedy token from the base: the engine is loaded and answering."""
    request = GenerationRequest(f"ready-{uuid.uuid4().hex}", [engine.tokenizer.bos_token_id],
                                SamplingConfig(max_tokens=1, temperature=0.0))
    async for _ in engine.generate(request):
        pass
