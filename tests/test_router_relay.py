"""The router's relay, byte for byte: what it does to HTTP that the gateways' tests do not reach.

`patchserve router` runs as a user runs it, in front of one upstream announced in Redis the way a
gateway announces itself. The upstream is a small Starlette app on uvicorn (a real HTTP server),
not a gateway: these tests are about the relay — streaming answers as they come, uploads larger than
the router ever holds (with and without Content-Length), keep-alive reuse on both sides, a client
that leaves mid-stream (the upstream must see it), malformed requests, Expect: 100-continue, HEAD.
The gateways behind the router are tested through it in tests/test_scale_out.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
import time

import httpx
import psutil
import pytest
import redis
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from adapters_store.redis_server import EmbeddedRedis
from adapters_store.replicas import ReplicaDirectory, ReplicaInfo
from tests.gateway_server import RouterProcess
from tests.prometheus_server import free_port

BIG = 40 << 20  # over the router's 16 MiB hold limit: must stream through


class Upstream:
    """The stand-in gateway: streams, counts uploads, notices disconnects."""

    def __init__(self):
        self.port = free_port()
        self.disconnected = threading.Event()
        routes = [Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/admin/upload", self.upload, methods=["POST", "PUT"]),
                  Route("/admin/forever", self.forever),
                  Route("/admin/echo", self.echo, methods=["GET", "HEAD", "DELETE"])]
        config = uvicorn.Config(Starlette(routes=routes), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    async def completions(self, request: Request) -> Response:
        body = await request.json()

        async def events():
            for i in range(body.get("n", 5)):
                yield f"data: {{\"i\": {i}, \"model\": \"{body['model']}\"}}\n\n"
                await asyncio.sleep(body.get("gap_s", 0.0))
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    async def upload(self, request: Request) -> Response:
        digest, size = hashlib.sha256(), 0
        async for piece in request.stream():
            digest.update(piece)
            size += len(piece)
        return JSONResponse({"bytes": size, "sha256": digest.hexdigest(),
                             "chunked": "transfer-encoding" in request.headers})

    async def forever(self, request: Request) -> Response:
        async def ticks():
            try:
                while True:
                    yield b"tick\n"
                    await asyncio.sleep(0.05)
            finally:  # endless: only a disconnect (Starlette cancels the stream) ends it
                self.disconnected.set()
        return StreamingResponse(ticks(), media_type="text/plain")

    async def echo(self, request: Request) -> Response:
        return JSONResponse({"method": request.method, "query": request.url.query})


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    root = tmp_path_factory.mktemp("relay")
    server = EmbeddedRedis(root / "redis", free_port()).start()
    upstream = Upstream()
    upstream.thread.start()
    while not upstream.server.started:
        time.sleep(0.05)
    directory = ReplicaDirectory(redis.Redis.from_url(server.url))
    stop = threading.Event()

    def heartbeat():
        info = ReplicaInfo(id="up", url=f"http://127.0.0.1:{upstream.port}", base="base-x", names=["base-x"],
                           ready=True, started_at=time.time())
        while not stop.is_set():
            directory.announce(info, 2.0)
            stop.wait(0.5)
    beating = threading.Thread(target=heartbeat, daemon=True)
    beating.start()
    proc = RouterProcess(server.url, root).start()
    try:
        yield proc, upstream
    finally:
        proc.stop()
        stop.set()
        upstream.server.should_exit = True
        server.stop()


def test_a_stream_arrives_as_it_is_made_with_the_replica_named(router):
    proc, _ = router
    with httpx.Client(base_url=proc.url) as client:
        with client.stream("POST", "/v1/completions", json={"model": "base-x", "n": 4, "gap_s": 0.3}) as r:
            assert r.status_code == 200 and r.headers["x-patchserve-replica"] == "up"
            assert r.headers["content-type"].startswith("text/event-stream")
            arrivals = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    arrivals.append((time.monotonic(), line))
    assert [line for _, line in arrivals][-1] == "data: [DONE]" and len(arrivals) == 5
    assert '"model": "base-x"' in arrivals[0][1]
    # Not buffered: the events arrive spread over the 1.2 s the upstream takes, not all at the end.
    assert arrivals[-1][0] - arrivals[0][0] > 0.8


def test_keep_alive_connections_are_reused_even_after_the_upstream_closes_idle_ones(router):
    proc, _ = router
    with httpx.Client(base_url=proc.url) as client:
        for i in range(30):
            r = client.get("/admin/echo", params={"i": i})
            assert r.status_code == 200 and r.json() == {"method": "GET", "query": f"i={i}"}
        time.sleep(5.5)  # uvicorn closes an idle keep-alive connection after 5 s
        assert client.delete("/admin/echo").json()["method"] == "DELETE"
        head = client.head("/admin/echo")
        assert head.status_code == 200 and head.content == b""
        assert client.get("/admin/echo", params={"after": "head"}).json()["query"] == "after=head"


@pytest.mark.parametrize("sized", [True, False], ids=["content-length", "chunked"])
def test_an_upload_larger_than_the_router_holds_streams_through(router, sized):
    proc, _ = router
    payload = bytes(range(256)) * (BIG // 256)
    rss_before = psutil.Process(proc.proc.pid).memory_info().rss

    def pieces():
        for at in range(0, len(payload), 1 << 20):
            yield payload[at:at + (1 << 20)]
    with httpx.Client(base_url=proc.url, timeout=60) as client:
        r = client.post("/admin/upload", content=payload if sized else pieces(),
                        headers={"expect": "100-continue"} if sized else {})
    assert r.status_code == 200, r.text
    assert r.json() == {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest(), "chunked": not sized}
    grew = psutil.Process(proc.proc.pid).memory_info().rss - rss_before
    assert grew < BIG // 2, f"the router grew by {grew} bytes for a {BIG}-byte upload: it held it"


def test_a_client_that_leaves_mid_stream_is_seen_by_the_upstream(router):
    proc, upstream = router
    upstream.disconnected.clear()
    with httpx.Client(base_url=proc.url) as client:
        with client.stream("GET", "/admin/forever") as r:
            assert next(r.iter_bytes()).startswith(b"tick")
    assert upstream.disconnected.wait(5), "the upstream kept streaming to a client that had gone"


def test_a_malformed_request_is_a_400_and_the_router_keeps_serving(router):
    proc, _ = router
    with socket.create_connection(("127.0.0.1", proc.port), timeout=5) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400 ")
    with socket.create_connection(("127.0.0.1", proc.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 99999999999\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 413 ")
    assert httpx.get(f"{proc.url}/readyz").json()["status"] == "ready"


def test_the_routers_own_endpoints_answer_through_the_relay(router):
    proc, _ = router
    assert httpx.get(f"{proc.url}/healthz").json() == {"status": "ok"}
    models = httpx.get(f"{proc.url}/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["base-x"]
    assert b"patchserve_router_requests_total" in httpx.get(f"{proc.url}/metrics").content
    assert httpx.get(f"{proc.url}/nowhere").status_code == 404
