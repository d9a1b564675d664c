"""A closed-loop HTTP/1.1 load generator on raw asyncio protocols (uvloop when present).

Why not httpx: its per-request Python cost caps it near 1,000 req/s on this machine, so it
would measure itself. Here each of `concurrency` keep-alive connections sends one prebuilt
request, waits for the whole response (Content-Length framing), and sends the next at once,
until `requests` responses or `seconds` have passed. The first `warmup` responses are not
counted. Run it pinned to a core of its own (`taskset -c 1`); it prints one JSON object.

    python bench/loadgen.py --port 8000 --path /v2/models/digits/infer \
        --body body.bin [--header 'Inference-Header-Content-Length: 123'] -c 64 -n 20000 -t 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

with contextlib.suppress(ImportError):
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


@dataclass
class Tally:
    """Shared by every connection: how many to send, and what came back."""

    budget: int
    deadline: float
    warmup: int
    latencies_ns: list[int] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    done: int = 0
    started_ns: int = 0  # when the warm-up ended

    def take(self) -> bool:
        if self.budget <= 0 or time.monotonic() > self.deadline:
            return False
        self.budget -= 1
        return True

    def record(self, status: int, latency_ns: int) -> None:
        self.done += 1
        if self.done == self.warmup:
            self.started_ns = time.perf_counter_ns()
        if self.done <= self.warmup:
            return
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status == 200:
            self.latencies_ns.append(latency_ns)
        else:
            self.errors += 1


class Connection(asyncio.Protocol):
    """One keep-alive connection sending `request` again each time a response is complete."""

    def __init__(self, request: bytes, tally: Tally, finished: asyncio.Future[None]) -> None:
        self.request = request
        self.tally = tally
        self.finished = finished
        self.buffer = bytearray()
        self.sent_ns = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        if not self.tally.take():
            self.transport.close()
            return
        self.sent_ns = time.perf_counter_ns()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        response = take_response(self.buffer)
        if response is None:
            return
        self.tally.record(response[0], time.perf_counter_ns() - self.sent_ns)
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.tally.errors += 1
        if self.sent_ns and self.buffer:
            self.tally.errors += 1
        if not self.finished.done():
            self.finished.set_result(None)


def take_response(buffer: bytearray) -> tuple[int, bytes] | None:
    """Remove the first whole HTTP/1.1 response from `buffer`: (status, lower-cased head).

    None while it is incomplete. Parsed by hand: this runs once per request on the load
    generator's own core, where an HTTP library would cost more than the server it measures.
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buffer[: end + 2]).lower()
    start = head.find(b"\r\ncontent-length:")  # not inference-header-content-length
    length = int(head[start + 17 : head.find(b"\r\n", start + 2)]) if start >= 0 else 0
    if len(buffer) < end + 4 + length:
        return None
    del buffer[: end + 4 + length]
    return int(head[9:12]), head


def build_request(host: str, port: int, path: str, body: bytes, headers: list[str]) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        f"Content-Length: {len(body)}",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def drive(args: argparse.Namespace, request: bytes) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    tally = Tally(args.requests + args.warmup, time.monotonic() + args.seconds, args.warmup)
    finished = [loop.create_future() for _ in range(args.concurrency)]
    for future in finished:
        await loop.create_connection(
            lambda f=future: Connection(request, tally, f), args.host, args.port
        )
    await asyncio.gather(*finished)
    return summarise(tally, time.perf_counter_ns())


def summarise(tally: Tally, end_ns: int) -> dict[str, object]:
    latencies = sorted(tally.latencies_ns)
    counted = len(latencies) + tally.errors
    seconds = (end_ns - tally.started_ns) / 1e9 if tally.started_ns else 0.0

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] / 1e6 if latencies else 0

    return {
        "requests": counted,
        "ok": len(latencies),
        "errors": tally.errors,
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "seconds": round(seconds, 3),
        "rps": round(len(latencies) / seconds, 1) if seconds > 0 else 0.0,
        "p50_ms": round(pct(0.50), 3),
        "p90_ms": round(pct(0.90), 3),
        "p99_ms": round(pct(0.99), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--body", type=Path, required=True, help="file holding the request body")
    parser.add_argument("--header", action="append", default=[], help="extra 'Name: value'")
    parser.add_argument("-c", "--concurrency", type=int, default=1)
    parser.add_argument("-n", "--requests", type=int, default=10_000, help="counted responses")
    parser.add_argument("-t", "--seconds", type=float, default=10.0, help="time limit")
    parser.add_argument("-w", "--warmup", type=int, default=200, help="responses not counted")
    args = parser.parse_args()
    request = build_request(args.host, args.port, args.path, args.body.read_bytes(), args.header)
    result = asyncio.run(drive(args, request))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
