"""Property-based fuzzing of infer, classify and the repository against a live server.

Every generated request must get a 4xx with `{"error": ...}` (or, when a mutation happens to
leave the request valid, a 200), never a 5xx or a dropped connection; after each property, a
valid request must still be answered correctly. Examples are bounded so the file runs in well
under a minute on a 2-core machine.

NaN and infinities (policy): `infer` computes with them, as Triton does. They are ordinary
IEEE-754 values of the FP16/FP32/FP64 datatypes, and whether a NaN input is meaningful is the
model's business. In JSON they travel as `NaN`, `Infinity` and `-Infinity` (what Python's
json and the official clients read and write); in binary data they are plain bits. `classify`
refuses them with 400: it normalises raw pixel values for the model, and a non-finite pixel can
only be a client mistake.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from service import datatypes, tensors
from tests.service.live import LiveServer

HEADER = "Inference-Header-Content-Length"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))  # more for a long hunt
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
DATATYPES = (
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
)
VALID = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [0.5] * 8}]}
EXPECTED = [2.0] * 8  # affine: y = 2x + 1


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def check_refused(response: httpx.Response) -> None:
    """A client mistake: 4xx with an error message and no trace; a 200 when still valid."""
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code != 200:
        assert 400 <= response.status_code < 500, response.status_code
        assert response.headers.get("content-type") == "application/json", response.text[:500]
        body = response.json()
        assert isinstance(body.get("error"), str) and body["error"], body
        assert "Traceback" not in response.text


def check_still_serving(http: httpx.Client) -> None:
    response = http.post("/v2/models/affine/infer", json=VALID)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == EXPECTED


# ---------------------------------------------------------------- strategies

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(DATATYPES),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
shapes = st.one_of(
    st.lists(st.integers(min_value=-3, max_value=2**64), max_size=5),
    st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=4),
    st.sampled_from([[0, 4], [2**31, 4], [2**62, 2**62], [10**19, 4], [-1, 4]]),
    json_values,
)
FIELDS = ("name", "shape", "datatype", "data", "parameters")


@st.composite
def mutated_requests(draw: st.DrawFn) -> Any:
    """A valid affine request with one to three of its fields replaced, at either level."""
    request: dict[str, Any] = json.loads(json.dumps(VALID))
    item = request["inputs"][0]
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from((*FIELDS, "request", "outputs", "delete", "inputs")))
        if target == "shape":
            item["shape"] = draw(shapes)
        elif target == "datatype":
            item["datatype"] = draw(st.one_of(st.sampled_from(DATATYPES), st.text(max_size=8)))
        elif target == "data":
            item["data"] = draw(st.one_of(json_values, st.lists(scalars, max_size=10)))
        elif target == "parameters":
            size = st.integers(min_value=-(2**65), max_value=2**65)
            item["parameters"] = draw(
                st.one_of(json_values, st.fixed_dictionaries({"binary_data_size": size}))
            )
        elif target == "name":
            item["name"] = draw(json_values)
        elif target == "outputs":
            request["outputs"] = draw(json_values)
        elif target == "inputs":
            request["inputs"] = draw(json_values)
        elif target == "delete":
            item.pop(draw(st.sampled_from(FIELDS)), None)
        else:
            request = draw(st.one_of(json_values, st.just(request)))
        if not isinstance(request, dict):
            break
    return request


def typed_request(datatype: str, data: Any, shape: Any) -> dict[str, Any]:
    """A request for the `typed` model: every input valid but the one of `datatype`."""
    inputs = []
    for name in DATATYPES[:-1]:
        item = {"name": f"in_{name.lower()}", "datatype": name, "shape": [1, 3]}
        item["data"] = [False] * 3 if name == "BOOL" else [0] * 3
        if name == datatype:
            item.update(data=data, shape=shape)
        inputs.append(item)
    return {"inputs": inputs}


# ---------------------------------------------------------------- JSON bodies


@FUZZ
@given(body=mutated_requests())
def test_mutated_json_is_refused_cleanly(http: httpx.Client, body: Any) -> None:
    content = json.dumps(body).encode()  # NaN/Infinity written as Python writes them
    check_refused(http.post("/v2/models/affine/infer", content=content))


@FUZZ
@given(
    datatype=st.sampled_from(DATATYPES[:-1]),
    data=st.one_of(json_values, st.lists(scalars, min_size=3, max_size=3)),
    shape=st.one_of(st.just([1, 3]), shapes),
)
def test_every_datatype_with_random_data(
    http: httpx.Client, datatype: str, data: Any, shape: Any
) -> None:
    request = typed_request(datatype, data, shape)
    check_refused(http.post("/v2/models/typed/infer", content=json.dumps(request).encode()))


@FUZZ
@given(body=st.binary(max_size=300), model=st.sampled_from(["affine", "digits", "typed"]))
def test_random_bytes_are_refused(http: httpx.Client, body: bytes, model: str) -> None:
    check_refused(http.post(f"/v2/models/{model}/infer", content=body))
    check_refused(http.post("/v2/repository/index", content=body))
    check_refused(http.post("/v2/repository/models/nothing-here/unload", content=body))


@FUZZ
@given(body=st.one_of(json_values, st.binary(max_size=64)))
def test_repository_bodies(http: httpx.Client, body: Any) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    check_refused(http.post("/v2/repository/index", content=content))
    # Loading a model refused at load (bn_train) or unknown ones never touches the serving set.
    check_refused(http.post("/v2/repository/models/bn_train/load", content=content))
    check_refused(http.post("/v2/repository/models/nothing-here/load", content=content))


def test_non_utf8_bytes_inside_json(http: httpx.Client) -> None:
    for body in (
        b'{"inputs": [{"name": "\xff\xfe", "shape": [1, 4], "datatype": "FP32", "data": [1]}]}',
        b'\xef\xbb\xbf{"inputs": []}',  # a byte-order mark
        b'{"id": "\xc3\x28", "inputs": []}',
        b"\x00" * 16,
        '{"inputs": "\udcff"}'.encode("utf-8", "surrogatepass"),
        b"[" * 100_000,  # deep nesting
        b'{"a":' * 50_000,
    ):
        check_refused(http.post("/v2/models/affine/infer", content=body))
        check_refused(http.post("/v2/repository/index", content=body))
        check_refused(
            http.post(
                "/v2/models/digits/classify",
                content=body,
                headers={"Content-Type": "application/json"},
            )
        )
    check_still_serving(http)


# ---------------------------------------------------------------- binary extension


@FUZZ
@given(
    declared=st.one_of(
        st.integers(min_value=-(2**65), max_value=2**65), st.integers(min_value=-5, max_value=400)
    ),
    header_length=st.one_of(
        st.integers(min_value=-10, max_value=10**6).map(str),
        # Printable text: control characters are refused by the HTTP parser, below the app.
        st.text(
            st.characters(min_codepoint=0x21, max_codepoint=0x2FF, exclude_categories=["Cc"]),
            max_size=6,
        ),
        st.none(),
    ),
    shape=st.one_of(st.just([2, 4]), shapes),
    tail=st.binary(max_size=80),
    datatype=st.sampled_from(DATATYPES),
)
def test_binary_extension(
    http: httpx.Client,
    declared: int,
    header_length: str | None,
    shape: Any,
    tail: bytes,
    datatype: str,
) -> None:
    request = {
        "inputs": [
            {
                "name": "x",
                "shape": shape,
                "datatype": datatype,
                "parameters": {"binary_data_size": declared},
            }
        ]
    }
    head = json.dumps(request).encode()
    headers: dict[str, str | bytes] = {}
    if header_length is not None:
        headers[HEADER] = header_length.encode("utf-8")  # raw bytes, not always ASCII
    response = http.post("/v2/models/affine/infer", content=head + tail, headers=headers)
    check_refused(response)
    # The header right, the tensor truncated or padded.
    headers = {HEADER: str(len(head))}
    response = http.post("/v2/models/affine/infer", content=head + tail, headers=headers)
    check_refused(response)


@FUZZ
@given(
    shape=st.lists(st.integers(0, 4), min_size=1, max_size=3),
    tail=st.binary(max_size=64),
    declared=st.integers(0, 80),
)
def test_binary_bytes_tensors(
    http: httpx.Client, shape: list[int], tail: bytes, declared: int
) -> None:
    """BYTES binary data: 4-byte lengths that may point anywhere."""
    request = {
        "inputs": [
            {
                "name": "x",
                "shape": shape,
                "datatype": "BYTES",
                "parameters": {"binary_data_size": declared},
            }
        ]
    }
    head = json.dumps(request).encode()
    response = http.post(
        "/v2/models/affine/infer", content=head + tail, headers={HEADER: str(len(head))}
    )
    check_refused(response)


def test_binary_truncated_at_every_length(http: httpx.Client) -> None:
    request = {
        "inputs": [
            {
                "name": "x",
                "shape": [2, 4],
                "datatype": "FP32",
                "parameters": {"binary_data_size": 32},
            }
        ]
    }
    head = json.dumps(request).encode()
    data = np.full(8, 0.5, np.float32).tobytes()
    for cut in range(32):
        response = http.post(
            "/v2/models/affine/infer", content=head + data[:cut], headers={HEADER: str(len(head))}
        )
        assert response.status_code == 400, response.text
    response = http.post(
        "/v2/models/affine/infer", content=head + data, headers={HEADER: str(len(head))}
    )
    assert response.status_code == 200
    check_still_serving(http)


# ---------------------------------------------------------------- compressed bodies


def gzip_bomb(megabytes: int) -> bytes:
    """`megabytes` MiB of zeros, gzip-compressed about 1000:1, built without holding them."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = b"\0" * (1 << 20)
    return b"".join(compressor.compress(chunk) for _ in range(megabytes)) + compressor.flush()


