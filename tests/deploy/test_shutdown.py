"""Graceful shutdown (service.shutdown): SIGTERM drains a real server, one process or several.

The end-to-end tests hold requests provably in flight (the slow model, and the server's own
pending-request gauge saying so before the signal), send SIGTERM, and count: every in-flight
request answered 200 with the right value, 503 for new inference and 'not ready' during the
grace period, and exit status 0 no sooner than the grace period.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from service.shutdown import Drain, DrainMiddleware, GracefulShutdown, take_over_signals
from tests.deploy.slow_model import answer, iterations_for, request, slow_model
from tests.service import onnx_models as om
from tests.service.live import LiveServer, start_server

GRACE_S = 1.5
IN_FLIGHT_S = 4.0  # how long each held request works: past the signal and the grace


# --------------------------------------------------------------------------- the middleware


async def _inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"inner"})


def _call(app: DrainMiddleware, method: str, path: str) -> tuple[int, dict[bytes, bytes]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app({"type": "http", "method": method, "path": path}, receive, send))
    return sent[0]["status"], dict(sent[0]["headers"])


@pytest.mark.parametrize(
    ("method", "path", "draining_status"),
    [
        ("GET", "/v2/health/ready", 400),
        ("GET", "/v2/models/digits/ready", 400),
        ("GET", "/v2/models/digits/versions/3/ready", 400),
        ("POST", "/v2/models/digits/infer", 503),
        ("POST", "/v2/models/digits/versions/3/infer", 503),
        ("POST", "/v2/models/digits/classify", 503),
        ("POST", "/v2/repository/models/digits/load", 503),
        ("POST", "/v2/repository/models/digits/unload", 503),
        ("GET", "/v2/health/live", 200),  # alive: an orchestrator must not restart it
        ("GET", "/v2/models/digits", 200),
        ("GET", "/metrics", 200),
        ("POST", "/v2/repository/index", 200),
    ],
)
def test_drain_refuses_new_work_and_turns_readiness_false(
    method: str, path: str, draining_status: int
) -> None:
    drain = Drain()
    app = DrainMiddleware(_inner, drain)
    assert _call(app, method, path)[0] == 200
    drain.start()
    status, headers = _call(app, method, path)
    assert status == draining_status
    if status == 503:
        assert headers[b"connection"] == b"close"  # the client reconnects, elsewhere


def test_drain_starts_once() -> None:
    drain = Drain()
    assert not drain.active
    assert drain.start()
    assert not drain.start()
    assert drain.active


# --------------------------------------------------------------------------- the signal handler


def _shutdown(grace_s: float) -> tuple[GracefulShutdown, uvicorn.Server, asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    server = uvicorn.Server(uvicorn.Config(_inner))
    return GracefulShutdown(server, Drain(), grace_s, loop), server, loop


def test_sigterm_drains_first_and_stops_after_the_grace_period() -> None:
    shutdown, server, loop = _shutdown(grace_s=0.2)
    try:
        start = time.monotonic()
        shutdown.handle(signal.SIGTERM, None)
        assert shutdown.drain.active and not server.should_exit  # readiness false at once
        shutdown.handle(signal.SIGTERM, None)  # a repeated SIGTERM changes nothing
        while not server.should_exit and time.monotonic() - start < 5:
            loop.run_until_complete(asyncio.sleep(0.02))
        assert server.should_exit and not server.force_exit
        assert time.monotonic() - start >= 0.2
    finally:
        loop.close()


def test_sigint_skips_the_grace_period_and_a_second_one_forces() -> None:
    shutdown, server, loop = _shutdown(grace_s=60)
    try:
        shutdown.handle(signal.SIGINT, None)
        loop.run_until_complete(asyncio.sleep(0.05))
        assert server.should_exit and not server.force_exit
        shutdown.handle(signal.SIGINT, None)
        assert server.force_exit
    finally:
        loop.close()


def test_without_uvicorn_signal_handling_nothing_is_taken_over() -> None:
    before = signal.getsignal(signal.SIGTERM)

    async def attempt() -> GracefulShutdown | None:
        return take_over_signals(Drain(), 1.0)

    assert asyncio.run(attempt()) is None
    assert signal.getsignal(signal.SIGTERM) is before


# --------------------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def slow_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("slow-repo")
    om.publish(root, "slow", 1, slow_model())
    return root


def _pending(live: LiveServer) -> int:
    text = httpx.get(f"{live.url}/metrics", timeout=10).text
    pattern = r'^nv_inference_pending_request_count\{model="slow"[^}]*\} (\S+)$'
    found = re.findall(pattern, text, re.MULTILINE)
    return int(sum(float(v) for v in found))


def _wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(params=[1, 2], ids=["one-process", "two-workers"])
def draining_server(request: pytest.FixtureRequest, slow_repo: Path) -> Iterator[LiveServer]:
    with start_server(
        slow_repo,
        models="slow",
        workers=str(request.param),
        shutdown_grace_s=str(GRACE_S),
        inline_max_us="0",  # the warm-up is instant, the requests are not: keep them off the loop
        warmup_runs="1",
    ) as live:
        yield live


@pytest.mark.slow
def test_sigterm_finishes_every_request_in_flight_refuses_new_ones_and_exits_0(
    draining_server: LiveServer,
) -> None:
    live = draining_server
    held = 3
    n = iterations_for(live.url, IN_FLIGHT_S)
    infer = f"{live.url}/v2/models/slow/infer"
    with ThreadPoolExecutor(held) as pool:
        in_flight: list[Future[httpx.Response]] = [
            pool.submit(httpx.post, infer, json=request(n), timeout=120) for _ in range(held)
        ]
        # Provably in flight: the server itself counts them pending (all workers added up).
        _wait_for(lambda: _pending(live) == held, 30, f"{held} pending requests")
        assert not any(f.done() for f in in_flight)

        signalled = time.monotonic()
        live.process.send_signal(signal.SIGTERM)
        ready = f"{live.url}/v2/health/ready"
        _wait_for(lambda: httpx.get(ready, timeout=5).status_code == 400, GRACE_S, "not ready")
        refused = httpx.post(infer, json=request(1), timeout=10)
        assert refused.status_code == 503, refused.text
        assert "shutting down" in refused.json()["error"]
        assert httpx.get(f"{live.url}/v2/health/live", timeout=5).status_code == 200

        responses = [f.result(timeout=120) for f in in_flight]  # none lost, none failed
        finished = time.monotonic()
    assert [r.status_code for r in responses] == [200] * held, [r.text for r in responses]
    assert [answer(r) for r in responses] == [float(n)] * held
    assert live.process.wait(timeout=60) == 0, live.logs()
    assert time.monotonic() - signalled >= GRACE_S
    # They outlived the grace period: the server had closed its socket and still finished them.
    assert finished - signalled > GRACE_S, "requests too short to test the drain"
    assert "SIGTERM: not ready" in live.logs()
