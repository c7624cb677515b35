"""The OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (logic in serving.py)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from service.api.auth import require_inference
from service.api.errors import APIError
from service.api.openai import protocol as p
from service.api.openai.serving import OpenAIServing, Submission
from service.engines.protocol import RequestRefused
from service.replica.resolver import Resolver

log = logging.getLogger("patchserve.api")
SERVED_BY = "x-patchserve-served-by"


def openai_router(serving: OpenAIServing, resolver: Resolver) -> APIRouter:
    """The /v1 routes over one replica's serving and resolver; open until an inference key exists."""
    router = APIRouter(prefix="/v1", dependencies=[Depends(require_inference)])

    @router.get("/models")
    async def models() -> p.ModelList:
        cards = [p.ModelCard(id=name, root=resolver.resolve(name).base) for name in resolver.models()]
        return p.ModelList(data=cards)

    @router.post("/completions")
    async def completions(req: p.CompletionRequest, raw: Request) -> Response:
        include_usage = _include_usage(await raw.body())
        return await _serve(serving, serving.submit_completion(req), chat=False, stream=req.stream,
                            include_usage=include_usage)

    @router.post("/chat/completions")
    async def chat_completions(req: p.ChatCompletionRequest, raw: Request) -> Response:
        include_usage = _include_usage(await raw.body())
        return await _serve(serving, serving.submit_chat(req), chat=True, stream=req.stream,
                            include_usage=include_usage)

    return router


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
        except RequestRefused:  # answered 400 by the error table; metered as what the client gets
            status = 400
            raise
        finally:
            sub.meter.finish(status)
            serving.release(sub)

    async def events() -> AsyncIterator[str]:
        status = 499  # a client that goes away mid-stream
        try:
            async with aclosing(serving.stream(sub, chat, include_usage)) as chunks:
                async for chunk in chunks:
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
