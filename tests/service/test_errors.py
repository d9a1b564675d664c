"""Each error of the issue's section 5, by status and message, against a live server, and the
table that maps the service's errors to statuses.

After every case the server must still be live and ready, and no body may carry a traceback.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.errors import (
    STATUS,
    NotFoundError,
    QueueFullError,
    ServiceError,
    error_response_for,
    status_of,
)
from tests.service.live import LiveServer, start_server

DIGITS_INPUT = {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}
TOKEN = "s3cret-token"


@pytest.fixture
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client
        assert client.get("/v2/health/live").status_code == 200
        assert client.get("/v2/health/ready").status_code == 200


def infer(http: httpx.Client, body: object, model: str = "digits", **kw: object) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(f"/v2/models/{model}/infer", content=content, **kw)


def expect(response: httpx.Response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"error"}, body
    assert fragment in body["error"], body["error"]
    assert "Traceback" not in response.text


class UnknownLabelError(NotFoundError):
    """A subclass the table does not list: it answers as its parent does."""


class NoSuchLabelSetError(UnknownLabelError):
    """Two levels down."""


class QueueTooLongError(QueueFullError):
    pass


class UnmappedError(ServiceError):
    pass


def test_a_subclass_of_a_mapped_error_gets_its_parents_status() -> None:
    assert UnknownLabelError not in STATUS and NoSuchLabelSetError not in STATUS
    assert status_of(UnknownLabelError("no label 7")) == 404
    assert status_of(NoSuchLabelSetError("no labels")) == 404
    response = error_response_for(UnknownLabelError("no label 7"))
    assert response.status_code == 404
    assert json.loads(response.body) == {"error": "no label 7"}
    queued = error_response_for(QueueTooLongError("full", retry_after_s=3))
    assert queued.status_code == 503 and queued.headers["retry-after"] == "3"


def test_an_error_nobody_mapped_is_a_500() -> None:
    assert status_of(UnmappedError("surprise")) == 500


CASES = [
    ("malformed JSON", b'{"inputs": [', 400, "malformed JSON"),
    ("empty body", b"", 400, "empty request body"),
    ("not an object", [1, 2], 400, "must be a JSON object"),
    ("no inputs", {"inputs": []}, 400, "'inputs' must be a non-empty list"),
    ("unknown input", {"inputs": [{**DIGITS_INPUT, "name": "x"}]}, 400, "unknown input 'x'"),
    (
        "wrong shape",
        {"inputs": [{**DIGITS_INPUT, "shape": [1, 64]}]},
        400,
        "does not match the model's [-1, 1, 8, 8]",
    ),
    (
        "wrong datatype",
        {"inputs": [{**DIGITS_INPUT, "datatype": "FP64"}]},
        400,
        "model expects FP32",
    ),
    (
        "unknown datatype",
        {"inputs": [{**DIGITS_INPUT, "datatype": "FLOAT"}]},
        400,
        "unknown datatype",
    ),
    (
        "short data",
        {"inputs": [{**DIGITS_INPUT, "data": [0.0] * 63}]},
        400,
        "holds 64 elements but 'data' has 63",
    ),
    ("ragged data", {"inputs": [{**DIGITS_INPUT, "data": [[0.0], [0.0, 1.0]]}]}, 400, "ragged"),
    (
        "strings for FP32",
        {"inputs": [{**DIGITS_INPUT, "data": ["a"] * 64}]},
        400,
        "must be numbers",
    ),
    (
        "negative dim",
        {"inputs": [{**DIGITS_INPUT, "shape": [-1, 1, 8, 8]}]},
        400,
        "non-negative integers",
    ),
    (
        "unknown output",
        {"inputs": [DIGITS_INPUT], "outputs": [{"name": "probs"}]},
        400,
        "unknown output 'probs'",
    ),
    (
        "bad classification",
        {
            "inputs": [DIGITS_INPUT],
            "outputs": [{"name": "logits", "parameters": {"classification": "3"}}],
        },
        400,
        "'classification' must be",
    ),
    ("id not a string", {"id": 5, "inputs": [DIGITS_INPUT]}, 400, "'id' must be a string"),
]


@pytest.mark.parametrize(
    ("body", "status", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_client_mistakes_are_4xx_with_a_message(http: httpx.Client, body, status, fragment) -> None:
    expect(infer(http, body), status, fragment)


def test_unknown_model_and_version_are_404(http: httpx.Client) -> None:
    expect(infer(http, {"inputs": [DIGITS_INPUT]}, model="nope"), 404, "unknown model 'nope'")
    expect(http.post("/v2/models/digits/versions/9/infer", content=b"{}"), 404, "unknown version 9")
    expect(http.get("/v2/models/nope"), 404, "unknown model")
    expect(http.get("/v2/models/digits/versions/0"), 400, "versions are positive integers")
    expect(http.get("/v2/models/..%2F..%2Fetc"), 404, "")


@pytest.mark.parametrize("name", ["..", ".hidden", "a" * 200, "a%00b"])
def test_names_cannot_leave_the_repository(http: httpx.Client, name: str) -> None:
    response = http.post(f"/v2/repository/models/{name}/load")
    assert response.status_code in (400, 404), response.text
    assert "error" in response.json()


def test_binary_size_checked_before_allocation(http: httpx.Client) -> None:
    """A shape of 10^12 elements with 8 bytes of data is refused, not allocated."""
    header = {
        "inputs": [
            {
                "name": "input",
                "shape": [10**9, 1, 8, 8],
                "datatype": "FP32",
                "parameters": {"binary_data_size": 8},
            }
        ]
    }
    head = json.dumps(header).encode()
    response = infer(
        http, head + b"\0" * 8, headers={"Inference-Header-Content-Length": str(len(head))}
    )
    expect(response, 400, "of FP32 needs 256000000000")


def test_binary_length_mismatches(http: httpx.Client) -> None:
    header = {
        "inputs": [
            {
                "name": "input",
                "shape": [1, 1, 8, 8],
                "datatype": "FP32",
                "parameters": {"binary_data_size": 256},
            }
        ]
    }
    head = json.dumps(header).encode()
    short = infer(
        http, head + b"\0" * 100, headers={"Inference-Header-Content-Length": str(len(head))}
    )
    expect(short, 400, "runs past the end of the body")
    extra = infer(
        http, head + b"\0" * 300, headers={"Inference-Header-Content-Length": str(len(head))}
    )
    expect(extra, 400, "add up to 256")
    wrong = infer(http, head, headers={"Inference-Header-Content-Length": "99999"})
    expect(wrong, 400, "Inference-Header-Content-Length is 99999")


def test_model_not_ready_is_503(http: httpx.Client) -> None:
    # bn_train is on disk but refused at load: 503 with the reason, not 404
    http.post("/v2/repository/models/bn_train/load")
    response = infer(
        http,
        {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]},
        model="bn_train",
    )
    expect(response, 503, "training mode")
    expect(http.get("/v2/models/bn_train"), 503, "training mode")
    ready = http.get("/v2/models/bn_train/ready")
    assert ready.status_code == 400 and ready.json()["ready"] is False


def test_unknown_route_and_method(http: httpx.Client) -> None:
    expect(http.get("/v2/nothing/here"), 404, "Not Found")
    expect(http.delete("/v2/health/live"), 405, "Method Not Allowed")


@pytest.fixture(scope="module")
def guarded(repo: Path) -> Iterator[LiveServer]:
    """A server with a token and a 4 KiB body limit."""
    with start_server(repo, models="digits", api_token=TOKEN, max_body_bytes="4096") as live:
        yield live


def test_token_guards_infer_classify_repository_and_stats(guarded: LiveServer) -> None:
    with httpx.Client(base_url=guarded.url) as http:
        body = json.dumps({"inputs": [DIGITS_INPUT]})
        for method, path in [
            ("POST", "/v2/models/digits/infer"),
            ("POST", "/v2/models/digits/classify"),
            ("POST", "/v2/repository/index"),
            ("POST", "/v2/repository/models/digits/load"),
            ("POST", "/v2/repository/models/digits/unload"),
            ("GET", "/v2/models/stats"),
            ("GET", "/v2/models/digits/stats"),
        ]:
            missing = http.request(method, path, content=body)
            expect(missing, 401, "missing 'Authorization: Bearer <token>'")
            assert missing.headers["www-authenticate"] == "Bearer"
            wrong = http.request(
                method, path, content=body, headers={"Authorization": "Bearer nope"}
            )
            expect(wrong, 401, "wrong token")
        ok = http.post(
            "/v2/models/digits/infer", content=body, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert ok.status_code == 200
        for path in [
            "/v2",
            "/v2/health/live",
            "/v2/health/ready",
            "/v2/models/digits",
            "/v2/models/digits/ready",
            "/metrics",
            "/docs",
            "/openapi.json",
        ]:
            assert http.get(path).status_code == 200, path


def test_body_over_the_limit_is_413(guarded: LiveServer) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=guarded.url, headers=headers) as http:
        expect(
            http.post("/v2/models/digits/infer", content=b"x" * 5000),
            413,
            "larger than the limit of 4096",
        )

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
            for _ in range(10):
                yield b"x" * 1000

        expect(http.post("/v2/models/digits/infer", content=chunks()), 413, "limit")
        assert http.get("/v2/health/ready").status_code == 200


def test_413_comes_before_the_body_is_sent(guarded: LiveServer) -> None:
    """Declare a gigabyte and send nothing: the answer must come at once."""
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 1000000000\r\n\r\n"
        )
        reply = sock.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 413"), reply
