"""Model control without HTTP: a real ModelManager over a temporary repository."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from service.errors import LoadFailedError, ModelNotReadyError, NotFoundError, VersionLoadError
from service.manager import ModelManager
from service.runtime import RuntimeOptions, load_version
from tests.service import onnx_models as om

OPTIONS = RuntimeOptions(providers=("CPUExecutionProvider",), intra_op_threads=1)


def test_iobinding_run_equals_session_run() -> None:
    model = load_version("digits", 1, om.DIGITS, OPTIONS)
    x = np.random.default_rng(0).normal(size=(3, 1, 8, 8)).astype(np.float32)
    got, timings = model.run({"input": x}, ["logits"])
    want = ort.InferenceSession(str(om.DIGITS), providers=["CPUExecutionProvider"]).run(
        None, {"input": x}
    )[0]
    np.testing.assert_array_equal(got["logits"], want)
    assert timings.infer_ns > 0 and model.batched and model.metadata is not None


def test_training_mode_batchnorm_is_refused(tmp_path: Path) -> None:
    path = om.publish(tmp_path, "bn", 1, om.batchnorm_model(training=True))
    with pytest.raises(VersionLoadError, match=r"training mode.*'bn1'.*eval mode"):
        load_version("bn", 1, path, OPTIONS)


def test_failed_new_version_keeps_the_old_one_serving(tmp_path: Path) -> None:
    om.publish(tmp_path, "m", 1, om.affine_model())

    async def scenario() -> None:
        manager = ModelManager(tmp_path, OPTIONS)
        await manager.start()
        assert manager.ready and manager.resolve("m").version == 1
        om.publish(tmp_path, "m", 2, b"broken")
        with pytest.raises(LoadFailedError, match=r"version 2: .*serving: \[1\]"):
            await manager.load("m")
        assert manager.ready and manager.resolve("m").version == 1
        with pytest.raises(ModelNotReadyError, match="not a valid ONNX file"):
            manager.resolve("m", "2")
        rows = {r["version"]: r for r in manager.index()}
        assert rows["1"]["state"] == "READY" and rows["2"]["state"] == "UNAVAILABLE"
        om.publish(tmp_path, "m", 3, om.affine_model(scale=3.0))
        assert await manager.load("m") == [3]
        assert manager.resolve("m").version == 3
        with pytest.raises(NotFoundError):
            manager.resolve("m", "9")
        with pytest.raises(NotFoundError):
            await manager.load("other")
        await manager.unload("m")
        assert not manager.ready
        with pytest.raises(ModelNotReadyError, match="unloaded"):
            manager.resolve("m")

    asyncio.run(scenario())
