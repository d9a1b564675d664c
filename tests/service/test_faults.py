"""Injected faults: a new version that cannot load or warm up, a model folder removed while it
serves, and ONNX Runtime failing inside a call. Through each, the requests that can be answered
are, and the others fail alone, with a message and no trace.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.errors import InferenceFailedError, QueueFullError
from service.executor import Executor
from service.metrics import Metrics
from service.runtime import ModelVersion, RuntimeOptions, load_version
from service.stats import REJECTED, StatsBook
from tests.service import onnx_models as om
from tests.service.live import LiveServer, start_server

REQUEST = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
SCALE_1 = [3.0, 5.0, 7.0, 9.0]  # affine, scale 2: y = 2x + 1
SCALE_3 = [4.0, 7.0, 10.0, 13.0]


def failing_warmup_model() -> bytes:
    """Loads fine, fails on its first run (the warm-up): Gather from an empty table."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    table = numpy_helper.from_array(np.zeros(0, np.float32), "table")
    nodes = [
        helper.make_node("Cast", ["x"], ["i"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "i"], ["y"]),
    ]
    return om._model(helper.make_graph(nodes, "no_warmup", [x], [y], [table]))


def allocating_model() -> bytes:
    """y = x + sum(zeros(max(x))): a request whose largest value is 1e15 makes ONNX Runtime
    try to allocate 4 PB and fail inside the call (FAIL, not INVALID_ARGUMENT), which is a
    real fault of the runtime, injected with no hook in the service."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    one = numpy_helper.from_array(np.array([1], np.int64), "one")
    nodes = [
        helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
        helper.make_node("Cast", ["m"], ["mi"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["mi", "one"], ["shape"]),
        helper.make_node("ConstantOfShape", ["shape"], ["zeros"]),
        helper.make_node("ReduceSum", ["zeros"], ["s"], keepdims=0),
        helper.make_node("Add", ["x", "s"], ["y"]),
    ]
    return om._model(helper.make_graph(nodes, "allocating", [x], [y], [one]))


class Traffic:
    """Clients posting the same request in a loop until stopped; every answer is kept."""

    def __init__(self, url: str, model: str, clients: int = 3) -> None:
        self.url, self.model = url, model
        self.answers: list[tuple[int, Any]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop) for _ in range(clients)]

    def _loop(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self.stop.is_set():
                response = http.post(f"/v2/models/{self.model}/infer", json=REQUEST)
                body = response.json()
                data = body["outputs"][0]["data"] if response.status_code == 200 else body
                self.answers.append((response.status_code, data))

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def wait_for(self, count: int) -> None:
        target = len(self.answers) + count
        while len(self.answers) < target and all(t.is_alive() for t in self.threads):
            self.stop.wait(0.01)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    om.publish(root, "m", 1, om.affine_model())
    om.publish(root, "oom", 1, allocating_model())
    return root


@pytest.fixture
def live(root: Path) -> Iterator[LiveServer]:
    with start_server(root) as server:
        yield server


def test_a_version_that_fails_to_load_or_warm_up_never_interrupts_the_old(
    root: Path, live: LiveServer
) -> None:
    with Traffic(live.url, "m") as traffic, httpx.Client(base_url=live.url, timeout=60) as http:
        traffic.wait_for(20)
        for broken, reason in [
            (b"not an onnx file", "not a valid ONNX file"),
            (om.affine_model()[:-40], "version 2"),  # truncated: whatever part fails first
            (failing_warmup_model(), "could not load or run it"),
        ]:
            om.publish(root, "m", 2, broken)
            response = http.post("/v2/repository/models/m/load")
            assert response.status_code == 400, response.text
            assert "version 2" in response.json()["error"] and reason in response.json()["error"]
            assert "serving: [1]" in response.json()["error"]
            traffic.wait_for(20)
        om.publish(root, "m", 2, om.affine_model(scale=3.0))
        assert http.post("/v2/repository/models/m/load").status_code == 200
        traffic.wait_for(20)
    statuses = {status for status, _ in traffic.answers}
    assert statuses == {200}, [a for a in traffic.answers if a[0] != 200][:3]
    answers = [data for _, data in traffic.answers]
    assert set(map(tuple, answers)) == {tuple(SCALE_1), tuple(SCALE_3)}
    first_new = answers.index(SCALE_3)
    assert SCALE_1 not in answers[first_new + len(traffic.threads) :]  # swapped, no way back


def test_the_model_folder_removed_while_serving(root: Path, live: LiveServer) -> None:
    with Traffic(live.url, "m") as traffic, httpx.Client(base_url=live.url, timeout=60) as http:
        traffic.wait_for(20)
        shutil.rmtree(root / "m")
        traffic.wait_for(50)
        index = http.post("/v2/repository/index").json()
        row = next(r for r in index if r["name"] == "m")
        assert row["state"] == "READY" and "removed from disk" in row["reason"], row
        # A reload finds nothing on disk and changes nothing.
        assert http.post("/v2/repository/models/m/load").status_code == 404
        traffic.wait_for(20)
    assert {status for status, _ in traffic.answers} == {200}
    assert all(data == SCALE_1 for _, data in traffic.answers)


def test_an_onnx_runtime_failure_fails_only_its_batch(live: LiveServer) -> None:
    poison = {"inputs": [{**REQUEST["inputs"][0], "data": [1, 2, 3, 1e15]}]}
    with httpx.Client(base_url=live.url, timeout=60) as http:
        for _ in range(3):
            response = http.post("/v2/models/oom/infer", json=poison)
            assert response.status_code == 500, response.text
            error = response.json()["error"]
            assert error.startswith("internal error: model 'oom' version 1 failed to run"), error
            for leak in ("Traceback", "onnxruntime_src", ".cc:", "AllocateRaw"):
                assert leak not in response.text
            fine = http.post("/v2/models/oom/infer", json=REQUEST)
            assert fine.status_code == 200 and fine.json()["outputs"][0]["data"] == [1, 2, 3, 4]
        # Concurrent requests: the poisoned one fails; the others fail only if they shared its
        # batch; every request afterwards succeeds.
        with Traffic(live.url, "oom", clients=4) as traffic:
            traffic.wait_for(10)
            assert http.post("/v2/models/oom/infer", json=poison).status_code == 500
            traffic.wait_for(10)
            tail = len(traffic.answers)
            traffic.wait_for(30)
        assert {status for status, _ in traffic.answers[tail:]} == {200}
        assert {status for status, _ in traffic.answers} <= {200, 500}
        stats = http.get("/v2/models/oom/stats").json()["model_stats"][0]["inference_stats"]
        assert stats["fail"]["count"] >= 4
    log = live.logs()
    assert log.count("Failed to allocate memory") >= 4  # the detail is in the log, once each
    assert "Traceback" not in log


def test_an_exception_raised_by_the_runtime_is_an_internal_error(tmp_path: Path) -> None:
    """In process: any exception out of the ONNX Runtime call, not only ONNX Runtime's own,
    becomes InferenceFailedError with the generic message; the detail is kept for the log."""
    path = om.publish(tmp_path, "m", 1, om.affine_model())
    version: ModelVersion = load_version("m", 1, path, RuntimeOptions(("CPUExecutionProvider",)))

    def broken(*_: object) -> None:
        raise RuntimeError("CUDA error: an illegal memory access (/src/kernel.cu:12)")

    version.run = broken  # type: ignore[method-assign]
    stats = StatsBook()
    executor = Executor(stats, Metrics(stats))
    feeds = {"x": np.ones((1, 4), np.float32)}
    with pytest.raises(InferenceFailedError) as caught:
        asyncio.run(executor.run(version, feeds, ["y"], 1))
    assert caught.value.message.startswith("internal error")
    assert "kernel.cu" not in caught.value.message and "kernel.cu" in caught.value.detail


def test_a_subclass_of_a_mapped_error_is_counted_under_its_parents_reason(tmp_path: Path) -> None:
    """The failure reasons behind /stats and /metrics follow the class hierarchy, as statuses do."""

    class LateRefusalError(QueueFullError):
        pass

    path = om.publish(tmp_path, "m", 1, om.affine_model())
    version = load_version("m", 1, path, RuntimeOptions(("CPUExecutionProvider",)))
    stats = StatsBook()
    executor = Executor(stats, Metrics(stats))
    with pytest.raises(LateRefusalError), executor.track(version):
        raise LateRefusalError("full")
    assert stats.of("m", 1).failures == {REJECTED: 1}
