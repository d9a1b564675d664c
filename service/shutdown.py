"""Graceful shutdown: SIGTERM drains the server instead of dropping what it holds.

On SIGTERM a server process
1. turns readiness false at once and answers new inference and repository control with 503,
   while it still accepts connections for `shutdown_grace_s` seconds, so that load balancers
   and Kubernetes see it leave and send their traffic elsewhere;
2. then has uvicorn close the listening socket and wait for every request in flight, and with
   them everything queued behind them, before the lifespan shutdown; for `shutdown_timeout_s`
   at most (uvicorn's graceful-shutdown timeout), after which what still runs is cancelled, so
   a client that never finishes its body cannot keep the process alive;
3. and exits 0.

uvicorn alone stops accepting on the first signal, so a load balancer that has not noticed yet
gets refused connections, and it re-raises the signal once done, so the process dies with 143,
which orchestrators log as a crash. SIGINT (Ctrl-C) drains without the grace period, as a
person at a terminal expects; a second SIGINT stops at once, as uvicorn's does.

uvicorn has no hook for the signal handling of the server that runs an app, whether in this
process or in a worker process its supervisor spawned, so `drained` takes it over when the app
is loaded: the handler uvicorn's `Server.capture_signals` installed just before is a bound
method of that `Server`, which is how the drain reaches its `should_exit`. On the way out
`capture_signals` restores the original handlers and, having captured no signal, re-raises none.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import threading
import time
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger(__name__)

# Readiness of the server and of each model (version): false while draining.
_READINESS = re.compile(r"^/v2/(health|models/[^/]+(/versions/[^/]+)?)/ready$")
# What a draining server refuses: new work. Metadata, statistics and /metrics still answer.
_REFUSED = re.compile(
    r"^/v2/(models/[^/]+(/versions/[^/]+)?/(infer|classify)|repository/models/[^/]+/(load|unload))$"
)
DRAINING_MESSAGE = "the server is shutting down; send the request to another instance"


class Drain:
    """Whether this process is draining; set by the signal handler, read by the middleware.

    A plain attribute, so setting it inside a signal handler is safe and takes effect for the
    very next request.
    """

    def __init__(self) -> None:
        self.since: float | None = None

    @property
    def active(self) -> bool:
        return self.since is not None

    def start(self) -> bool:
        """Start draining; False if it had already started."""
        if self.since is not None:
            return False
        self.since = time.monotonic()
        return True


class DrainMiddleware:
    """Pure ASGI, around the whole app: while draining, readiness is false and new work is 503.

    Readiness answers as the readiness routes do when not ready (400, Triton's choice, with
    `ready: false`), so probes need no special case. A refused request also gets
    `Connection: close`, so a client on a kept-alive connection reconnects, through its load
    balancer, to an instance that is not leaving.
    """

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.drain.active:
            path = scope["path"]
            if _READINESS.match(path):
                await _answer(send, 400, {"ready": False, "error": DRAINING_MESSAGE})
                return
            if scope["method"] == "POST" and _REFUSED.match(path):
                await _answer(send, 503, {"error": DRAINING_MESSAGE}, close=True)
                return
        await self.app(scope, receive, send)


async def _answer(send: Send, status: int, payload: dict[str, object], close: bool = False) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers += [(b"connection", b"close"), (b"retry-after", b"1")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class GracefulShutdown:
    """The SIGTERM/SIGINT handler of one uvicorn `Server`: drain, wait out the grace, stop."""

    def __init__(
        self,
        server: uvicorn.Server,
        drain: Drain,
        grace_s: float,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.server = server
        self.drain = drain
        self.grace_s = grace_s
        self.loop = loop

    def handle(self, sig: int, frame: FrameType | None) -> None:
        """Runs between two bytecodes of the event loop's thread: set flags, schedule, return."""
        if not self.drain.start():
            if sig == signal.SIGINT:  # a second Ctrl-C: stop now, as uvicorn does
                self.server.force_exit = True
                self.server.should_exit = True
            return  # SIGTERM while draining (a supervisor forwarding Ctrl-C): already on it
        grace = self.grace_s if sig == signal.SIGTERM else 0.0
        self.loop.call_soon_threadsafe(self._begin, signal.Signals(sig).name, grace)

    def _begin(self, name: str, grace: float) -> None:
        logger.info(
            "%s: not ready, refusing new inference; closing the listening socket in %.1f s",
            name,
            grace,
        )
        self.loop.call_later(grace, self._stop)

    def _stop(self) -> None:
        logger.info("grace period over: no new connections; finishing the requests in flight")
        self.server.should_exit = True


def take_over_signals(drain: Drain, grace_s: float) -> GracefulShutdown | None:
    """Replace the SIGTERM/SIGINT handlers of the uvicorn `Server` loading this app.

    Must run in the event loop of that server (uvicorn calls app factories there). Returns None,
    leaving uvicorn's handling alone, when no uvicorn server's handler is installed (the app
    runs under a test client, another server, or outside the main thread).
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    if not isinstance(server, uvicorn.Server):
        logger.warning("not run by uvicorn's server: SIGTERM will stop without draining")
        return None
    shutdown = GracefulShutdown(server, drain, grace_s, asyncio.get_running_loop())
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, shutdown.handle)
    return shutdown


def drained(app: ASGIApp, grace_s: float) -> ASGIApp:
    """`app` behind the drain, with this process's signals handled by it (see the module)."""
    drain = Drain()
    take_over_signals(drain, grace_s)
    return DrainMiddleware(app, drain)
