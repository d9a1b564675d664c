"""The service on a CUDA GPU: `auto` picks CUDA and says so, inputs and outputs go through
IOBinding there and agree with the CPU provider, the provider options of the settings reach the
session, and a fixed-shape model replays a CUDA graph with each request's own inputs.

Skipped without onnxruntime-gpu's CUDA provider (CI has none). On a GPU machine:
`pytest -m gpu -rs` (every test must run, none skip).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from service.runtime import ModelVersion, RuntimeOptions, load_version
from tests.service import onnx_models as om
from tests.service.live import start_server

CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and onnxruntime-gpu's CUDA provider"),
]
ON_CUDA = RuntimeOptions(("CUDAExecutionProvider", "CPUExecutionProvider"), cuda_tf32=False)
ON_CPU = RuntimeOptions(("CPUExecutionProvider",))


def digits_batch(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 16, (rows, 1, 8, 8)).astype(np.float32)


def run(version: ModelVersion, x: np.ndarray) -> np.ndarray:
    name = version.inputs[0].name
    outputs, _ = version.run({name: x}, version.output_names)
    return outputs[version.output_names[0]]


def test_auto_serves_on_cuda_and_reports_it(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    om.publish(root, "digits", 1, om.DIGITS)
    x = digits_batch(5)
    want = run(load_version("digits", 1, om.DIGITS, ON_CPU), x)
    with start_server(root, providers="auto", cuda_tf32="false") as live:
        config = httpx.get(f"{live.url}/v2/models/digits/config", timeout=10).json()
        runtime = config["runtime"]
        assert runtime["providers"][0] == "CUDAExecutionProvider"
        assert config["instance_group"][0]["kind"] == "KIND_GPU"
        metadata = httpx.get(f"{live.url}/v2/models/digits", timeout=10).json()
        assert metadata["parameters"]["providers"][0] == "CUDAExecutionProvider"
        cuda_options = runtime["provider_options"]["CUDAExecutionProvider"]
        assert cuda_options["cudnn_conv_algo_search"] == "HEURISTIC"
        tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
        body = {"inputs": [{**tensor, "data": x.ravel().tolist()}]}
        response = httpx.post(f"{live.url}/v2/models/digits/infer", json=body, timeout=30)
        assert response.status_code == 200, response.text
        got = np.array(response.json()["outputs"][0]["data"], np.float32).reshape(want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 7, 64, 256])
def test_iobinding_on_cuda_equals_the_cpu_provider(rows: int) -> None:
    on_gpu = load_version("digits", 1, om.DIGITS, ON_CUDA)
    on_cpu = load_version("digits", 1, om.DIGITS, ON_CPU)
    assert on_gpu.providers[0] == "CUDAExecutionProvider" and on_gpu.graph is None
    x = digits_batch(rows, seed=rows)
    np.testing.assert_allclose(run(on_gpu, x), run(on_cpu, x), rtol=1e-4, atol=1e-4)


def test_the_settings_provider_options_reach_the_session() -> None:
    chosen = RuntimeOptions(
        ("CUDAExecutionProvider", "CPUExecutionProvider"),
        cuda_conv_algo_search="EXHAUSTIVE",
        cuda_arena_extend_strategy="kSameAsRequested",
        cuda_mem_limit_mib=1024,
    )
    version = load_version("digits", 1, om.DIGITS, chosen)
    given = version.provider_options["CUDAExecutionProvider"]
    assert given["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    assert given["arena_extend_strategy"] == "kSameAsRequested"
    assert int(given["gpu_mem_limit"]) == 1024 << 20
    x = digits_batch(3)
    on_cpu = load_version("digits", 1, om.DIGITS, ON_CPU)
    np.testing.assert_allclose(run(version, x), run(on_cpu, x), rtol=1e-3, atol=1e-3)


def test_a_fixed_shape_model_replays_a_cuda_graph_with_each_calls_inputs(tmp_path: Path) -> None:
    path = om.publish(tmp_path / "repo", "fixed", 1, om.fixed_batch_model())
    version = load_version("fixed", 1, path, RuntimeOptions(ON_CUDA.providers, cuda_graphs=True))
    assert version.graph is not None
    assert version.provider_options["CUDAExecutionProvider"]["enable_cuda_graph"] == "1"
    rng = np.random.default_rng(0)
    for _ in range(5):  # a replay that kept the captured inputs would repeat one answer
        x = rng.normal(size=(2, 3)).astype(np.float32)
        np.testing.assert_array_equal(run(version, x), np.maximum(x, 0))
    dynamic = load_version(
        "digits", 1, om.DIGITS, RuntimeOptions(ON_CUDA.providers, cuda_graphs=True)
    )
    assert dynamic.graph is None  # a dynamic batch axis: no graph, served as usual


def test_cuda_graphs_through_the_service(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    om.publish(root, "fixed", 1, om.fixed_batch_model())
    om.publish(root, "digits", 1, om.DIGITS)
    with start_server(root, cuda_graphs="true") as live, httpx.Client(base_url=live.url) as http:
        for values in ([1, -2, 3, -4, 5, -6], [-1, 2, -3, 4, -5, 6]):
            body = {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": values}]}
            answer = http.post("/v2/models/fixed/infer", json=body, timeout=30)
            assert answer.status_code == 200, answer.text
            assert answer.json()["outputs"][0]["data"] == [max(v, 0) for v in values]
        x = digits_batch(2).ravel().tolist()
        body = {"inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": x}]}
        assert http.post("/v2/models/digits/infer", json=body, timeout=30).status_code == 200
