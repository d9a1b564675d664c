"""The batcher end to end: concurrent batch-1 requests to a real server share model executions,
and each response holds its own request's rows (MLServer#1306 handed rows to the wrong
requests); a malformed request among them fails alone."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from tests.service import onnx_models as om
from tests.service.live import LiveServer, start_server

CLIENTS = 48
ROUNDS = 10  # at most; stops once batching is shown


@pytest.fixture(scope="module")
def batching_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("batching") / "repo"
    om.publish(root, "digits", 1, om.DIGITS)
    om.publish(root, "unbatched", 1, om.DIGITS)
    (root / "unbatched" / "config.json").write_text('{"dynamic_batching": false}')
    with start_server(
        root,
        models="digits,unbatched",
        max_batch_size="16",
        max_queue_delay_us="2000",
        access_log="false",
    ) as live:
        yield live


def request_bytes(port: int, body: bytes, model: str) -> bytes:
    head = (
        f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def exchange(
    port: int, bodies: list[bytes], model: str = "digits"
) -> list[tuple[int, bytes]]:
    """Open one connection per body, then write every request at once, so that they reach the
    server together; returns (status, body) per request."""
    streams = [await asyncio.open_connection("127.0.0.1", port) for _ in bodies]
    for (_, writer), body in zip(streams, bodies, strict=True):
        writer.write(request_bytes(port, body, model))
    results = []
    for reader, writer in streams:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"\r\ncontent-length: (\d+)", head.lower()).group(1))
        results.append((int(head[9:12]), await reader.readexactly(length)))
        writer.close()
        await writer.wait_closed()
    return results


def digits_body(x: np.ndarray, request_id: str) -> bytes:
    tensor = {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": x.tolist()}
    return json.dumps({"id": request_id, "inputs": [tensor]}).encode()


def counters(live: LiveServer, model: str = "digits") -> dict[str, float]:
    text = httpx.get(live.url + "/metrics", timeout=10).text
    found = {}
    for name in ("nv_inference_exec_count", "nv_inference_request_success"):
        line = rf'^{name}{{model="{model}",version="1"}} (\S+)$'
        match = re.search(line, text, re.MULTILINE)
        assert match, name
        found[name] = float(match.group(1))
    return found


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(
    batching_server: LiveServer,
) -> None:
    session = ort.InferenceSession(str(om.DIGITS), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    for round_ in range(ROUNDS):
        xs = rng.normal(size=(CLIENTS, 1, 1, 8, 8)).astype(np.float32)
        bodies = [digits_body(x, f"r{round_}-{i}") for i, x in enumerate(xs)]
        bodies[5] = b'{"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32"}]}'
        replies = asyncio.run(exchange(batching_server.port, bodies))
        for i, (status, body) in enumerate(replies):
            if i == 5:
                assert status == 400 and b"give 'data'" in body  # fails alone
                continue
            assert status == 200, body
            reply = json.loads(body)
            assert reply["id"] == f"r{round_}-{i}"
            got = np.asarray(reply["outputs"][0]["data"], dtype=np.float32).reshape(1, 10)
            want = session.run(["logits"], {"input": xs[i]})[0]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        seen = counters(batching_server)
        if seen["nv_inference_exec_count"] < seen["nv_inference_request_success"]:
            break
    assert seen["nv_inference_exec_count"] < seen["nv_inference_request_success"], seen


def test_config_reports_the_policy_in_force(batching_server: LiveServer) -> None:
    config = httpx.get(batching_server.url + "/v2/models/digits/config", timeout=10).json()
    assert config["max_batch_size"] == 16
    assert config["dynamic_batching"] == {
        "max_queue_delay_microseconds": 2000,
        "default_queue_policy": {"max_queue_size": 1024},
    }


def test_batching_can_be_turned_off_per_model(batching_server: LiveServer) -> None:
    url = batching_server.url + "/v2/models/unbatched/config"
    assert "dynamic_batching" not in httpx.get(url, timeout=10).json()
    xs = np.zeros((CLIENTS, 1, 1, 8, 8), dtype=np.float32)
    bodies = [digits_body(x, "off") for x in xs]
    replies = asyncio.run(exchange(batching_server.port, bodies, "unbatched"))
    assert all(status == 200 for status, _ in replies)
    seen = counters(batching_server, "unbatched")
    assert seen["nv_inference_exec_count"] == seen["nv_inference_request_success"] == CLIENTS
