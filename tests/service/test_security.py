"""Security: the token (constant time, every guarded endpoint, never logged), model names and
versions that cannot leave the repository, and the limits that bound what a request may cost.
"""

from __future__ import annotations

import gzip
import io
import json
import socket
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from service import deps
from service.errors import UnauthorizedError
from service.settings import Settings
from tests.service import onnx_models as om
from tests.service.live import LiveServer, start_server

TOKEN = "tok-9f8e7d6c5b4a-secret"
AFFINE = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
OPEN = ("/v2", "/v2/health/live", "/v2/health/ready", "/metrics")


# ---------------------------------------------------------------- the token


def test_token_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways in (FastAPI's dependency and the infer hot path) go through compare_digest."""
    calls: list[tuple[bytes, bytes]] = []

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return a == b

    monkeypatch.setattr(deps.hmac, "compare_digest", spy)
    deps.check_bearer(TOKEN, TOKEN)
    deps.check_authorization(TOKEN, f"Bearer {TOKEN}")
    with pytest.raises(UnauthorizedError):
        deps.check_authorization(TOKEN, "Bearer wrong")
    assert calls == [(TOKEN.encode(),) * 2] * 2 + [(b"wrong", TOKEN.encode())]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("guarded") / "repo"
    om.publish(root, "affine", 1, om.affine_model())
    with start_server(root, api_token=TOKEN, log_level="debug") as live:
        yield live


def _concrete(path: str) -> str:
    return path.replace("{name}", "affine").replace("{version}", "1")


def test_every_infer_and_repository_endpoint_requires_the_token(guarded: LiveServer) -> None:
    """Every operation the OpenAPI schema marks as secured answers 401 without the right
    token; infer, classify and the repository are among them; probes and metrics stay open."""
    schema = httpx.get(guarded.url + "/openapi.json").json()
    secured = [
        (method.upper(), path)
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
        if operation.get("security")
    ]
    paths = {p for _, p in secured}
    assert {
        "/v2/models/{name}/infer",
        "/v2/models/{name}/versions/{version}/infer",
        "/v2/models/{name}/classify",
        "/v2/models/{name}/versions/{version}/classify",
        "/v2/repository/index",
        "/v2/repository/models/{name}/load",
        "/v2/repository/models/{name}/unload",
    } <= paths
    with httpx.Client(base_url=guarded.url, timeout=30) as http:
        for method, path in secured:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                response = http.request(method, _concrete(path), headers=headers, json=AFFINE)
                assert response.status_code == 401, (method, path, headers, response.text)
                assert response.json()["error"]
        for path in OPEN:
            assert http.get(path).status_code == 200, path
        authorized = {"Authorization": f"Bearer {TOKEN}"}
        response = http.post("/v2/models/affine/versions/1/infer", json=AFFINE, headers=authorized)
        assert response.status_code == 200
        assert response.json()["outputs"][0]["data"] == [3.0, 5.0, 7.0, 9.0]


def test_the_token_never_appears_in_the_log(guarded: LiveServer) -> None:
    """Right, wrong, near-miss and malformed tokens, on every kind of endpoint, at debug level."""
    near = TOKEN[:-1]
    with httpx.Client(base_url=guarded.url, timeout=30) as http:
        for value in (f"Bearer {TOKEN}", f"Bearer {near}", TOKEN, f"Basic {TOKEN}"):
            headers = {"Authorization": value}
            http.post("/v2/models/affine/infer", json=AFFINE, headers=headers)
            http.post("/v2/models/affine/classify", json=[[1, 2, 3, 4]], headers=headers)
            http.post("/v2/repository/index", headers=headers)
            http.get("/v2/models/stats", headers=headers)
            http.get("/metrics", headers=headers)
        assert http.get("/metrics").text.count(TOKEN) == 0
    log = guarded.logs()
    assert "service.access" in log  # the access log was on, so the check means something
    assert TOKEN not in log and near not in log


# ---------------------------------------------------------------- the repository's bounds


@pytest.fixture(scope="module")
def escapes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A repository whose symlinks lead out of it, to models that answer differently (scale 5):
    a whole model, a version folder, and a model file."""
    base = tmp_path_factory.mktemp("escapes")
    outside = base / "outside"
    om.publish(outside, "evil", 1, om.affine_model(scale=5.0))
    root = base / "repo"
    om.publish(root, "affine", 1, om.affine_model())
    (root / "escape").symlink_to(outside / "evil", target_is_directory=True)
    (root / "affine" / "2").symlink_to(outside / "evil" / "1", target_is_directory=True)
    (root / "affine" / "3").mkdir()
    (root / "affine" / "3" / "model.onnx").symlink_to(outside / "evil" / "1" / "model.onnx")
    # A symlink that stays inside is fine: version 4 is version 1 under another number.
    (root / "inside").symlink_to(root / "affine", target_is_directory=True)
    with start_server(root) as live:  # every model on disk is loaded and required
        yield live


def test_symlinks_out_of_the_repository_are_never_served(escapes: LiveServer) -> None:
    with httpx.Client(base_url=escapes.url, timeout=30) as http:
        # The latest version the policy sees is 1: versions 2 and 3 lead outside.
        answer = http.post("/v2/models/affine/infer", json=AFFINE)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_version"] == "1"
        assert answer.json()["outputs"][0]["data"] == [3.0, 5.0, 7.0, 9.0]
        for version in ("2", "3"):
            response = http.post(f"/v2/models/affine/versions/{version}/infer", json=AFFINE)
            assert response.status_code == 404, response.text
        response = http.post("/v2/models/escape/infer", json=AFFINE)
        assert response.status_code == 400 and "outside the repository" in response.text
        load = http.post("/v2/repository/models/escape/load")
        assert load.status_code == 400 and "outside the repository" in load.text
        index = http.post("/v2/repository/index").json()
        assert {(row["name"], row.get("version")) for row in index} == {
            ("affine", "1"),
            ("inside", "1"),
        }
        assert http.post("/v2/models/inside/infer", json=AFFINE).status_code == 200
    assert "resolves outside the repository" in escapes.logs()


def test_a_required_model_leading_out_does_not_stop_the_others_loading(
    escapes: LiveServer,
) -> None:
    """Regression: naming such a model in `models` killed the start-up task, so the models
    after it never loaded."""
    root = Path(escapes.log).parent / "repo"
    with start_server(root, wait_ready=False, models="escape,affine") as live:
        deadline = time.monotonic() + 30
        while httpx.get(live.url + "/v2/models/affine/ready").status_code != 200:
            assert time.monotonic() < deadline, live.logs()
            time.sleep(0.1)
        ready = httpx.get(live.url + "/v2/health/ready")
        assert ready.status_code != 200  # 'escape' is required and can never serve
        assert "outside the repository" in live.logs()


def _external_model(location: str) -> bytes:
    """y = x * w, w [4] stored as external data at `location` (relative to the model's folder)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    w = numpy_helper.from_array(np.full(4, 5.0, np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, "offset": "0", "length": "16"}.items():
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["y"])], "ext", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", om.OPSET)])
    model.ir_version = om.IR_VERSION
    return model.SerializeToString()


