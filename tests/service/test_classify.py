"""The people's endpoint: an image or a JSON array in, top-k labels with probabilities out."""

from __future__ import annotations

import io

import httpx
import numpy as np
import onnxruntime as ort
from PIL import Image

from foldserve.model_metadata import InputSpec
from service import preprocess
from service.repository import Preprocessing
from tests.service import onnx_models as om
from tests.service.live import LiveServer

SPEC = InputSpec("input", "NCHW", (1, 8, 8), (4.9,), (6.0,), (0.0, 16.0), "L", "bilinear", "high")


def _png(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def _digits_probs(x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(om.DIGITS), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"input": x})[0].astype(np.float64)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_image_preprocessing_follows_the_metadata() -> None:
    """White paper with dark ink: inverted, so ink becomes 16 and paper 0, then normalised."""
    pixels = np.full((8, 8), 255, np.uint8)
    pixels[2:6, 3] = 0
    x = preprocess.image_to_input(_png(pixels), SPEC)
    assert x.shape == (1, 1, 8, 8) and x.dtype == np.float32
    raw = np.where(pixels == 0, 16.0, 0.0)
    np.testing.assert_allclose(x[0, 0], (raw - 4.9) / 6.0, rtol=1e-6)


def test_overrides_replace_metadata_fields() -> None:
    spec = preprocess.effective_spec(SPEC, Preprocessing(ink="low", value_range=(0.0, 1.0)))
    assert spec.ink == "low" and spec.value_range == (0.0, 1.0) and spec.mean == SPEC.mean


def test_classify_upload_matches_onnxruntime(server: LiveServer) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, size=(16, 16), dtype=np.uint8)
    image = _png(pixels)
    response = httpx.post(
        server.url + "/v2/models/digits/classify?top_k=3",
        files={"file": ("digit.png", image, "image/png")},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == "1"
    want = _digits_probs(preprocess.image_to_input(image, _served_spec(server)))[0]
    top = body["predictions"][0]
    assert [p["index"] for p in top] == list(np.argsort(-want, kind="stable")[:3])
    for p in top:
        assert p["label"] == str(p["index"])
        assert abs(p["probability"] - want[p["index"]]) <= 1e-5


def _served_spec(server: LiveServer) -> InputSpec:
    meta = httpx.get(server.url + "/v2/models/digits").json()["parameters"]["foldserve"]["input"]
    return InputSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta.items()})


def test_classify_raw_jpeg_body_and_json_array(server: LiveServer) -> None:
    jpeg = _png(np.full((8, 8), 200, np.uint8), fmt="JPEG")
    raw = httpx.post(
        server.url + "/v2/models/digits/classify",
        content=jpeg,
        headers={"Content-Type": "image/jpeg"},
    )
    assert raw.status_code == 200 and len(raw.json()["predictions"][0]) == 5
    batch = np.random.default_rng(2).uniform(0, 16, size=(2, 1, 8, 8))
    response = httpx.post(server.url + "/v2/models/digits/classify?top_k=1", json=batch.tolist())
    assert response.status_code == 200, response.text
    spec = _served_spec(server)
    want = _digits_probs(((batch - spec.mean[0]) / spec.std[0]).astype(np.float32))
    got = response.json()["predictions"]
    assert [row[0]["index"] for row in got] == list(want.argmax(axis=1))


def test_classify_refusals(server: LiveServer) -> None:
    url = server.url + "/v2/models/digits/classify"
    gif = io.BytesIO()
    Image.new("L", (4, 4)).save(gif, format="GIF")
    assert httpx.post(url, content=gif.getvalue()).status_code == 415
    assert httpx.post(url, content=b"not an image").status_code == 415
    assert httpx.post(url, json=[[1, 2], [3]]).status_code == 400
    assert httpx.post(url, json=[1.0] * 10).status_code == 400
    assert httpx.post(url, files={"other": ("a", b"x")}).status_code == 400
    assert httpx.post(url + "?top_k=0", json=[0.0] * 64).status_code == 400
    no_meta = httpx.post(server.url + "/v2/models/fixed/classify", json=[0.0] * 6)
    assert no_meta.status_code == 400 and "no foldserve metadata" in no_meta.json()["error"]
    assert httpx.get(server.url + "/v2/health/ready").status_code == 200
