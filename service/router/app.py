"""The router: /v1 and /admin relayed to the right gateway (proxy.py); its own health, readiness, metrics, models.

Why a router tier and not one gateway hosting several bases: each base's engine is its own set of
processes (vLLM spawns them) with its own memory, so per-base gateways scale, restart and fail apart,
one Deployment each on Kubernetes; the router holds no state but a view of Redis, costs one local
hop (measured: loadtests/bench_scale_out.py), and any number of routers can run side by side.

The app below answers the router's own endpoints on a local socket; the relay (proxy.Relay) owns
the public port, started and stopped with the app, so a drain stops it after the app is not ready.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from adapters_store.registry import Registry
from adapters_store.replicas import ReplicaDirectory
from service import metrics
from service.drain import Drain
from service.router.proxy import Relay
from service.router.table import RoutingTable


def create_router_app(directory: ReplicaDirectory, registry: Registry, host: str, port: int, local_socket: str,
                      drain: Drain | None = None, refresh_s: float = 0.25, close_timeout_s: float = 30.0,
                      on_ready=None) -> Starlette:
    """The router over the replicas announced in `directory` and the aliases in `registry`, listening on
    (host, port); serve the returned app on the Unix socket `local_socket`."""
    drain = drain or Drain()
    table = RoutingTable(directory, registry, refresh_s)
    relay = Relay(table, local_socket)

    @asynccontextmanager
    async def lifespan(_):
        await table.start()
        await relay.start(host, port)
        if on_ready is not None:
            on_ready()
        yield
        await relay.close(close_timeout_s)
        await table.stop()

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(_: Request) -> Response:
        if drain.draining:
            return JSONResponse({"status": "not ready", "reason": "draining"}, status_code=503)
        routable = [r for r in table.view.replicas if r.routable]
        if not routable:
            return JSONResponse({"status": "not ready", "reason": "no live replica announces itself"},
                                status_code=503)
        return JSONResponse({"status": "ready", "replicas": len(routable),
                             "bases": sorted({r.base for r in routable}),
                             "registry": "reachable" if table.registry_reachable else "unreachable (routing on "
                                                                                      "the last known view)"})

    async def models(_: Request) -> Response:
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "patchserve", "root": base}
                for name, base in table.models()]
        return JSONResponse({"object": "list", "data": data})

    async def prometheus(_: Request) -> Response:
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    async def view(_: Request) -> Response:
        """The router's own view (no key needed: it names replicas and bases, nothing a tenant sent)."""
        now = time.time()
        return JSONResponse({"read_at": table.view.read_at, "age_s": round(now - table.view.read_at, 3),
                             "replicas": [{"id": r.id, "url": r.url, "base": r.base, "routable": r.routable,
                                           "heartbeat_age_s": round(now - r.heartbeat_at, 3)}
                                          for r in table.view.replicas]})

    routes = [Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", prometheus),
              Route("/router", view), Route("/v1/models", models)]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.table = table
    return app
