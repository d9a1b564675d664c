"""Overload: the service offered several times its capacity, then back to normal.

    .venv/bin/python bench/overload.py                        # ResNet-18-style, 2x 4x 8x
    .venv/bin/python bench/overload.py --model digits --factors 2 --seconds 5

Not a test: a bounded run against a real `python -m service.main` on 127.0.0.1, pinned to core
0 with ONNX Runtime on one thread, while this script, the load generator (raw asyncio, as
bench/loadgen.py), runs on core 1. Phases:

  1. capacity: closed loop on `--clients` keep-alive connections: the throughput C the service
     sustains (every answer a 200);
  2. overload, once per factor k: open loop, requests sent at k × C per second on a fixed
     schedule whether or not earlier ones were answered, on `--connections` connections opened
     beforehand (and new ones, up to `--max-connections`, when none is idle). Latency runs
     from the scheduled send time, so a server that falls behind cannot hide it (no
     coordinated omission);
  3. recovery: the closed loop of phase 1 again, at once: its throughput over C should be ~1.

Why open loop: a closed loop of N connections keeps exactly N requests outstanding, so by
Little's law every answer, 503 or 200, takes N / (answers per second) however cheap a refusal
is; that measures the client's concurrency, not the service. An offered rate is what overload
means.

The default model is the ResNet-18-style net at 3×64×64 (random weights, BN folded, exported by
the project's exporter), sent as binary tensors: its capacity is set by inference, so refusals,
which cost only HTTP, can keep up with several times it. With `--model digits` (microseconds per
inference) capacity is the HTTP path itself, and a refusal costs about what an answer does.

Printed: per phase, offered and answered rates, statuses, p50/p99 per status, 503s without
Retry-After, other 5xx, broken connections, requests never answered and requests that found
every connection busy (all must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from loadgen import take_response  # bench/ is this script's folder, first on sys.path
from serve import DIGITS_ONNX, export_resnet18, make_workload

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVER_CORE, LOAD_CORE = 0, 1
KEEP_ALIVE_S = 4.0  # below uvicorn's keep-alive timeout (5 s)
SHAPES = {"resnet18": (1, 3, 64, 64), "digits": (1, 1, 8, 8)}


@dataclass
class Phase:
    """What one phase's requests got back."""

    latencies: dict[int, list[float]] = field(default_factory=dict)  # status -> ms
    without_retry_after: int = 0
    broken: int = 0  # connections that died with a request outstanding
    unanswered: int = 0  # still outstanding when the phase's drain time ran out
    unsent: int = 0  # due while all --max-connections were busy: the server fell far behind
    sent: int = 0

    def record(self, status: int, ms: float, head: bytes) -> None:
        self.latencies.setdefault(status, []).append(ms)
        if status == 503 and b"\r\nretry-after:" not in head:
            self.without_retry_after += 1

    def summary(self, seconds: float) -> dict[str, object]:
        ok = self.latencies.get(200, [])
        out: dict[str, object] = {
            "sent_per_s": round(self.sent / seconds, 1),
            "ok_per_s": round(len(ok) / seconds, 1),
            "statuses": {str(s): len(v) for s, v in sorted(self.latencies.items())},
        }
        for status, values in sorted(self.latencies.items()):
            out[f"p50_ms_{status}"] = round(percentile(values, 0.50), 2)
            out[f"p99_ms_{status}"] = round(percentile(values, 0.99), 2)
            out[f"max_ms_{status}"] = round(max(values), 2)
        out["503_without_retry_after"] = self.without_retry_after
        out["other_5xx"] = sum(len(v) for s, v in self.latencies.items() if s >= 500 and s != 503)
        out["broken_connections"] = self.broken
        out["unanswered"] = self.unanswered
        out["unsent"] = self.unsent
        return out

    @property
    def healthy(self) -> bool:
        other_5xx = any(s >= 500 and s != 503 for s in self.latencies)
        failures = self.without_retry_after + self.broken + self.unanswered + self.unsent
        return not other_5xx and failures == 0


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else 0.0


class Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time; `on_idle` is told when it is
    free again, `on_lost` when it closes."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.buffer = bytearray()
        self.scheduled = 0.0  # perf_counter time the outstanding request was due; 0 when idle
        self.idle_since = time.perf_counter()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes, scheduled: float) -> None:
        assert self.transport is not None
        self.scheduled = scheduled
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        response = take_response(self.buffer)
        if response is None:
            return
        status, head = response
        self.pool.phase.record(status, (time.perf_counter() - self.scheduled) * 1e3, head)
        self.scheduled = 0.0
        self.idle_since = time.perf_counter()
        self.pool.on_idle(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.on_lost(self)


class Pool:
    """The load generator's connections: idle ones are reused, new ones opened on demand."""

    def __init__(self, port: int, request: bytes, max_connections: int) -> None:
        self.port, self.request, self.max_connections = port, request, max_connections
        self.idle: list[Connection] = []
        self.open: set[Connection] = set()
        self.opening = 0
        self.phase = Phase()
        self.closed_loop_until = 0.0  # closed loop: an idle connection sends again until then
        self.outstanding = 0

    async def connect(self) -> Connection:
        self.opening += 1
        try:
            loop = asyncio.get_running_loop()
            _, conn = await loop.create_connection(lambda: Connection(self), "127.0.0.1", self.port)
        finally:
            self.opening -= 1
        self.open.add(conn)
        return conn

    async def fill(self, count: int) -> None:
        """Open connections until `count` are idle: connecting costs the server too, so a
        phase should not pay for it in its first second."""
        while len(self.idle) < count and len(self.open) < self.max_connections:
            self.idle.append(await self.connect())

    def take_idle(self) -> Connection | None:
        """The most recently used idle connection; ones idle for longer than the server keeps
        them (uvicorn closes after 5 s) are closed here first, so that no request is written
        onto a connection the server is closing."""
        while self.idle:
            conn = self.idle.pop()
            if time.perf_counter() - conn.idle_since < KEEP_ALIVE_S:
                return conn
            self.open.discard(conn)
            if conn.transport is not None:
                conn.transport.close()
        return None

    def send(self, conn: Connection, scheduled: float) -> None:
        self.phase.sent += 1
        self.outstanding += 1
        conn.send(self.request, scheduled)

    def on_idle(self, conn: Connection) -> None:
        self.outstanding -= 1
        if time.perf_counter() < self.closed_loop_until:
            self.send(conn, time.perf_counter())
        else:
            self.idle.append(conn)

    def on_lost(self, conn: Connection) -> None:
        self.open.discard(conn)
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)
        if conn.scheduled:
            self.outstanding -= 1
            self.phase.broken += 1

    async def drain(self, timeout: float) -> None:
        """Wait for outstanding requests; those left at `timeout` count as unanswered."""
        deadline = time.perf_counter() + timeout
        while (self.outstanding or self.opening) and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        self.phase.unanswered += self.outstanding

    def close(self) -> None:
        for conn in list(self.open):
            if conn.transport is not None:
                conn.transport.close()


async def closed_loop(pool: Pool, clients: int, seconds: float) -> dict[str, object]:
    """`clients` connections, each sending again as soon as it is answered."""
    pool.phase = Phase()
    await pool.fill(clients)
    start = time.perf_counter()
    pool.closed_loop_until = start + seconds
    for _ in range(clients):
        conn = pool.take_idle() or await pool.connect()
        pool.send(conn, time.perf_counter())
    await asyncio.sleep(seconds)
    await pool.drain(30)
    return pool.phase.summary(time.perf_counter() - start)


async def open_loop(pool: Pool, rate: float, seconds: float, connections: int) -> dict[str, object]:
    """Requests due every 1/`rate` s for `seconds`, each on an idle connection (`connections`
    are opened beforehand) or, when none is idle, a new one."""
    pool.phase = Phase()
    pool.closed_loop_until = 0.0
    await pool.fill(connections)
    start = time.perf_counter()
    total = int(rate * seconds)
    sent = 0
    while sent < total:
        due = min(total, int((time.perf_counter() - start) * rate) + 1)
        for n in range(sent, due):
            scheduled = start + n / rate
            conn = pool.take_idle()
            if conn is not None:
                pool.send(conn, scheduled)
            elif len(pool.open) + pool.opening < pool.max_connections:
                asyncio.get_running_loop().create_task(_send_on_new(pool, scheduled))
            else:
                pool.phase.unsent += 1
        sent = due
        await asyncio.sleep(max(0.0, start + sent / rate - time.perf_counter()))
    await pool.drain(30)
    return pool.phase.summary(time.perf_counter() - start)


async def _send_on_new(pool: Pool, scheduled: float) -> None:
    pool.send(await pool.connect(), scheduled)


async def run_all(port: int, request: bytes, args: argparse.Namespace) -> dict[str, object]:
    pool = Pool(port, request, args.max_connections)
    try:
        await closed_loop(pool, args.clients, 1.0)  # warm-up, not reported
        results: dict[str, object] = {}
        capacity = await closed_loop(pool, args.clients, args.seconds)
        results["capacity"] = capacity
        rate = float(capacity["ok_per_s"])  # type: ignore[arg-type]
        for factor in args.factors:
            phase = await open_loop(pool, factor * rate, args.seconds, args.connections)
            results[f"overload_{factor:g}x"] = phase
            phase["healthy"] = pool.phase.healthy
        recovery = await closed_loop(pool, args.clients, args.seconds)
        results["recovery"] = recovery
        results["recovery_ratio"] = round(float(recovery["ok_per_s"]) / rate, 3)  # type: ignore[arg-type]
        return results
    finally:
        pool.close()