def test_compressed_bodies(http: httpx.Client) -> None:
    valid = json.dumps(VALID).encode()
    for encoding, data in (
        ("gzip", gzip.compress(valid)),
        ("deflate", zlib.compress(valid)),
        ("GZip", gzip.compress(valid)),
        ("identity", valid),
    ):
        response = http.post(
            "/v2/models/affine/infer", content=data, headers={"Content-Encoding": encoding}
        )
        assert response.status_code == 200, (encoding, response.text)
        assert response.json()["outputs"][0]["data"] == EXPECTED
    refused = [
        ("br", b"whatever", 415, "not supported"),
        ("gzip", b"not gzip at all", 400, "not valid gzip"),
        ("gzip", gzip.compress(valid)[:-10], 400, "truncated"),
        ("deflate", gzip.compress(valid), 400, "not valid deflate"),
        ("gzip", gzip_bomb(100), 413, "decompressed body larger than"),  # 100 MiB > 64 MiB
    ]
    for encoding, data, status, fragment in refused:
        response = http.post(
            "/v2/models/affine/infer", content=data, headers={"Content-Encoding": encoding}
        )
        assert response.status_code == status, (encoding, response.text)
        assert fragment in response.json()["error"]
    # The repository and classify read compressed bodies too.
    index = http.post(
        "/v2/repository/index",
        content=gzip.compress(b'{"ready": true}'),
        headers={"Content-Encoding": "gzip"},
    )
    assert index.status_code == 200 and all(r["state"] == "READY" for r in index.json())


