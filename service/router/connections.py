"""The router's two kinds of connection, as asyncio protocols: a client's, and one to a gateway.

Bytes of an answer go from the gateway's socket to the client's in the gateway connection's
`data_received`, with no task woken and nothing re-encoded: the gateway's framing (chunked SSE,
content-length) passes through as it came, with one header added. On this 2-core machine, under a
load that keeps both cores busy, every millisecond of CPU the router spends on a request comes out
of the engine's throughput; relaying each token through an ASGI stack (aiohttp's reader, a task
per chunk, Starlette's StreamingResponse, uvicorn's re-chunking) cost 2.8–3.6 ms of CPU per
32-token request, a bare byte copy 0.75 ms (loadtests/bench_scale_out.py prints both).

Both sides are parsed with httptools (llhttp, the parser uvicorn uses): the client's requests to
know where one ends and what it asks for, the gateway's answers to know their status before
passing them on (a 421 is retried, not relayed) and where they end (so the connection is reused).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import httptools

# Hop-by-hop headers (RFC 9110 §7.6.1), and the framing the router sets itself on the way up.
IDLE_TIMEOUT_S = 60.0  # a client connection with no request in flight for this long is closed
HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
              b"transfer-encoding", b"upgrade", b"host", b"content-length", b"expect"}


@dataclass
class Request:
    """One request as the client sent it; `body` holds it whole unless it streams (`streamed`)."""

    method: bytes = b""
    url: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    keep_alive: bool = True
    streamed: bool = False
    content_length: int | None = None
    complete: bool = False  # the whole body has arrived
    answered: bool = False  # its answer is out (or the connection gave up on it)

    @property
    def path(self) -> str:
        return self.url.split(b"?", 1)[0].decode("latin-1")

    def head(self, host: str) -> bytes:
        """The request line and headers to send upstream, framed like the body will be sent."""
        lines = [self.method + b" " + self.url + b" HTTP/1.1", b"host: " + host.encode("latin-1")]
        lines += [k + b": " + v for k, v in self.headers if k not in HOP_BY_HOP]
        if self.streamed:
            lines.append(b"transfer-encoding: chunked" if self.content_length is None
                         else b"content-length: %d" % self.content_length)
        elif self.body or self.method in (b"POST", b"PUT", b"PATCH"):
            lines.append(b"content-length: %d" % len(self.body))
        return b"\r\n".join(lines) + b"\r\n\r\n"


def error_body(status: int, message: str, code: str | None) -> bytes:
    """An OpenAI-shaped error, like the gateways' own."""
    return json.dumps({"error": {"message": message, "param": None, "code": code,
                                 "type": "invalid_request_error" if status < 500 else "server_error"}}).encode()


def http_response(status: int, reason: str, body: bytes, content_type: bytes = b"application/json",
                  headers: list[tuple[bytes, bytes]] = (), close: bool = False) -> bytes:
    """A complete HTTP/1.1 response, for what the router answers itself (errors)."""
    lines = [b"HTTP/1.1 %d %s" % (status, reason.encode("latin-1")), b"content-type: " + content_type,
             b"content-length: %d" % len(body), *(k + b": " + v for k, v in headers)]
    if close:
        lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class ClientConnection(asyncio.Protocol):
    """A client's connection: parses its requests and hands each, once routable, to `on_request`.

    An inference request (and any small one) is held whole, so it can be sent again; a large upload
    streams: `on_request` gets it at its headers and its body follows through `body_sink`.
    """

    def __init__(self, on_request: Callable[[ClientConnection, Request], None],
                 streams: Callable[[Request], bool], max_buffered: int, on_closed: Callable[[ClientConnection], None]):
        self.on_request, self.streams, self.max_buffered, self.on_closed = on_request, streams, max_buffered, on_closed
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.request: Request | None = None  # being parsed
        self.queue: list[Request] = []  # parsed while another was being answered (pipelining)
        self.busy = False  # a request of this connection is being answered
        self.body_sink: Callable[[bytes | None], None] | None = None  # a streamed body's next piece (None: end)
        self.upstream: UpstreamConnection | None = None  # the gateway connection answering now
        self.closed = False
        self._idle: asyncio.TimerHandle | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._wait_idle()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return  # refused: the rest of what it sends is not read
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.refuse(400, "Bad Request", "protocol upgrades are not supported")
        except httptools.HttpParserError:
            self.refuse(400, "Bad Request", "malformed HTTP request")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._idle is not None:
            self._idle.cancel()
        if self.upstream is not None:
            self.upstream.abort()  # the gateway sees the disconnect and stops generating
        self.on_closed(self)

    def pause_writing(self) -> None:  # a slow client: stop reading the gateway until it catches up
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.request = Request()
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def on_url(self, url: bytes) -> None:
        self.request.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length":
            self.request.content_length = int(value) if value.isdigit() else None
        elif name == b"expect" and value.lower() == b"100-continue":
            # Answered here, not passed up: the body is read before a gateway is chosen.
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.request.headers.append((name, value))

    def on_headers_complete(self) -> None:
        request = self.request
        request.method = self.parser.get_method()
        request.keep_alive = self.parser.should_keep_alive()
        if not self.busy and self.streams(request):
            request.streamed = True
            self._start(request)
        elif (request.content_length or 0) > self.max_buffered:
            self.refuse(413, "Payload Too Large", f"the request body is larger than {self.max_buffered} bytes")

    def on_body(self, body: bytes) -> None:
        request = self.request
        if self.closed:
            return
        if request.streamed:
            if self.body_sink is not None:
                self.body_sink(body)
            else:
                request.body += body  # before the gateway connection is up
            return
        request.body += body
        if len(request.body) > self.max_buffered:
            self.refuse(413, "Payload Too Large", f"the request body is larger than {self.max_buffered} bytes")

    def on_message_complete(self) -> None:
        request, self.request = self.request, None
        request.complete = True
        if request.streamed:
            if self.body_sink is not None:
                self.body_sink(None)
        elif self.busy:
            self.queue.append(request)
            self.transport.pause_reading()
        else:
            self._start(request)

    # the answer
    def _start(self, request: Request) -> None:
        self.busy = True
        self.on_request(self, request)

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def finished(self, request: Request, reusable: bool = True) -> None:
        """The answer to `request` is out: close, or take the next request."""
        request.answered = True
        self.busy, self.upstream, self.body_sink = False, None, None
        if self.closed:
            return
        if not (request.keep_alive and reusable):
            self.transport.close()
        elif self.queue:
            self._start(self.queue.pop(0))
        else:
            self.transport.resume_reading()
            self._wait_idle()

    def _wait_idle(self) -> None:
        self._idle = asyncio.get_running_loop().call_later(IDLE_TIMEOUT_S, self._close_if_idle)

    def _close_if_idle(self) -> None:
        if not self.busy and self.request is None and not self.closed:
            self.transport.close()

    def refuse(self, status: int, reason: str, message: str) -> None:
        """Answer an unreadable request and close (the stream's framing can no longer be trusted)."""
        if not self.closed:
            self.closed = True  # nothing more is read from it or written to it
            self.transport.write(http_response(status, reason, error_body(status, message, None), close=True))
            self.transport.close()