def _unknown_op_model() -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"])], "bad", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", om.OPSET)])
    model.ir_version = om.IR_VERSION
    return model.SerializeToString()


def test_model_files_that_reach_outside_or_cannot_run_are_refused_at_load(
    tmp_path: Path,
) -> None:
    """External data outside the version's folder (by '..', absolute, or a symlink), an
    unknown operator, a truncated file: each version is refused with its reason, and the
    model beside them serves."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.full(4, 5.0, np.float32).tobytes())
    root = tmp_path / "repo"
    om.publish(root, "affine", 1, om.affine_model())
    om.publish(root, "dotdot", 1, _external_model("../../../secret.bin"))
    om.publish(root, "absolute", 1, _external_model(str(secret)))
    om.publish(root, "linked", 1, _external_model("w.bin"))
    (root / "linked" / "1" / "w.bin").symlink_to(secret)
    om.publish(root, "unknown_op", 1, _unknown_op_model())
    om.publish(root, "truncated", 1, om.affine_model()[:-60])
    refused = {"dotdot", "absolute", "linked", "unknown_op", "truncated"}
    with start_server(root, wait_ready=False) as live, httpx.Client(base_url=live.url) as http:
        deadline = time.monotonic() + 30
        while http.get("/v2/models/affine/ready").status_code != 200:
            assert time.monotonic() < deadline, live.logs()
            time.sleep(0.1)
        rows = {r["name"]: r for r in http.post("/v2/repository/index").json()}
        while any(rows[n]["state"] == "LOADING" for n in refused):
            time.sleep(0.1)
            rows = {r["name"]: r for r in http.post("/v2/repository/index").json()}
        for name in refused:
            assert rows[name]["state"] == "UNAVAILABLE" and rows[name]["reason"], rows[name]
            assert str(root.resolve()) not in rows[name]["reason"]  # the server's layout stays
            assert str(root) not in rows[name]["reason"]
            response = http.post(f"/v2/models/{name}/infer", json=AFFINE)
            assert response.status_code == 503, response.text
        for name in ("dotdot", "absolute", "linked"):
            assert "External data path validation failed" in rows[name]["reason"], rows[name]
        assert "NoSuchOp" in rows["unknown_op"]["reason"]
        answer = http.post("/v2/models/affine/infer", json=AFFINE)
        assert answer.json()["outputs"][0]["data"] == [3.0, 5.0, 7.0, 9.0]


@pytest.mark.parametrize(
    "name",
    [
        "...",  # ".." alone the client resolves away: sent raw in the next test
        "..%2F..%2Fetc",
        "%2E%2E",
        "%2e%2e%2fpasswd",
        "%2Fetc%2Fpasswd",
        "a%2F..%2F..",
        "affine%2F1",
        "affine%00",
        "affine%5C..",
        "~root",
        " affine",
    ],
)
def test_names_cannot_escape_through_the_url(escapes: LiveServer, name: str) -> None:
    """Dot-dot, absolute paths and percent-encoded separators: refused or unknown, never served."""
    with httpx.Client(base_url=escapes.url, timeout=30) as http:
        for method, path in (
            ("POST", f"/v2/models/{name}/infer"),
            ("POST", f"/v2/models/{name}/versions/1/infer"),
            ("POST", f"/v2/models/affine/versions/{name}/infer"),
            ("POST", f"/v2/repository/models/{name}/load"),
            ("POST", f"/v2/repository/models/{name}/unload"),
            ("GET", f"/v2/models/{name}"),
            ("GET", f"/v2/models/{name}/config"),
        ):
            response = http.request(method, path, json=AFFINE)
            assert response.status_code in (400, 404, 405), (path, response.text)
            assert "error" in response.json() or "detail" in response.json()
        assert http.post("/v2/models/affine/infer", json=AFFINE).status_code == 200


def test_absolute_paths_outside_the_url_space(escapes: LiveServer) -> None:
    """A raw request target with /../ is normalised or refused by the server, never served."""
    body = json.dumps(AFFINE).encode()
    for target in (
        b"/v2/models/../../etc/passwd",
        b"/v2/models//etc/passwd/infer",
        b"/v2/models/../infer",
        b"/v2/models/affine/versions/../infer",
        b"/v2/models/affine/versions/1/../../../escape/infer",
        b"/v2/repository/models/../load",
    ):
        with socket.create_connection(("127.0.0.1", escapes.port), timeout=10) as sock:
            sock.sendall(
                b"POST " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            reply = sock.recv(4096)
        assert reply.split(b" ", 2)[1] in (b"400", b"404", b"405"), reply


# ---------------------------------------------------------------- limits

LIMITS = {
    "max_body_bytes": "65536",
    "max_tensor_elements": "100",
    "max_request_batch_size": "4",
    "max_image_pixels": "10000",
    "max_decompressed_bytes": "4096",
}


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_limits_are_settings(name: str) -> None:
    field = Settings.model_fields[name]
    assert field.description and isinstance(field.default, int) and field.default > 0


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("limited") / "repo"
    om.publish(root, "affine", 1, om.affine_model())
    om.publish(root, "digits", 1, om.DIGITS)
    with start_server(root, **LIMITS) as live:
        yield live


def _rows(n: int, shape: list[int] | None = None, data: list[float] | None = None) -> bytes:
    item = {"name": "x", "shape": shape or [n, 4], "datatype": "FP32"}
    item["data"] = [0.5] * (4 * n) if data is None else data
    return json.dumps({"inputs": [item]}).encode()


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("L", (width, height), 200).save(out, format="PNG")
    return out.getvalue()


def test_limits_are_enforced_on_what_a_request_declares(limited: LiveServer) -> None:
    with httpx.Client(base_url=limited.url, timeout=30) as http:
        infer = "/v2/models/affine/infer"
        assert http.post(infer, content=_rows(4)).status_code == 200
        batch = http.post(infer, content=_rows(5))
        assert batch.status_code == 400 and "max_request_batch_size" in batch.json()["error"]
        # 2^40 rows declared with no data: refused on the shape, before any conversion.
        huge = http.post(infer, content=_rows(0, shape=[2**40, 4], data=[]))
        assert huge.status_code == 400 and "max_tensor_elements" in huge.json()["error"]
        many = {"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 128}
        response = http.post("/v2/models/digits/infer", json={"inputs": [many]})
        assert response.status_code == 400 and "max_tensor_elements" in response.json()["error"]
        head = json.dumps({"inputs": [{**many, "data": None}]}).encode()
        head = head.replace(b', "data": null', b', "parameters": {"binary_data_size": 512}')
        binary = http.post(
            "/v2/models/digits/infer",
            content=head + b"\0" * 512,
            headers={"Inference-Header-Content-Length": str(len(head))},
        )
        assert binary.status_code == 400 and "max_tensor_elements" in binary.json()["error"]
        classify = "/v2/models/digits/classify"
        big = http.post(classify, content=_png(200, 200), headers={"Content-Type": "image/png"})
        assert big.status_code == 400 and "max_image_pixels" in big.json()["error"]
        files = {"file": ("x.png", _png(101, 100), "image/png")}
        assert http.post(classify, files=files).status_code == 400
        small = http.post(classify, content=_png(100, 100), headers={"Content-Type": "image/png"})
        assert small.status_code == 200, small.text
        arrays = json.dumps([[[[0.5] * 8] * 8]] * 5).encode()
        rows = http.post(classify, content=arrays, headers={"Content-Type": "application/json"})
        assert rows.status_code == 400 and "max_request_batch_size" in rows.json()["error"]
        body = http.post(infer, content=b"[" * 70_000)
        assert body.status_code == 413
        inflated = http.post(
            infer,
            content=gzip.compress(b" " * 5000 + _rows(1)),
            headers={"Content-Encoding": "gzip"},
        )
        assert inflated.status_code == 413 and "decompressed" in inflated.json()["error"]
        deflated = http.post(
            infer, content=zlib.compress(_rows(1)), headers={"Content-Encoding": "deflate"}
        )
        assert deflated.status_code == 200
        assert http.post(infer, content=_rows(1)).status_code == 200


def test_huge_declared_shapes_are_refused_before_allocation(guarded: LiveServer) -> None:
    """A shape of 2^62 x 4 elements (2^66 bytes) declared in a few bytes: 400 at once."""
    body = {
        "inputs": [
            {
                "name": "x",
                "shape": [2**62, 4],
                "datatype": "FP32",
                "parameters": {"binary_data_size": 16},
            }
        ]
    }
    head = json.dumps(body).encode()
    response = httpx.post(
        guarded.url + "/v2/models/affine/infer",
        content=head + b"\0" * 16,
        headers={
            "Inference-Header-Content-Length": str(len(head)),
            "Authorization": f"Bearer {TOKEN}",
        },
        timeout=10,
    )
    assert response.status_code == 400 and "needs" in response.json()["error"]