@FUZZ
@given(
    body=st.one_of(
        st.binary(max_size=200),
        st.binary(max_size=200).map(gzip.compress),
        st.binary(max_size=200).map(lambda b: gzip.compress(b)[: len(b) // 2]),
        mutated_requests().map(lambda r: zlib.compress(json.dumps(r).encode())),
    ),
    encoding=st.sampled_from(["gzip", "deflate", "x-gzip", "compress", ""]),
)
def test_random_compressed_bodies(http: httpx.Client, body: bytes, encoding: str) -> None:
    headers = {"Content-Encoding": encoding}
    check_refused(http.post("/v2/models/affine/infer", content=body, headers=headers))


# ---------------------------------------------------------------- images


def png(width: int, height: int, mode: str = "L") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height), 128).save(out, format="PNG")
    return out.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_bomb(width: int, height: int, rows: int | None = None) -> bytes:
    """A greyscale PNG of width × height zero pixels, a few hundred KiB compressed; with `rows`,
    only that many rows of data follow the header (a lie about its size)."""
    compressor = zlib.compressobj(9)
    row = b"\0" * (width + 1)
    idat = (
        b"".join(compressor.compress(row) for _ in range(height if rows is None else rows))
        + compressor.flush()
    )
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def classify(http: httpx.Client, body: bytes, content_type: str | None) -> httpx.Response:
    headers = {"Content-Type": content_type} if content_type else {}
    return http.post("/v2/models/digits/classify", content=body, headers=headers)


@FUZZ
@given(
    body=st.one_of(
        st.binary(max_size=200),
        st.binary(max_size=200).map(lambda b: b"\x89PNG\r\n\x1a\n" + b),
        st.binary(max_size=200).map(lambda b: b"\xff\xd8\xff\xe0" + b),
        st.binary(max_size=200).map(lambda b: b"GIF89a" + b),
    ),
    content_type=st.sampled_from(
        [
            None,
            "image/png",
            "image/jpeg",
            "application/json",
            "multipart/form-data",
            "multipart/form-data; boundary=x",
        ]
    ),
)
def test_classify_random_bodies(http: httpx.Client, body: bytes, content_type: str | None) -> None:
    check_refused(classify(http, body, content_type))