class UpstreamConnection(asyncio.Protocol):
    """A keep-alive connection to one gateway, answering one request at a time.

    `head` resolves with the status once the answer's headers have arrived (its bytes held back);
    `relay_to(client)` then passes the held bytes and everything after straight to the client;
    `done` resolves when the answer is complete (True) or the gateway closed first (False).
    """

    def __init__(self, key: str):
        self.key = key  # the pool's key: which gateway
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        loop = asyncio.get_running_loop()
        self.head: asyncio.Future[int] = loop.create_future()
        self.done: asyncio.Future[bool] = loop.create_future()
        self.held = bytearray()
        self.client: ClientConnection | None = None  # where the answer goes, once relayed
        self.feeding: ClientConnection | None = None  # whose body streams up (an upload)
        self.status = 0
        self.keep_alive = True
        self.head_only = False  # a HEAD request: the answer has no body whatever its headers say

    def begin(self, request: Request, host: str) -> None:
        """Send `request`: its head, and its body as far as it has arrived (all of it unless it streams)."""
        self._reset()
        self.head_only = request.method == b"HEAD"
        if not request.streamed:
            self.transport.write(request.head(host) + bytes(request.body))
            return
        self.transport.write(request.head(host))
        chunked = request.content_length is None
        if request.body:
            self.send_body(bytes(request.body), chunked)
            request.body = bytearray()
        if request.complete:
            self.send_body(None, chunked)

    def send_body(self, piece: bytes | None, chunked: bool) -> None:
        """A streamed body's next piece (None: its end), framed as the head said."""
        if self.closed:
            return
        if not chunked:
            if piece:
                self.transport.write(piece)
        elif piece is None:
            self.transport.write(b"0\r\n\r\n")
        elif piece:
            self.transport.write(b"%x\r\n" % len(piece) + piece + b"\r\n")

    def relay_to(self, client: ClientConnection, header: bytes) -> None:
        """Pass the answer on to `client`, starting with what is held, with `header` (a whole line) added."""
        self.client = client
        client.upstream = self
        held = bytes(self.held)
        self.held = bytearray()
        line_end = held.find(b"\r\n") + 2
        client.write(held[:line_end] + header + held[line_end:])

    def abort(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.abort()

    @property
    def reusable(self) -> bool:
        return not self.closed and self.keep_alive and self.done.done() and self.done.result()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.client is not None:
            self.client.write(data)
        else:
            self.held += data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.keep_alive = False
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for future in (self.head, self.done):
            if not future.done():
                future.set_result(0 if future is self.head else False)

    def pause_writing(self) -> None:  # a slow gateway on an upload: stop reading the client
        if self.feeding is not None and not self.feeding.closed:
            self.feeding.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.feeding is not None and not self.feeding.closed:
            self.feeding.transport.resume_reading()

    # httptools callbacks
    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        if not self.head.done():
            self.head.set_result(self.status)
        if self.head_only:
            self.keep_alive = False  # its framing headers describe a body that never comes: not reused
            self.on_message_complete()

    def on_message_complete(self) -> None:
        if not self.done.done():
            self.done.set_result(True)
