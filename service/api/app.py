"""The FastAPI app: routes, OpenAI-style errors, health, metrics. Serving logic lives in serving.py."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from adapters_store.blobs import BlobStore
from adapters_store.evaluation import EvaluationStore
from adapters_store.jobs import JobQueue
from adapters_store.keys import ApiKeyStore
from adapters_store.registry import Registry
from adapters_store.rollouts import Rollouts
from adapters_store.validation import Limits
from service import metrics
from service.adapter_pool import AdapterPool
from service.api import protocol as p
from service.api.admin import admin_router
from service.api.auth import require_admin, require_inference
from service.api.errors import APIError, install_error_handlers
from service.api.serving import OpenAIServing, Submission
from service.engines.protocol import Engine, GenerationRequest, RequestRefused, SamplingConfig
from service.patch_admin import PatchAdmin
from service.live_guard import LiveGuard
from service.registry_sync import RegistrySync
from service.resolver import Resolver
from service.settings import Settings
from service.worker import Worker

log = logging.getLogger("patchserve.api")
SERVED_BY = "x-patchserve-served-by"


@dataclass
class Store:
    """The registry's parts a gateway is built on (adapters_store)."""

    registry: Registry
    blobs: BlobStore
    keys: ApiKeyStore
    evals: EvaluationStore
    jobs: JobQueue
    redis_url: str


def create_app(settings: Settings, engine: Engine, store: Store, worker: Worker | None = None,
               on_ready: Callable[[], None] | None = None) -> FastAPI:
    """The gateway over `engine`, following the registry in `store`; the engine (and `worker`) start with the app.

    `on_ready` is called once every alias is loaded and the first request can be admitted.
    """
    resolver = Resolver(bases={name: settings.base for name in (settings.base, *settings.base_aliases)})
    pool = AdapterPool(engine, store.blobs, settings.data_dir / "versions")
    rollouts = Rollouts(store.registry)
    sync = RegistrySync(store.registry, resolver, pool, settings.base, store.redis_url, settings.reconcile_interval_s,
                        rollouts)
    patches = PatchAdmin(store.registry, store.blobs, pool, sync, settings.data_dir / "uploads",
                         Limits.from_settings(settings), settings.base)
    serving = OpenAIServing(engine, resolver, pool, settings.max_in_flight,
                            guard=LiveGuard(store.registry, store.evals, resolver, pool, engine, rollouts))

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        patches.clear_staging()
        store.blobs.sweep_interrupted()
        await engine.start()
        # Every alias at its recorded version, loaded, before the first request is admitted.
        await sync.start()
        # Gauges read at scrape time, so they are never stale.
        metrics.running_requests.labels(engine.name).set_function(engine.running)
        metrics.queue_depth.labels(engine.name).set_function(serving.waiting)
        metrics.adapters_resident.labels(engine.name).set_function(lambda: len(engine.adapters()))
        metrics.engine_ready.labels(engine.name).set(1)
        metrics.job_queue_lag.set_function(store.jobs.lag_s)
        metrics.compatibility.source = store.evals.reports
        if worker is not None:
            worker.start()
        if on_ready is not None:
            on_ready()
        yield
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
    app.include_router(admin_router(store.registry, patches, store.keys, store.evals, store.jobs, rollouts,
                                    settings.max_upload_bytes, settings.max_lora_rank))
    inference = [Depends(require_inference)]

    install_error_handlers(app)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        try:
            await asyncio.wait_for(_probe(engine), timeout=10)
        except Exception as exc:  # readiness answers; it never raises
            metrics.engine_ready.labels(engine.name).set(0)
            return JSONResponse({"status": "not ready", "reason": repr(exc)}, status_code=503)
        metrics.engine_ready.labels(engine.name).set(1)
        return JSONResponse({"status": "ready", "engine": engine.name, "adapters": engine.adapters()})

    @app.get("/admin/replica", dependencies=[Depends(require_admin)])
    async def replica() -> dict:
        """What this replica serves now, read at one instant (no engine round trip, unlike /readyz)."""
        aliases = {alias: resolver.pointer(alias).engine_name for alias in resolver.aliases}
        return {"engine": engine.name, "base": settings.base, "aliases": aliases, "elsewhere": resolver.elsewhere,
                "adapters": engine.adapters(),
                "leases": pool.leases_held(), "in_flight": serving.in_flight, "last_reconcile": sync.last_reconcile}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=inference)
    async def models() -> p.ModelList:
        cards = [p.ModelCard(id=name, root=resolver.resolve(name).base) for name in resolver.models()]
        return p.ModelList(data=cards)

    @app.post("/v1/completions", dependencies=inference)
    async def completions(req: p.CompletionRequest, raw: Request) -> Response:
        include_usage = _include_usage(await raw.body())
        return await _serve(serving, serving.submit_completion(req), chat=False, stream=req.stream,
                            include_usage=include_usage)

    @app.post("/v1/chat/completions", dependencies=inference)
    async def chat_completions(req: p.ChatCompletionRequest, raw: Request) -> Response:
        include_usage = _include_usage(await raw.body())
        return await _serve(serving, serving.submit_chat(req), chat=True, stream=req.stream,
                            include_usage=include_usage)

    return app


def _include_usage(body: bytes) -> bool:
    options = json.loads(body).get("stream_options") or {}
    return bool(options.get("include_usage"))


async def _serve(serving: OpenAIServing, sub: Submission, chat: bool, stream: bool, include_usage: bool) -> Response:
    await serving.admit(sub)
    headers = {SERVED_BY: sub.resolved.served_by}
    if not stream:
        status = 500
        try:
            body = await serving.complete(sub, chat)
            status = 200
            return JSONResponse(body, headers=headers)
        finally:
            sub.meter.finish(status)
            serving.release(sub)

    async def events() -> AsyncIterator[str]:
        status = 499  # a client that goes away mid-stream
        try:
            async for chunk in serving.stream(sub, chat, include_usage):
                yield chunk
            status = 200
        except RequestRefused as exc:  # the headers are gone: the refusal is the stream's last event
            status = 400
            yield f"data: {json.dumps(APIError(400, f'The engine refused this request: {exc}').body())}\n\n"
            yield "data: [DONE]\n\n"
        except Exception as exc:
            status = 500
            log.exception("generation failed", extra={"fields": {"request_id": sub.request.request_id}})
            yield f"data: {json.dumps(APIError(500, f'generation failed: {exc}', 'server_error').body())}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            sub.meter.finish(status)
            serving.release(sub)

    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


async def _probe(engine: Engine) -> None:
    """One greedy token from the base: the engine is loaded and answering."""
    request = GenerationRequest(f"ready-{uuid.uuid4().hex}", [engine.tokenizer.bos_token_id],
                                SamplingConfig(max_tokens=1, temperature=0.0))
    async for _ in engine.generate(request):
        pass