def test_classify_images_that_are_not_images(http: httpx.Client) -> None:
    good = png(8, 8)
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)).save(
        noise, format="PNG"
    )
    noisy = noise.getvalue()
    out = io.BytesIO()
    Image.new("L", (8, 8)).save(out, format="GIF")
    cases = [
        good[: len(good) // 2],  # truncated
        good[:40],
        noisy[: len(noisy) * 2 // 3],  # cut inside the pixel data
        out.getvalue(),  # GIF: not a format we take
        b"BM" + b"\0" * 60,
    ]
    for body in cases:
        for content_type in (None, "image/png"):
            response = classify(http, body, content_type)
            check_refused(response)
            assert response.status_code in (400, 415), response.text
        files = {"file": ("x.png", body, "image/png")}
        check_refused(http.post("/v2/models/digits/classify", files=files))
    assert classify(http, good, "image/png").status_code == 200
    check_still_serving(http)


def test_decompression_bombs_are_refused_before_decoding(http: httpx.Client) -> None:
    # 60 000 x 60 000 (3.6 G pixels) declared in 100 bytes, and 9 000 x 9 000 zeros that are
    # really there, compressed 1000:1: both refused on the header, before a pixel is decoded.
    header_only = png_bomb(60_000, 60_000, rows=1)
    for body in (header_only, png_bomb(9_000, 9_000)):
        response = classify(http, body, "image/png")
        assert response.status_code in (400, 413, 415), response.text
        assert "too large" in response.json()["error"] or "bomb" in response.json()["error"]
    check_still_serving(http)


# ---------------------------------------------------------------- NaN and infinities


def test_nan_and_infinity_are_computed_by_infer(http: httpx.Client) -> None:
    """Policy: infer computes with non-finite floats (see the module docstring)."""
    values = [float("nan"), float("inf"), float("-inf"), 1.0]
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": values}]}
    response = http.post("/v2/models/affine/infer", content=json.dumps(body).encode())
    assert response.status_code == 200, response.text
    data = json.loads(response.text)["outputs"][0]["data"]  # Python's json reads NaN, Infinity
    assert math.isnan(data[0]) and data[1] == math.inf and data[2] == -math.inf and data[3] == 3.0
    # The same through binary data, in and out.
    raw = np.array([values], np.float32)
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [1, 4],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": raw.nbytes},
                }
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
        }
    ).encode()
    response = http.post(
        "/v2/models/affine/infer", content=head + raw.tobytes(), headers={HEADER: str(len(head))}
    )
    assert response.status_code == 200, response.text
    length = int(response.headers[HEADER])
    out = np.frombuffer(response.content[length:], np.float32)
    np.testing.assert_array_equal(out, 2 * raw.ravel() + 1)
    # Out of FP16's range: becomes an infinity, as a cast to the datatype does.
    fp16 = {**typed_request("FP16", [1e6, -1e6, 1.0], [1, 3]), "outputs": [{"name": "out_fp16"}]}
    response = http.post("/v2/models/typed/infer", content=json.dumps(fp16).encode())
    assert response.status_code == 200, response.text
    assert json.loads(response.text)["outputs"][0]["data"] == [math.inf, -math.inf, 1.0]


def test_a_float_beyond_its_datatype_becomes_an_infinity_quietly() -> None:
    """Regression: the cast warned 'overflow encountered in cast' into the server's log (and
    would fail any caller running with warnings as errors, as these tests do)."""
    array = tensors.from_json("input 'x'", datatypes.BY_NAME["FP16"], (1, 3), [1e300, -7e4, 1])
    assert array.tolist() == [[math.inf, -math.inf, 1.0]]


def test_nan_and_infinity_are_refused_by_classify(http: httpx.Client) -> None:
    for bad in (math.nan, math.inf, -math.inf):
        pixels = [[[0.5] * 8 for _ in range(8)]]
        pixels[0][3][3] = bad
        response = classify(http, json.dumps(pixels).encode(), "application/json")
        assert response.status_code == 400, response.text
        assert "non-finite" in response.json()["error"]


@pytest.fixture(autouse=True)
def _still_serving_afterwards(http: httpx.Client) -> Iterator[None]:
    yield
    check_still_serving(http)
