"""Forwards each request to a replica that hosts its base, and relays the answer back byte for byte.

A request is sent again — to another replica, or to the same base looked up afresh — only while no
byte of an answer has reached the client, and only when that is safe:
- the connection was refused (the replica died or is restarting): nothing was sent;
- a gateway answered 421 base_not_hosted (the alias moved to another base between the router's view
  and the gateway's): the gateway served nothing;
- an inference request's replica closed the connection before answering (it died): a generation has
  no side effects, so another replica can make it.
An answer that started is never replayed (a stream whose replica dies breaks, as the client would see
with that replica alone); an admin request is sent again only when its connection was refused.

The router's own endpoints (health, readiness, metrics, its view, the model list) are a small
Starlette app on a local Unix socket, reached through the same relay: one listener, one code path.
Why not an ASGI proxy: see service/router/connections.py (the CPU a relayed token costs).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from http import HTTPStatus
from urllib.parse import urlsplit

from service import metrics
from service.router.connections import ClientConnection, Request, UpstreamConnection, error_body, http_response
from service.router.table import RoutingTable

MAX_BUFFERED = 16 << 20  # an inference body is held whole (to find `model`, and to send it again); uploads stream
_ALIAS_PATH = "/admin/aliases/"
REPLICA_HEADER = "x-patchserve-replica"
_LOCAL = "local"
log = logging.getLogger("patchserve.router")


class _Refused(Exception):
    """The gateway could not be reached: nothing of the request was sent."""


class Relay:
    """The router's listener: routes each request and relays it over keep-alive gateway connections."""

    def __init__(self, table: RoutingTable, local_socket: str, move_wait_s: float = 5.0, connect_s: float = 2.0,
                 idle_s: float = 4.0):
        self.table = table
        self.local_socket = local_socket  # the router's own app (health, metrics, …)
        self.move_wait_s = move_wait_s  # how long a request waits for its base to have a live replica
        self.connect_s = connect_s
        self.idle_s = idle_s  # a pooled connection idle longer is dropped (uvicorn closes them after 5 s)
        self.pool: dict[str, list[UpstreamConnection]] = {}
        self.clients: set[ClientConnection] = set()
        self.tasks: set[asyncio.Task] = set()
        self.server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> None:
        """Listen on (host, port)."""
        self.server = await asyncio.get_running_loop().create_server(self._accept, host, port, backlog=2048)

    async def close(self, timeout_s: float) -> None:
        """Stop accepting; give requests in flight up to `timeout_s` to finish; close the rest."""
        if self.server is not None:
            self.server.close()
        deadline = time.monotonic() + timeout_s
        while self.tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in list(self.tasks):
            task.cancel()
        for client in list(self.clients):
            client.transport.close()
        for idle in self.pool.values():
            for conn in idle:
                conn.abort()
        self.pool.clear()

    def _accept(self) -> ClientConnection:
        client = ClientConnection(self._on_request, self._streams, MAX_BUFFERED, self.clients.discard)
        self.clients.add(client)
        return client

    @staticmethod
    def _streams(request: Request) -> bool:
        """Whether a request's body streams through as it arrives (a large or unsized upload)."""
        if request.method == b"POST" and request.path.startswith("/v1/"):
            return False  # inference: held whole
        if request.content_length is not None:
            return request.content_length > MAX_BUFFERED
        return any(k == b"transfer-encoding" and b"chunked" in v.lower() for k, v in request.headers)

    def _on_request(self, client: ClientConnection, request: Request) -> None:
        task = asyncio.get_running_loop().create_task(self._answer(client, request))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _answer(self, client: ClientConnection, request: Request) -> None:
        try:
            path = request.path
            if path == "/v1/models" or not path.startswith(("/v1/", "/admin/")):
                await self._local(client, request)
            else:
                await self._forward(client, request, path)
        except Exception:  # never leave a client hanging on a bug of ours
            log.exception("relaying a request failed", extra={"fields": {"path": request.path}})
            self._reply(client, request, 502, "the router failed to relay this request", "bad_gateway")

    async def _local(self, client: ClientConnection, request: Request) -> None:
        try:
            conn, status = await self._exchange(client, request, _LOCAL)
        except _Refused:
            self._reply(client, request, 503, "the router is starting", "starting", [(b"retry-after", b"1")])
            return
        if not status:
            self._reply(client, request, 502, "the router's own app closed the connection", "bad_gateway")
            return
        await self._relay(client, request, conn, b"")

    async def _forward(self, client: ClientConnection, request: Request, path: str) -> None:
        """Send `request` to a replica of the right base; see the module docstring for retries."""
        inference = request.method == b"POST" and path.startswith("/v1/")
        model = self._model(request) if inference else None
        base = self._base_for(path, model)
        deadline = time.monotonic() + self.move_wait_s
        delay, disconnects = 0.01, 0
        while not client.closed:
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
                self._reply(client, request, 503, f"No live replica serves {what} now; retry shortly.", "no_replica",
                            [(b"retry-after", b"1")])
                return
            replica = candidates[0]
            self.table.in_flight[replica.id] = self.table.in_flight.get(replica.id, 0) + 1
            try:
                client.upstream = client.body_sink = None  # a retry starts afresh
                try:
                    conn, status = await self._exchange(client, request, replica.url)
                except _Refused:
                    self.table.mark_down(replica)
                    metrics.router_retries.labels("connect").inc()
                    continue
                if not status:  # closed before answering; not marked down: an idle keep-alive close looks the same
                    if inference and disconnects < 2:
                        disconnects += 1
                        metrics.router_retries.labels("disconnect").inc()
                        continue
                    metrics.router_requests.labels(replica.base, "502").inc()
                    self._reply(client, request, 502, f"replica {replica.id} failed before answering", "bad_gateway")
                    return
                if status == 421 and model is not None and time.monotonic() < deadline:
                    conn.abort()
                    metrics.router_retries.labels("misdirected").inc()
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.2)
                    base = await asyncio.to_thread(self.table.lookup_fresh, model)
                    continue
                metrics.router_requests.labels(replica.base, str(status)).inc()
                await self._relay(client, request, conn, f"{REPLICA_HEADER}: {replica.id}\r\n".encode("latin-1"))
                return
            finally:
                self.table.in_flight[replica.id] = max(0, self.table.in_flight.get(replica.id, 1) - 1)

    async def _exchange(self, client: ClientConnection, request: Request, target: str
                        ) -> tuple[UpstreamConnection, int]:
        """Send `request` to `target` (a replica URL, or the local app); the connection and the answer's
        status once its headers are in (0: the connection closed first). Raises _Refused."""
        conn, host = await self._connection(target)
        conn.begin(request, host)
        if request.streamed:  # the rest of the body follows as it arrives
            conn.feeding = client
            chunked = request.content_length is None
            client.body_sink = lambda piece: conn.send_body(piece, chunked)
        client.upstream = conn  # a client that leaves now aborts the gateway's work
        return conn, await conn.head

    async def _relay(self, client: ClientConnection, request: Request, conn: UpstreamConnection,
                     header: bytes) -> None:
        """Pass the answer on as it comes; reuse both connections if it completes."""
        conn.relay_to(client, header)
        complete = await conn.done
        if conn.reusable and not client.closed:
            conn.client = conn.feeding = None
            conn.idle_since = time.monotonic()
            self.pool.setdefault(conn.key, []).append(conn)
        else:
            conn.abort()
        # A broken answer (or an upload answered before its body was read) ends the client's connection.
        client.finished(request, reusable=complete and request.complete)

    async def _connection(self, target: str) -> tuple[UpstreamConnection, str]:
        """An idle pooled connection to `target`, or a new one; and the Host header for it."""
        if target == _LOCAL:
            host = "localhost"
        else:
            parts = urlsplit(target)
            host = parts.netloc
        idle, now = self.pool.get(target), time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self.idle_s:
                return conn, host
            conn.abort()
        loop = asyncio.get_running_loop()
        try:
            if target == _LOCAL:
                connecting = loop.create_unix_connection(lambda: UpstreamConnection(target), self.local_socket)
            else:
                connecting = loop.create_connection(lambda: UpstreamConnection(target), parts.hostname,
                                                    parts.port or 80)
            _, conn = await asyncio.wait_for(connecting, self.connect_s)
        except (OSError, asyncio.TimeoutError) as exc:
            raise _Refused(target) from exc
        return conn, host

    @staticmethod
    def _model(request: Request) -> str | None:
        try:
            model = json.loads(request.body).get("model")
        except (ValueError, AttributeError):
            return None  # any gateway answers the 400
        return model if isinstance(model, str) else None

    def _base_for(self, path: str, model: str | None) -> str | None:
        if model is not None:
            return self.table.base_of(model)
        if path.startswith(_ALIAS_PATH):  # an alias's activation loads its version where it is served
            return self.table.base_of(path[len(_ALIAS_PATH):].split("/", 1)[0])
        return None

    @staticmethod
    def _reply(client: ClientConnection, request: Request, status: int, message: str, code: str,
               headers: list[tuple[bytes, bytes]] = ()) -> None:
        """Answer `request` from the router itself (an error), unless an answer already started."""
        if request.answered or client.closed or (client.upstream is not None and client.upstream.client is client):
            return
        close = not request.complete  # an upload not read to its end: the connection cannot continue
        client.write(http_response(status, HTTPStatus(status).phrase, error_body(status, message, code),
                                   headers=headers, close=close))
        client.finished(request, reusable=not close)
