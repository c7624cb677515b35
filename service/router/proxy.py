"""Forwards one request to a replica that hosts its base, and streams the answer back untouched.

A request is sent again — to another replica, or to the same base looked up afresh — only while no
byte of an answer has reached the client, and only when that is safe:
- the connection was refused (the replica died or is restarting): nothing was sent;
- a gateway answered 421 base_not_hosted (the alias moved to another base between the router's view
  and the gateway's): the gateway served nothing;
- an inference request's replica closed the connection before answering (it died): a generation has
  no side effects, so another replica can make it.
An answer that started is never replayed (a stream whose replica dies breaks, as the client would see
with that replica alone); an admin request is retried only when its connection was refused.

The upstream client is aiohttp's, not httpx: on this 2-core machine, with the engine busy, httpx
added 5.6 ms to TTFT p50 and cost 8 % of throughput against calling the gateway directly
(loadtests/bench_scale_out.py); aiohttp's C HTTP parser and lighter stream reads cost less.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import aiohttp
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from service import metrics
from service.router.table import RoutingTable

# Hop-by-hop headers (RFC 9110 §7.6.1) and what the client library sets itself; the rest passes through.
_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "transfer-encoding", "upgrade", "host", "content-length"}
# Passed back: all but hop-by-hop headers and those the router's own server sets (date, server).
_PASS_BACK_SKIP = (_HOP - {"content-length"}) | {"date", "server"}
_MAX_BUFFERED = 16 << 20  # an inference body is read whole (to find `model`); uploads stream
_ALIAS_PATH = "/admin/aliases/"
REPLICA_HEADER = "x-patchserve-replica"


def error(status: int, message: str, code: str, headers: dict | None = None) -> JSONResponse:
    """An OpenAI-shaped error, like the gateways' own."""
    body = {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                      "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class Forwarder:
    """Routes and relays requests over one pool of keep-alive connections to the gateways."""

    def __init__(self, table: RoutingTable, client: aiohttp.ClientSession, move_wait_s: float = 5.0):
        self.table = table
        self.client = client
        self.move_wait_s = move_wait_s  # how long a request waits for its base to have a live replica

    async def forward(self, request: Request) -> Response:
        """Send `request` to a replica of the right base; see the module docstring for retries."""
        path = request.url.path
        inference = path.startswith("/v1/") and request.method == "POST"
        body, model = await self._body(request, inference)
        if isinstance(body, Response):
            return body
        base = self._base_for(path, model)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw
                   if k.decode("latin-1").lower() not in _HOP]
        deadline = time.monotonic() + self.move_wait_s
        delay, disconnects = 0.01, 0
        while True:
            candidates = self.table.candidates(base)
            if not candidates:
                if time.monotonic() < deadline:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.2)
                    if model is not None:
                        base = await asyncio.to_thread(self.table.lookup_fresh, model)
                    continue
                metrics.router_requests.labels(base or "none", "503").inc()
                what = f"base {base}" if base else "any base"
                return error(503, f"No live replica serves {what} now; retry shortly.", "no_replica",
                             {"Retry-After": "1"})
            replica = candidates[0]
            url = replica.url + path + (f"?{request.url.query}" if request.url.query else "")
            self.table.in_flight[replica.id] = self.table.in_flight.get(replica.id, 0) + 1
            try:
                upstream = await self.client.request(request.method, url, headers=headers,
                                                     data=body if body is not None else request.stream())
            except (aiohttp.ClientConnectorError, asyncio.TimeoutError):
                self._done(replica.id)
                self.table.mark_down(replica)
                metrics.router_retries.labels("connect").inc()
                if body is None:  # a streamed upload has been consumed: it cannot be sent again
                    return error(502, f"replica {replica.id} refused the connection; upload again", "bad_gateway")
                continue
            except aiohttp.ClientError as exc:
                self._done(replica.id)
                # Not marked down: a live gateway closing an idle keep-alive connection looks the same.
                if (inference and isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError))
                        and disconnects < 2):
                    disconnects += 1
                    metrics.router_retries.labels("disconnect").inc()
                    continue
                metrics.router_requests.labels(replica.base, "502").inc()
                return error(502, f"replica {replica.id} failed before answering: {type(exc).__name__}",
                             "bad_gateway")
            if (upstream.status == 421 and model is not None and body is not None
                    and time.monotonic() < deadline):
                upstream.release()
                self._done(replica.id)
                metrics.router_retries.labels("misdirected").inc()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.2)
                base = await asyncio.to_thread(self.table.lookup_fresh, model)
                continue
            metrics.router_requests.labels(replica.base, str(upstream.status)).inc()
            out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _PASS_BACK_SKIP}
            out_headers[REPLICA_HEADER] = replica.id
            return StreamingResponse(self._relay(upstream, replica.id), status_code=upstream.status,
                                     headers=out_headers)

    async def _body(self, request: Request, inference: bool) -> tuple[bytes | None | Response, str | None]:
        """The body when it is small enough to hold (so it can be sent again), and the `model` it names."""
        length = request.headers.get("content-length")
        if not inference and (length is None or int(length or 0) > _MAX_BUFFERED):
            return None, None  # an upload: streamed through as it arrives
        body = await request.body()
        if len(body) > _MAX_BUFFERED:
            return error(413, f"the request body is larger than {_MAX_BUFFERED} bytes", "too_large"), None
        if not inference:
            return body, None
        try:
            model = json.loads(body).get("model")
        except (ValueError, AttributeError):
            model = None  # any gateway answers the 400
        return body, model if isinstance(model, str) else None

    def _base_for(self, path: str, model: str | None) -> str | None:
        if model is not None:
            return self.table.base_of(model)
        if path.startswith(_ALIAS_PATH):  # an alias's activation loads its version where it is served
            return self.table.base_of(path[len(_ALIAS_PATH):].split("/", 1)[0])
        return None

    async def _relay(self, upstream: aiohttp.ClientResponse, replica_id: str) -> AsyncIterator[bytes]:
        # A client that goes away cancels this generator: closing the upstream response makes the
        # gateway see the disconnect and abort the generation. A replica that dies mid-answer ends
        # the stream early (aiohttp raises), which the client sees as a broken response.
        try:
            async for chunk in upstream.content.iter_any():
                yield chunk
        finally:
            if not upstream.content.at_eof():
                upstream.close()  # the connection is not reusable mid-answer
            upstream.release()
            self._done(replica_id)

    def _done(self, replica_id: str) -> None:
        self.table.in_flight[replica_id] = max(0, self.table.in_flight.get(replica_id, 1) - 1)
