"""Admission under overload: when a version has `max_queue_size` requests waiting, the next one is
refused with 503 and Retry-After at once, before its body is read, and the connection stays
usable; the waiting requests are answered correctly, and the version takes new work as soon as
there is room. Requests are held "waiting" deterministically by sending their headers and only
part of their bodies, so no timing decides the outcome."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.deploy.slow_model import iterations_for, slow_model
from tests.deploy.slow_model import request as slow_request
from tests.service import onnx_models as om
from tests.service.live import LiveServer, start_server

QUEUE = 2
BODY = json.dumps(
    {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
).encode()
ANSWER = [3.0, 5.0, 7.0, 9.0]  # the affine model: y = 2x + 1


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("admission") / "repo"
    om.publish(root, "batched", 1, om.affine_model())
    om.publish(root, "unbatched", 1, om.affine_model())
    (root / "unbatched" / "config.json").write_text('{"dynamic_batching": false}')
    with start_server(root, max_queue_size=str(QUEUE), access_log="false") as server:
        yield server


def head(port: int, model: str, length: int = len(BODY)) -> bytes:
    return (
        f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


async def response(reader: asyncio.StreamReader) -> tuple[int, bytes, bytes]:
    """(status, head, body) of the next response on the connection."""
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = int(re.search(rb"\r\ncontent-length: (\d+)", raw.lower()).group(1))
    return int(raw[9:12]), raw.lower(), await asyncio.wait_for(reader.readexactly(length), 10)


async def hold(port: int, model: str) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """QUEUE admitted requests for `model`, each stuck half-way through its body; returns once
    the server counts them pending."""
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(QUEUE)]
    for _, writer in held:
        writer.write(head(port, model) + BODY[:10])
        await writer.drain()
    line = re.compile(
        rf'^nv_inference_pending_request_count{{model="{model}",version="1"}} (\S+)$', re.M
    )
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        for _ in range(200):
            found = line.search((await http.get("/metrics")).text)
            if found and float(found.group(1)) == QUEUE:
                return held
            await asyncio.sleep(0.05)
    raise AssertionError(f"the server never counted {QUEUE} pending requests for {model}")


async def release(held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
    """Send the rest of each held body: every one is answered correctly."""
    for reader, writer in held:
        writer.write(BODY[10:])
        status, _, answer = await response(reader)
        assert status == 200, answer
        assert json.loads(answer)["outputs"][0]["data"] == ANSWER
        writer.close()


def stats(live: LiveServer, model: str) -> dict:
    body = httpx.get(f"{live.url}/v2/models/{model}/stats", timeout=10).json()
    return body["model_stats"][0]


async def overload(port: int, model: str) -> None:
    held = await hold(port, model)
    # The next request sends its head only: were its body needed, no answer could come.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head(port, model))
    status, refused_head, refused = await response(reader)
    assert status == 503, refused
    assert b"\r\nretry-after: " in refused_head
    assert "queue" in json.loads(refused)["error"]

    # The connection survives the refusal: the unread body is skipped, the next request served.
    writer.write(BODY)
    await release(held)
    writer.write(head(port, model) + BODY)
    status, _, answer = await response(reader)
    assert status == 200, answer
    assert json.loads(answer)["outputs"][0]["data"] == ANSWER
    writer.close()


@pytest.mark.parametrize("model", ["batched", "unbatched"])
def test_a_full_version_refuses_before_reading_the_body(live: LiveServer, model: str) -> None:
    before = stats(live, model)
    asyncio.run(overload(live.port, model))
    after = stats(live, model)
    assert (
        after["inference_stats"]["fail"]["count"] == before["inference_stats"]["fail"]["count"] + 1
    )
    assert after["inference_stats"]["success"]["count"] == (
        before["inference_stats"]["success"]["count"] + QUEUE + 1
    )
    # A refusal is a state, not a fault: no error line per 503 to flood the log under overload.
    assert "QueueFullError" not in live.logs()


def test_other_models_are_not_refused_while_one_is_full(live: LiveServer) -> None:
    async def scenario() -> None:
        held = await hold(live.port, "batched")
        reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
        writer.write(head(live.port, "unbatched") + BODY)
        status, _, answer = await response(reader)
        assert status == 200, answer
        writer.close()
        await release(held)

    asyncio.run(scenario())


def test_classify_is_admitted_through_the_same_door(live: LiveServer) -> None:
    async def scenario() -> None:
        held = await hold(live.port, "batched")
        reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
        array = b"[[0.1, 0.2, 0.3, 0.4]]"
        writer.write(
            f"POST /v2/models/batched/classify HTTP/1.1\r\nHost: 127.0.0.1:{live.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(array)}\r\n\r\n".encode()
        )  # the head only, again
        status, refused_head, refused = await response(reader)
        assert status == 503, refused
        assert b"\r\nretry-after: " in refused_head
        writer.close()
        await release(held)
        async with httpx.AsyncClient(base_url=live.url, timeout=10) as http:
            answer = await http.post(
                "/v2/models/batched/classify",
                content=array,
                headers={"Content-Type": "application/json"},
            )
            assert answer.status_code == 200, answer.text

    asyncio.run(scenario())


def test_requests_too_large_to_batch_cannot_pile_up_beside_the_queue(tmp_path: Path) -> None:
    """Requests larger than the largest batch run on their own, outside the batcher's queue;
    a version still holds no more than a queue and a batch in flight in all."""
    root = tmp_path / "repo"
    om.publish(root, "slow", 1, slow_model())
    settings = {"max_queue_size": "1", "max_batch_size": "2", "inline_max_us": "0"}
    with start_server(root, access_log="false", **settings) as live:
        n = iterations_for(live.url, 2.0)
        large = {"inputs": [{"name": "n", "datatype": "INT64", "shape": [3, 1], "data": [n] * 3}]}

        async def scenario() -> None:
            async with httpx.AsyncClient(base_url=live.url, timeout=120) as http:
                running = [
                    asyncio.create_task(http.post("/v2/models/slow/infer", json=large))
                    for _ in range(3)  # 1 queue place + a batch of 2: the version is full
                ]
                line = re.compile(
                    r'^nv_inference_pending_request_count\{model="slow".*\} (\S+)$', re.M
                )
                for _ in range(200):
                    found = line.search((await http.get("/metrics")).text)
                    if found and float(found.group(1)) == 3:
                        break
                    await asyncio.sleep(0.02)
                else:
                    raise AssertionError("the large requests were never all in flight")
                refused = await http.post("/v2/models/slow/infer", json=slow_request(1))
                assert refused.status_code == 503, refused.text
                assert "retry-after" in refused.headers
                for task in running:
                    answer = await task
                    assert answer.status_code == 200, answer.text
                    assert answer.json()["outputs"][0]["data"] == [float(n)] * 3

        asyncio.run(scenario())
