"""A model that is as slow as the request asks: provably in flight for as long as a test needs.

Input `n` (INT64, [batch, 1]) is a number of iterations of a 128×128 matrix product in an ONNX
Loop; output `y` (FP32, [batch, 1]) is `n` again, so every answer can be checked. Warm-up runs
on zeros and so costs nothing, which keeps loading fast.
"""

from __future__ import annotations

import time

import httpx
import numpy as np
from onnx import TensorProto, helper, numpy_helper

from tests.service.onnx_models import _model

SIZE = 128


def slow_model() -> bytes:
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["s_in", "w"], ["product"]),
            helper.make_node("Tanh", ["product"], ["s_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "work",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [SIZE, SIZE]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [SIZE, SIZE]),
        ],
    )
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.1, (SIZE, SIZE)).astype(np.float32), "w"),
        numpy_helper.from_array(np.full((SIZE, SIZE), 0.01, np.float32), "s0"),
        numpy_helper.from_array(np.array(True), "true"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
    ]
    nodes = [
        helper.make_node("ReduceMax", ["n"], ["trips"], keepdims=0),
        helper.make_node("Loop", ["trips", "true", "s0"], ["s_final"], body=body),
        helper.make_node("ReduceSum", ["s_final"], ["total"], keepdims=0),
        helper.make_node("Mul", ["total", "zero"], ["nothing"]),  # keeps the loop in the graph
        helper.make_node("Cast", ["n"], ["n_float"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["n_float", "nothing"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("n", TensorProto.INT64, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        inits,
    )
    return _model(graph)


def request(n: int) -> dict[str, object]:
    return {"inputs": [{"name": "n", "datatype": "INT64", "shape": [1, 1], "data": [n]}]}


def answer(response: httpx.Response) -> float:
    return response.json()["outputs"][0]["data"][0]


def iterations_for(url: str, seconds: float) -> int:
    """How many iterations take about `seconds` on this machine, right now."""
    probe = 2000
    start = time.perf_counter()
    response = httpx.post(f"{url}/v2/models/slow/infer", json=request(probe), timeout=60)
    elapsed = time.perf_counter() - start
    assert response.status_code == 200, response.text
    return max(probe, min(1_000_000, int(probe * seconds / max(elapsed, 1e-4))))
