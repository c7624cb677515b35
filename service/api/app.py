"""The FastAPI app: routes, OpenAI-style errors, health, metrics. Serving logic lives in serving.py."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import metrics
from service.api import protocol as p
from service.api.serving import APIError, OpenAIServing, Submission
from service.engines.protocol import Engine, GenerationRequest, SamplingConfig
from service.resolver import Resolver
from service.settings import Settings

log = logging.getLogger("patchserve.api")
SERVED_BY = "x-patchserve-served-by"


def create_app(settings: Settings, engine: Engine, resolver: Resolver) -> FastAPI:
    """The gateway over `engine`, resolving models with `resolver`; the engine starts with the app."""
    serving = OpenAIServing(engine, resolver, settings.max_in_flight)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await engine.start()
        # Every version an alias points at is loaded before the first request can ask for it.
        for patch, version in resolver.aliases.values():
            await engine.add_adapter(resolver.versions[patch][version].adapter())
        for alias, (patch, version) in resolver.aliases.items():
            metrics.alias_active.labels(alias, patch, str(version), resolver.versions[patch][version].base).set(1)
        # Gauges read at scrape time, so they are never stale.
        metrics.running_requests.labels(engine.name).set_function(engine.running)
        metrics.queue_depth.labels(engine.name).set_function(serving.waiting)
        metrics.adapters_resident.labels(engine.name).set_function(lambda: len(engine.adapters()))
        metrics.engine_ready.labels(engine.name).set(1)
        yield
        metrics.engine_ready.labels(engine.name).set(0)
        await engine.stop()

    app = FastAPI(title="patchserve", lifespan=lifespan)
    app.state.serving = serving

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", []) if x != "body"]
        if first.get("type") == "json_invalid":
            return JSONResponse(APIError(400, "The request body is not valid JSON.").body(), status_code=400)
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
        return JSONResponse(APIError(400, message, param=".".join(loc) or None).body(), status_code=400)

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

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> p.ModelList:
        cards = [p.ModelCard(id=name, root=resolver.resolve(name).base) for name in resolver.models()]
        return p.ModelList(data=cards)

    @app.post("/v1/completions")
    async def completions(req: p.CompletionRequest, raw: Request) -> Response:
        return await _serve(serving, serving.submit_completion(req), chat=False, stream=req.stream,
                            include_usage=_include_usage(await raw.body()))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: p.ChatCompletionRequest, raw: Request) -> Response:
        return await _serve(serving, serving.submit_chat(req), chat=True, stream=req.stream,
                            include_usage=_include_usage(await raw.body()))

    return app


def _include_usage(body: bytes) -> bool:
    options = json.loads(body).get("stream_options") or {}
    return bool(options.get("include_usage"))


async def _serve(serving: OpenAIServing, sub: Submission, chat: bool, stream: bool, include_usage: bool) -> Response:
    serving.admit()
    headers = {SERVED_BY: sub.resolved.served_by}
    if not stream:
        status = 500
        try:
            body = await serving.complete(sub, chat)
            status = 200
            return JSONResponse(body, headers=headers)
        finally:
            sub.meter.finish(status)
            serving.release()

    async def events() -> AsyncIterator[str]:
        status = 499  # a client that goes away mid-stream
        try:
            async for chunk in serving.stream(sub, chat, include_usage):
                yield chunk
            status = 200
        except Exception as exc:
            status = 500
            log.exception("generation failed", extra={"fields": {"request_id": sub.request.request_id}})
            yield f"data: {json.dumps(APIError(500, f'generation failed: {exc}', 'server_error').body())}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            sub.meter.finish(status)
            serving.release()

    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


async def _probe(engine: Engine) -> None:
    """One greedy token from the base: the engine is loaded and answering."""
    request = GenerationRequest(f"ready-{uuid.uuid4().hex}", [engine.tokenizer.bos_token_id],
                                SamplingConfig(max_tokens=1, temperature=0.0))
    async for _ in engine.generate(request):
        pass
