"""Every error the API answers, in one place: OpenAI-shaped bodies, and the table from the store's and
validation's refusals to HTTP statuses. Nothing else in the service decides a status code for them."""

from __future__ import annotations

import json
import logging
import uuid

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from adapters_store.errors import (
    BlobStorageError,
    Conflict,
    Incompatible,
    Invalid,
    NotFound,
    NotReplicated,
    StoreError,
    TooLarge,
    UnsafeFormat,
)
from service.api.openai import protocol as p
from service.engines.protocol import RequestRefused

log = logging.getLogger("patchserve.api")

# The one table from the store's refusals to HTTP: (status, OpenAI-style error code).
STORE_ERRORS: dict[type[StoreError], tuple[int, str]] = {
    Invalid: (400, "invalid_request"), NotFound: (404, "not_found"), Conflict: (409, "conflict"),
    TooLarge: (413, "too_large"), UnsafeFormat: (415, "unsupported_media_type"), Incompatible: (422, "unprocessable"),
    NotReplicated: (503, "not_replicated"),
}


def status_for(exc: StoreError) -> int:
    """The HTTP status a store refusal is answered with."""
    return STORE_ERRORS.get(type(exc), (400, ""))[0]


class APIError(Exception):
    """An error answered the OpenAI way: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return p.ErrorResponse(error=p.ErrorBody(message=self.message, type=self.type, param=self.param,
                                                 code=self.code)).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Map every refusal to its OpenAI-shaped answer, and anything unexpected to a 500 with a request id."""

    @app.exception_handler(StoreError)
    async def refused(_: Request, exc: StoreError) -> JSONResponse:
        status, code = STORE_ERRORS.get(type(exc), (400, "invalid_request"))
        headers = {"Retry-After": "2"} if status == 503 else None
        return APIError(status, exc.message, param=exc.field, code=code, headers=headers).response()

    # The store's client reports an unreachable registry (or a primary demoted during a failover) as
    # redis-py's own errors; every store call would otherwise need wrapping to say the same thing.
    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    @app.exception_handler(redis.ReadOnlyError)
    async def registry_unavailable(_: Request, exc: redis.RedisError) -> JSONResponse:
        return APIError(503, f"The registry (Redis) is unreachable, so nothing can be changed now; inference goes on "
                             f"unchanged. Retry shortly. ({type(exc).__name__})", type_="service_unavailable",
                        code="registry_unavailable", headers={"Retry-After": "2"}).response()

    @app.exception_handler(BlobStorageError)
    async def blobs_unavailable(_: Request, exc: BlobStorageError) -> JSONResponse:
        return APIError(503, f"The blob storage is unreachable, so no version can be stored or fetched now; inference "
                             f"on loaded versions goes on. Retry shortly. ({exc})", type_="service_unavailable",
                        code="blob_storage_unavailable", headers={"Retry-After": "2"}).response()

    @app.exception_handler(RequestRefused)
    async def engine_refused(_: Request, exc: RequestRefused) -> JSONResponse:
        return APIError(400, f"The engine refused this request: {exc}").response()

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", []) if x != "body"]
        if first.get("type") == "json_invalid":
            return APIError(400, "The request body is not valid JSON.").response()
        reason = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        message = f"{'.'.join(loc)}: {reason}" if loc else reason
        return APIError(400, message, param=".".join(loc) or None).response()

    app.add_middleware(CatchAll)


class CatchAll:
    """ASGI middleware: an exception no handler expected becomes an OpenAI-shaped 500 naming a request id
    that is also in the log, never a plain-text page or a reset connection.

    Pure ASGI rather than Starlette's `exception_handler(Exception)`, which answers and then re-raises
    (a second, unstructured traceback in the log) and cannot tell whether a stream already started.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            request_id = f"req-{uuid.uuid4().hex[:16]}"
            log.exception("unexpected error", extra={"fields": {"request_id": request_id, "path": scope.get("path")}})
            if started:
                return  # headers are gone; the stream simply ends
            body = json.dumps(APIError(500, f"Internal error; quote request id {request_id} to the operator.",
                                       type_="server_error", code="internal_error").body()).encode()
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json"), (b"x-request-id", request_id.encode())]})
            await send({"type": "http.response.body", "body": body})
