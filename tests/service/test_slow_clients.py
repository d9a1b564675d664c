"""Clients that never finish their bodies: a trickled body gets 408 once `body_timeout_s` has
passed and its connection is closed, while every other client is served; and a request stalled
that way cannot hold a shutdown past `shutdown_timeout_s` (uvicorn alone waits for it forever)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import httpx

from tests.service import onnx_models as om
from tests.service.live import LiveServer, start_server

BODY = json.dumps(
    {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
).encode()


def head(port: int) -> bytes:
    return (
        f"POST /v2/models/m/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
    ).encode()


def repository(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    om.publish(root, "m", 1, om.affine_model())
    return root


def pending(live: LiveServer) -> float:
    text = httpx.get(live.url + "/metrics", timeout=10).text
    prefix = 'nv_inference_pending_request_count{model="m",version="1"} '
    return next(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


def test_a_trickled_body_gets_408_and_its_connection_closed(tmp_path: Path) -> None:
    async def scenario(live: LiveServer) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
        writer.write(head(live.port) + BODY[:10])
        started = time.monotonic()
        # Meanwhile, another client is served as usual.
        async with httpx.AsyncClient(base_url=live.url, timeout=10) as http:
            answer = await http.post("/v2/models/m/infer", content=BODY)
            assert answer.status_code == 200
        response = await asyncio.wait_for(reader.read(), 10)  # until the server closes
        assert time.monotonic() - started >= 0.5
        status_line, _, rest = response.partition(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 408"), response
        assert b"connection: close" in rest.lower()
        assert "not received within 0.5 s" in json.loads(rest.split(b"\r\n\r\n", 1)[1])["error"]
        writer.close()

    with start_server(repository(tmp_path), body_timeout_s="0.5", access_log="false") as live:
        asyncio.run(scenario(live))
        assert httpx.post(f"{live.url}/v2/models/m/infer", content=BODY).status_code == 200
        assert pending(live) == 0


def test_a_body_sent_slowly_but_within_the_limit_is_served(tmp_path: Path) -> None:
    """The deadline covers the whole body, not each read: many slow pieces arriving inside it
    make a normal request, and the connection stays usable for the next."""

    async def scenario(live: LiveServer) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
        for _ in range(2):
            writer.write(head(live.port))
            for start in range(0, len(BODY), 8):
                writer.write(BODY[start : start + 8])
                await writer.drain()
                await asyncio.sleep(0.01)
            status_line = await asyncio.wait_for(reader.readline(), 10)
            assert status_line.startswith(b"HTTP/1.1 200"), status_line
            headers = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = int(headers.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            answer = json.loads(await reader.readexactly(length))
            assert answer["outputs"][0]["data"] == [3.0, 5.0, 7.0, 9.0]
        writer.close()

    with start_server(repository(tmp_path), body_timeout_s="5", access_log="false") as live:
        asyncio.run(scenario(live))


def test_a_stalled_request_cannot_hold_the_shutdown(tmp_path: Path) -> None:
    with start_server(
        repository(tmp_path), body_timeout_s="600", shutdown_timeout_s="1", access_log="false"
    ) as live:

        async def stall_then_stop() -> int:
            _, writer = await asyncio.open_connection("127.0.0.1", live.port)
            writer.write(head(live.port) + BODY[:10])
            await writer.drain()
            for _ in range(200):
                if await asyncio.to_thread(pending, live) == 1:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the stalled request was never admitted")
            live.process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(live.process.wait, 20)
            writer.close()
            return code

        assert asyncio.run(stall_then_stop()) == 0
        assert "timeout graceful shutdown exceeded" in live.logs()
