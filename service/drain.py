"""SIGTERM drains: a process stops being ready before it stops listening, and finishes what it holds.

The order is what makes a rolling restart lose nothing:
1. SIGTERM: `/readyz` answers 503 and the heartbeat says `draining` at once, so routers (and a
   Kubernetes Service) stop sending new requests within a heartbeat;
2. for `grace_s` it still serves whatever a router sent before it saw that;
3. then it stops accepting connections and gives requests in flight up to `timeout_s` to finish
   (uvicorn's graceful shutdown), runs the app's shutdown, and exits 0.
Ctrl-C (SIGINT) stays what a person at a terminal expects: stop now.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

import uvicorn


@dataclass
class Drain:
    """Whether this process is draining, shared by the server, `/readyz` and the heartbeat."""

    started_at: float | None = None
    listeners: list[Callable[[], None]] = field(default_factory=list)
    on_stop: list[Callable[[], None]] = field(default_factory=list)  # told at a stop signal (Ctrl-C), every time

    @property
    def draining(self) -> bool:
        return self.started_at is not None

    def begin(self) -> None:
        """Start draining (once); tell every listener."""
        if self.started_at is None:
            self.started_at = time.monotonic()
            for listener in self.listeners:
                listener()


class DrainingServer(uvicorn.Server):
    """uvicorn's server with SIGTERM turned into a drain (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, drain: Drain, grace_s: float):
        super().__init__(config)
        self.drain = drain
        self.grace_s = grace_s

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM:
            for listener in self.drain.on_stop:
                listener()
            super().handle_exit(sig, frame)
            return
        # Not recorded as a captured signal: uvicorn would raise it again after shutdown, and the
        # default SIGTERM action kills the process before its exit handlers (the embedded Redis) run.
        self.drain.begin()

    async def on_tick(self, counter: int) -> bool:
        if self.drain.draining and time.monotonic() - self.drain.started_at >= self.grace_s:
            return True
        return await super().on_tick(counter)


def serve(app, host: str, port: int, drain: Drain, grace_s: float, timeout_s: float, uds: str | None = None) -> None:
    """Run `app` on (host, port), or on the Unix socket `uds`, until SIGINT, or SIGTERM and its drain."""
    config = uvicorn.Config(app, host=host, port=port, uds=uds, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=timeout_s)
    # Bound before the app starts (uvicorn binds only after the lifespan, which starts the engines: minutes):
    # a taken port fails at once instead of after the engine started, and nothing else can take the
    # address between "ready on" being printed and the first request. Connections made meanwhile wait in
    # the backlog until the app is ready.
    try:
        sock = config.bind_socket()  # logs the OS's error and exits on failure
    except SystemExit:
        where = uds or f"{host}:{port}"
        raise SystemExit(f"patchserve: cannot listen on {where} (the error above): stop what holds it, or give "
                         f"another --port") from None
    DrainingServer(config, drain, grace_s).run(sockets=[sock])
