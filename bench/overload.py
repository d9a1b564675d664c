"""Overload: the service driven at several times its capacity, then back to normal.

    .venv/bin/python bench/overload.py                      # digits, 3 x 5 s phases
    .venv/bin/python bench/overload.py --seconds 10 --overload-clients 512

Not a test: a bounded run against a real `python -m service.main` on 127.0.0.1, in three
phases of closed-loop load on keep-alive connections (raw asyncio, as bench/loadgen.py):

  1. capacity: `--clients` connections, the throughput the service sustains;
  2. overload: `--overload-clients` connections (many times the queue), for the same time;
  3. recovery: `--clients` again, at once.

It reports, per phase, throughput and latency percentiles per status; for the overload, the
share of 503s, their p99 (they must be fast), whether every 503 carried Retry-After, and any
other 5xx (there must be none); and recovery throughput as a ratio of capacity (about 1).
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

REPO_ROOT = Path(__file__).resolve().parent.parent
DIGITS = REPO_ROOT / "models" / "digits" / "1" / "model.onnx"
BODY = json.dumps(
    {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]}
).encode()


@dataclass
class Phase:
    deadline: float
    latencies: dict[int, list[float]] = field(default_factory=dict)  # status -> ms
    without_retry_after: int = 0
    broken: int = 0  # connections that died mid-response

    def record(self, status: int, ms: float, head: bytes) -> None:
        self.latencies.setdefault(status, []).append(ms)
        if status == 503 and b"\r\nretry-after:" not in head:
            self.without_retry_after += 1

    def summary(self, seconds: float) -> dict[str, object]:
        ok = self.latencies.get(200, [])
        out: dict[str, object] = {
            "rps_ok": round(len(ok) / seconds, 1),
            "statuses": {str(s): len(v) for s, v in sorted(self.latencies.items())},
            "broken_connections": self.broken,
        }
        for status, values in sorted(self.latencies.items()):
            out[f"p50_ms_{status}"] = round(percentile(values, 0.50), 3)
            out[f"p99_ms_{status}"] = round(percentile(values, 0.99), 3)
        if 503 in self.latencies:
            out["503_without_retry_after"] = self.without_retry_after
        out["other_5xx"] = sum(len(v) for s, v in self.latencies.items() if s >= 500 and s != 503)
        return out


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else 0.0


class Client(asyncio.Protocol):
    """One keep-alive connection: send, read the whole response, send again, until the end."""

    def __init__(self, request: bytes, phase: Phase, done: asyncio.Future[None]) -> None:
        self.request, self.phase, self.done = request, phase, done
        self.buffer = bytearray()
        self.sent = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        if time.monotonic() > self.phase.deadline:
            self.transport.close()
            return
        self.sent = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        response = take_response(self.buffer)
        if response is None:
            return
        status, head = response
        self.phase.record(status, (time.perf_counter() - self.sent) * 1e3, head)
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.buffer or (exc is not None):
            self.phase.broken += 1
        if not self.done.done():
            self.done.set_result(None)


async def run_phase(port: int, clients: int, seconds: float) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    request = (
        f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY
    phase = Phase(time.monotonic() + seconds)
    done = [loop.create_future() for _ in range(clients)]
    start = time.perf_counter()
    for future in done:
        await loop.create_connection(lambda f=future: Client(request, phase, f), "127.0.0.1", port)
    await asyncio.wait_for(asyncio.gather(*done), timeout=seconds + 60)
    return phase.summary(time.perf_counter() - start)


@contextlib.contextmanager
def service_process(
    port: int, repo: Path, log: Path, settings: dict[str, str]
) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m service.main` on 127.0.0.1:`port` serving `repo`, ready; stopped afterwards."""
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
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.main"], cwd=REPO_ROOT, env=env, stdout=sink, stderr=sink
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1)
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the service is not ready: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextlib.contextmanager
def digits_service(port: int, queue_size: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    work = Path(tempfile.mkdtemp(prefix="overload-"))
    (work / "repo" / "digits" / "1").mkdir(parents=True)
    shutil.copyfile(DIGITS, work / "repo" / "digits" / "1" / "model.onnx")
    try:
        with service_process(port, work / "repo", log, {"max_queue_size": str(queue_size)}) as p:
            yield p
    finally:
        shutil.rmtree(work, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each phase")
    parser.add_argument("--clients", type=int, default=8, help="connections at capacity")
    parser.add_argument("--overload-clients", type=int, default=256)
    parser.add_argument("--queue-size", type=int, default=16, help="FOLDSERVE_MAX_QUEUE_SIZE")
    args = parser.parse_args()
    port = free_port()
    log = Path(tempfile.gettempdir()) / f"overload-{port}.log"
    with digits_service(port, args.queue_size, log):
        asyncio.run(run_phase(port, args.clients, 1.0))  # warm-up, not reported
        results = {
            phase: asyncio.run(run_phase(port, clients, args.seconds))
            for phase, clients in (
                ("capacity", args.clients),
                ("overload", args.overload_clients),
                ("recovery", args.clients),
            )
        }
    capacity = float(results["capacity"]["rps_ok"])  # type: ignore[arg-type]
    results["recovery_ratio"] = round(float(results["recovery"]["rps_ok"]) / capacity, 3)  # type: ignore[arg-type]
    results["date"] = datetime.date.today().isoformat()
    results["args"] = vars(args)
    print(json.dumps(results, indent=2))
    overload = results["overload"]
    healthy = overload["other_5xx"] == 0 and overload.get("503_without_retry_after", 0) == 0  # type: ignore[index,union-attr]
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