@contextlib.contextmanager
def service_process(
    port: int, repo: Path, log: Path, settings: dict[str, str]
) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m service.main` on 127.0.0.1:`port` serving `repo`, pinned to the server's
    core, ready; stopped afterwards."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOLDSERVE_")}
    env.update(
        FOLDSERVE_REPOSITORY=str(repo),
        FOLDSERVE_PORT=str(port),
        FOLDSERVE_INTRA_OP_THREADS="1",
        FOLDSERVE_INTER_OP_THREADS="1",
        FOLDSERVE_ACCESS_LOG="false",
        FOLDSERVE_SHUTDOWN_GRACE_S="0",
    )
    env.update({f"FOLDSERVE_{k.upper()}": v for k, v in settings.items()})
    with running_service(env, log, core=SERVER_CORE) as process:
        yield process


@contextlib.contextmanager
def running_service(
    env: dict[str, str], log: Path, core: int | None = None, ready_s: float = 180
) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m service.main` with `env` (FOLDSERVE_PORT says where), pinned to `core` when
    given and taskset exists, once /v2/health/ready answers; terminated (killed if it must be)
    afterwards. Shared by the benches that start the service."""
    port = int(env["FOLDSERVE_PORT"])
    command = [sys.executable, "-m", "service.main"]
    if core is not None and shutil.which("taskset"):
        command = ["taskset", "-c", str(core), *command]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=sink, stderr=sink)
    try:
        deadline = time.monotonic() + ready_s
        while True:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2)
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the service is not ready: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def build(model: str, body: str, work: Path) -> tuple[Path, bytes]:
    """The model file, and the request to send, as bytes on the wire."""
    onnx = DIGITS_ONNX if model == "digits" else export_resnet18(work, SHAPES[model][-1])
    workload = make_workload(model, onnx, SHAPES[model], work)
    path = f"/v2/models/{model}/infer"
    if body == "json":
        payload, extra = workload.json_body.read_bytes(), "Content-Type: application/json\r\n"
    else:
        payload, extra = workload.binary_body.read_bytes(), workload.binary_header + "\r\n"
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Content-Length: {len(payload)}\r\n"
    return onnx, head.encode() + b"\r\n" + payload


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="resnet18")
    parser.add_argument("--body", choices=["binary", "json"], default="binary")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    parser.add_argument("--clients", type=int, default=16, help="connections at capacity")
    parser.add_argument(
        "--factors",
        type=lambda s: [float(f) for f in s.split(",")],
        default=[2.0, 4.0, 8.0],
        help="offered load in the overload phases, as multiples of capacity",
    )
    parser.add_argument(
        "--connections", type=int, default=256, help="opened before each overload phase"
    )
    parser.add_argument("--max-connections", type=int, default=1000)
    parser.add_argument("--queue-size", type=int, default=32, help="FOLDSERVE_MAX_QUEUE_SIZE")
    parser.add_argument("--max-batch-size", type=int, default=16, help="FOLDSERVE_MAX_BATCH_SIZE")
    args = parser.parse_args()
    counts = (args.clients, args.connections, args.max_connections, args.queue_size)
    if min(counts) < 1 or args.seconds <= 0 or not all(f > 0 for f in args.factors):
        parser.error("counts, --seconds and every factor must be positive")
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setaffinity(0, {LOAD_CORE})
    work = Path(tempfile.mkdtemp(prefix="overload-"))
    try:
        onnx, request = build(args.model, args.body, work)
        (work / "repo" / args.model / "1").mkdir(parents=True)
        shutil.copyfile(onnx, work / "repo" / args.model / "1" / "model.onnx")
        settings = {
            "max_queue_size": str(args.queue_size),
            "max_batch_size": str(args.max_batch_size),
        }
        port = free_port()
        with service_process(port, work / "repo", work / "server.log", settings):
            results = asyncio.run(run_all(port, request, args))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["date"] = datetime.date.today().isoformat()
    results["args"] = vars(args)
    print(json.dumps(results, indent=2))
    overloads = [v for k, v in results.items() if k.startswith("overload_")]
    return 0 if all(o["healthy"] for o in overloads) else 1  # type: ignore[index]


if __name__ == "__main__":
    sys.exit(main())
