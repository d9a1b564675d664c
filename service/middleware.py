"""Pure-ASGI middlewares: the body size limit, compressed bodies, and the access log.

The limit works below FastAPI so it covers every body, multipart uploads included: a declared
Content-Length over the limit is refused before a byte is read, and a chunked body is counted
as it streams and cut off with 413 the moment it passes the limit; a body still incomplete
`body_timeout_s` after the app began reading it gets 408 and its connection closed. The access
log wraps
everything, so it sees those 413s too; it also is the last line of defence: an exception nobody
mapped is logged once, with its traceback, and answered 500 without one. Between the limit and
the app, a body sent with `Content-Encoding: gzip` or `deflate` is inflated in bounded steps,
refused with 413 the moment it passes its own limit (a zip bomb never inflates whole).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
import time
import uuid
import zlib
from http import HTTPStatus
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import BodyRefusedError, ClientGoneError
from service.metrics import Metrics

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("service.access")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


async def _send_json(send: Send, status: int, payload: dict[str, Any], close: bool = False) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:  # the rest of the body will not be read: the connection cannot be reused
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """A request body's two limits: its size, and the time it may take to arrive (counted from
    the app's first read), so that a client trickling its body cannot hold a queue place, a
    worker or a shutdown forever."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, body_timeout_s: float) -> None:
        self.app = app
        self.limit = max_body_bytes
        self.timeout = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _send_json(send, HTTPStatus.REQUEST_ENTITY_TOO_LARGE, _too_large(self.limit))
            return
        guard = _BodyGuard(receive, send, self.limit, self.timeout)
        try:
            with contextlib.suppress(BodyRefusedError):
                await self.app(scope, guard.receive, guard.send)
        finally:
            guard.stop_timer()


def _too_large(limit: int) -> dict[str, str]:
    return {"error": f"request body larger than the limit of {limit} bytes"}


class _BodyGuard:
    """One request's body, counted and timed as the app reads it; the 413 or 408 is sent once.

    The deadline is one timer per request, armed at the first read and cancelled once the body
    is complete; when it fires during a read, it cancels the reading task, and the read turns
    that cancellation into the 408. (An `asyncio.timeout` around every read cost 5 % of a small
    request's time on the event loop, and a large body arrives in thousands of reads.)
    """

    def __init__(self, receive: Receive, send: Send, limit: int, timeout: float) -> None:
        self._receive, self._send = receive, send
        self.limit, self.timeout = limit, timeout
        self.received = 0
        self.refused = self.complete = False
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[Any] | None = None
        self._reading = self._expired = False

    async def receive(self) -> Message:
        if self.complete:  # after the body, receive only waits for a disconnect: no deadline
            return await self._receive()
        if self._expired:
            await self._refuse_late()
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.timeout, self._expire)
        self._task = asyncio.current_task()  # the one to interrupt if the deadline passes now
        self._reading = True
        try:
            message = await self._receive()
        except asyncio.CancelledError:
            if not self._expired or self._task is None:
                raise
            self._task.uncancel()  # our own cancellation: answer 408 instead
            await self._refuse_late()
        finally:
            self._reading = False
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                await self._refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, _too_large(self.limit))
            if not message.get("more_body", False):
                self.complete = True
                self.stop_timer()
        return message

    async def send(self, message: Message) -> None:
        if not self.refused:  # once the 413 or 408 is out, whatever the app answers is dropped
            await self._send(message)

    def stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._expired = True
        if self._reading and self._task is not None:
            self._task.cancel()

    async def _refuse_late(self) -> None:
        payload = {"error": f"request body not received within {self.timeout:g} s"}
        await self._refuse(HTTPStatus.REQUEST_TIMEOUT, payload, close=True)

    async def _refuse(
        self, status: HTTPStatus, payload: dict[str, str], close: bool = False
    ) -> None:
        if not self.refused:
            self.refused = True
            await _send_json(self._send, status, payload, close)
        raise BodyRefusedError


# zlib's window bits per Content-Encoding: gzip framing, or zlib framing for "deflate" (RFC 9110)
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class DecompressMiddleware:
    """Inflates a gzip or deflate request body before the app sees it, up to `max_bytes`."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        encoding = _header(scope, b"content-encoding") if scope["type"] == "http" else None
        if encoding is None or encoding.strip().lower() in ("", "identity"):
            await self.app(scope, receive, send)
            return
        wbits = _WBITS.get(encoding.strip().lower())
        if wbits is None:
            message = f"Content-Encoding {encoding[:40]!r} is not supported (gzip, deflate)"
            await _send_json(send, HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": message})
            return
        try:
            body = await self._inflate(receive, zlib.decompressobj(wbits))
        except ClientGoneError:  # left while its compressed body was being read: nobody to answer
            return
        except zlib.error as exc:
            message = f"the body is not valid {encoding.strip().lower()} data: {exc}"
            await _send_json(send, HTTPStatus.BAD_REQUEST, {"error": message})
            return
        if body is None:
            message = f"decompressed body larger than the limit of {self.max_bytes} bytes"
            await _send_json(send, HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": message})
            return
        headers = [
            (k, v) for k, v in scope["headers"] if k not in (b"content-encoding", b"content-length")
        ]
        headers.append((b"content-length", str(len(body)).encode()))
        delivered = False

        async def inflated_receive() -> Message:
            nonlocal delivered
            if delivered:
                return await receive()  # after the body: only a disconnect comes
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app({**scope, "headers": headers}, inflated_receive, send)

    async def _inflate(self, receive: Receive, inflater: zlib._Decompress) -> bytes | None:
        """The whole inflated body, or None once it passes the limit (inflating no further)."""
        out = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGoneError("the client disconnected while sending the body")
            more = message.get("more_body", False)
            pending = message.get("body", b"")
            while pending:
                out += inflater.decompress(pending, self.max_bytes + 1 - len(out))
                if len(out) > self.max_bytes:
                    return None
                pending = inflater.unconsumed_tail
        out += inflater.flush()
        if not inflater.eof:
            raise zlib.error("the compressed stream is truncated")
        return bytes(out) if len(out) <= self.max_bytes else None


class AccessLogMiddleware:
    def __init__(
        self, app: ASGIApp, metrics: Metrics, request_id_header: str, enabled: bool = True
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.header = request_id_header.lower().encode("latin-1")
        self.enabled = enabled
        # Generated ids: a random per-process prefix and a counter, unique across processes
        # and restarts without uuid4's os.urandom call per request (6 % of a refusal's time).
        self._prefix = uuid.uuid4().hex[:12]
        self._count = itertools.count()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, self.header)
        if given and _SAFE_ID.fullmatch(given):
            request_id = given
        else:
            request_id = f"{self._prefix}{next(self._count):020x}"
        start = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", []), (self.header, request_id.encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("unexpected error, request %s", request_id)
            if status == 0:
                await _send_json(send_with_id, 500, {"error": "internal server error"})
            status = status or 500
        finally:
            self._record(scope, request_id, status, time.perf_counter() - start)

    def _record(self, scope: Scope, request_id: str, status: int, seconds: float) -> None:
        route = getattr(scope.get("route"), "path", "(unmatched)")
        self.metrics.observe_http(scope["method"], route, status, seconds)
        if not self.enabled:
            return
        client = scope.get("client")
        line = {
            "request_id": request_id,
            "client": f"{client[0]}:{client[1]}" if client else None,
            "method": scope["method"],
            "path": scope["path"],
            "route": route,
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
        }
        access_logger.info(json.dumps(line))


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None
