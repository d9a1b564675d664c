"""Execution-provider options: what the settings ask of CUDA and TensorRT reaches ONNX Runtime,
and CUDA graphs are asked for only where they can work. The sessions themselves need a GPU
(tests/service/test_gpu.py); what is checked here is what the service would hand them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from service import datatypes
from service.cuda_graph import CudaGraph, qualifies
from service.runtime import RuntimeOptions, TensorSpec, load_version
from service.settings import load_settings
from tests.service import onnx_models as om

CUDA_FIRST = ("CUDAExecutionProvider", "CPUExecutionProvider")


def options(tmp_path: Path, **settings: object) -> RuntimeOptions:
    """The options these settings give, as if this ONNX Runtime offered CUDA and TensorRT."""
    built = RuntimeOptions.from_settings(
        load_settings({"repository": str(tmp_path), "providers": "cpu", **settings})
    )
    return dataclasses.replace(built, providers=CUDA_FIRST)


def test_cuda_defaults_are_heuristic_search_and_power_of_two_arena(tmp_path: Path) -> None:
    assert options(tmp_path).provider_list() == [
        (
            "CUDAExecutionProvider",
            {
                "device_id": "0",
                "cudnn_conv_algo_search": "HEURISTIC",
                "arena_extend_strategy": "kNextPowerOfTwo",
            },
        ),
        ("CPUExecutionProvider", {}),
    ]


def test_cuda_options_from_the_settings(tmp_path: Path) -> None:
    chosen = options(
        tmp_path,
        device_id=1,
        cuda_conv_algo_search="EXHAUSTIVE",
        cuda_arena_extend_strategy="kSameAsRequested",
        cuda_mem_limit_mib=2048,
        cuda_tf32=False,
        cuda_graphs=True,
    )
    (cuda, cuda_options), cpu = chosen.provider_list()
    assert cuda == "CUDAExecutionProvider" and cpu == ("CPUExecutionProvider", {})
    assert cuda_options == {
        "device_id": "1",
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "arena_extend_strategy": "kSameAsRequested",
        "gpu_mem_limit": str(2048 << 20),
        "use_tf32": "0",
    }
    # A graph is captured only for a model that qualifies, so only when asked for by the loader.
    assert chosen.provider_list(cuda_graph=True)[0][1]["enable_cuda_graph"] == "1"


def test_tensorrt_options_from_the_settings(tmp_path: Path) -> None:
    cache = tmp_path / "engines"
    cache.mkdir()
    chosen = dataclasses.replace(
        options(tmp_path, tensorrt_fp16=True, tensorrt_cache_dir=str(cache)),
        providers=("TensorrtExecutionProvider", *CUDA_FIRST),
    )
    assert chosen.provider_list()[0] == (
        "TensorrtExecutionProvider",
        {
            "device_id": "0",
            "trt_fp16_enable": "True",
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(cache),
        },
    )
    plain = dataclasses.replace(options(tmp_path), providers=("TensorrtExecutionProvider",))
    assert plain.provider_list()[0][1] == {"device_id": "0", "trt_fp16_enable": "False"}


def test_only_fixed_numeric_shapes_qualify_for_a_cuda_graph() -> None:
    fp32, text = datatypes.BY_NAME["FP32"], datatypes.BYTES
    assert qualifies([TensorSpec("x", fp32, (1, 3, 8, 8)), TensorSpec("y", fp32, (1, 10))])
    assert not qualifies([TensorSpec("x", fp32, (-1, 3, 8, 8))])
    assert not qualifies([TensorSpec("s", text, (1,))])


def test_cuda_graphs_change_nothing_on_the_cpu(tmp_path: Path) -> None:
    path = om.publish(tmp_path / "repo", "fixed", 1, om.fixed_batch_model())
    chosen = RuntimeOptions(("CPUExecutionProvider",), cuda_graphs=True)
    version = load_version("fixed", 1, path, chosen)
    assert version.graph is None and version.providers == ["CPUExecutionProvider"]
    x = -np.ones(version.inputs[0].shape, np.float32)
    outputs, _ = version.run({version.inputs[0].name: x}, version.output_names)
    np.testing.assert_array_equal(outputs[version.output_names[0]], np.zeros_like(x))  # Relu


def test_fixed_buffers_hand_each_call_its_own_answer(tmp_path: Path) -> None:
    """The CUDA graph's buffer logic, on host buffers: inputs copied in, outputs copied out,
    so no answer is overwritten by the next call and no call reads the last one's inputs."""
    path = om.publish(tmp_path / "repo", "fixed", 1, om.fixed_batch_model())
    version = load_version("fixed", 1, path, RuntimeOptions(("CPUExecutionProvider",)))
    graph = CudaGraph(version.session, version.inputs, version.outputs, 0, device="cpu")
    rng = np.random.default_rng(0)
    calls = [rng.normal(size=(2, 3)).astype(np.float32) for _ in range(4)]
    answers = [graph.run({"x": x}, ["y"])["y"] for x in calls]
    for x, answer in zip(calls, answers, strict=True):
        np.testing.assert_array_equal(answer, np.maximum(x, 0))
