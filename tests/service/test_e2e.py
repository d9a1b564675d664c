"""End to end: a real uvicorn process driven by the official `tritonclient.http` client.

Every output is compared with a direct ONNX Runtime run of the same file, within
1e-5 * (1 + |y|).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.service import onnx_models as om
from tests.service.live import LiveServer

RNG = np.random.default_rng(0)


@pytest.fixture
def client(server: LiveServer):
    with triton.InferenceServerClient(
        server.address, connection_timeout=10, network_timeout=30
    ) as c:
        yield c


def direct(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    if want.dtype.kind == "f":
        bound = 1e-5 * (1 + np.abs(want.astype(np.float64)))
        assert np.all(np.abs(got.astype(np.float64) - want.astype(np.float64)) <= bound)
    else:
        np.testing.assert_array_equal(got, want)


def test_health_and_server_metadata(client) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "foldserve"
    assert {"binary_tensor_data", "classification", "model_repository"} <= set(meta["extensions"])
    assert client.is_model_ready("digits")
    assert client.is_model_ready("digits", "1")
    assert not client.is_model_ready("digits", "7")


def test_model_metadata_from_graph_and_metadata_props(client) -> None:
    meta = client.get_model_metadata("digits")
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert meta["parameters"]["labels"] == [str(i) for i in range(10)]
    assert meta["parameters"]["providers"][-1] == "CPUExecutionProvider"  # where it runs
    typed = client.get_model_metadata("typed", "1")
    assert {t["datatype"] for t in typed["inputs"]} == set(om.TYPED)


@pytest.mark.parametrize("binary", [False, True])
def test_digits_infer_matches_onnxruntime(client, binary: bool) -> None:
    x = RNG.normal(size=(5, 1, 8, 8)).astype(np.float32)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    wanted = [triton.InferRequestedOutput("logits", binary_data=binary)]
    result = client.infer("digits", [tensor], outputs=wanted, request_id="abc")
    assert result.get_response()["id"] == "abc"
    assert result.get_response()["model_version"] == "1"
    assert_close(result.as_numpy("logits"), direct(om.DIGITS, {"input": x})["logits"])


def test_no_outputs_named_returns_all_binary(client) -> None:
    x = RNG.normal(size=(2, 4)).astype(np.float32)
    tensor = triton.InferInput("x", [2, 4], "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("affine", [tensor])  # the client then asks binary_data_output
    assert result.get_output("y")["parameters"]["binary_data_size"] == 32
    np.testing.assert_allclose(result.as_numpy("y"), 2 * x + 1, rtol=1e-6)


def _typed_values(datatype: str, dtype: np.dtype) -> np.ndarray:
    if datatype == "BOOL":
        return RNG.random((4, 3)) > 0.5
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return RNG.integers(info.min, info.max, size=(4, 3), dtype=dtype, endpoint=True)
    return RNG.normal(size=(4, 3)).astype(dtype)


@pytest.mark.parametrize("binary", [False, True])
def test_every_datatype_round_trips(client, repo: Path, binary: bool) -> None:
    """Each numeric datatype, FP16 and BOOL included, as JSON and as binary, both ways."""
    feeds, inputs, outputs = {}, [], []
    for datatype in om.TYPED:
        name = datatype.lower()
        dtype = triton_dtype(datatype)
        values = _typed_values(datatype, dtype)
        feeds[f"in_{name}"] = values
        tensor = triton.InferInput(f"in_{name}", [4, 3], datatype)
        tensor.set_data_from_numpy(values, binary_data=binary)
        inputs.append(tensor)
        outputs.append(triton.InferRequestedOutput(f"out_{name}", binary_data=binary))
    result = client.infer("typed", inputs, outputs=outputs)
    want = direct(repo / "typed" / "1" / "model.onnx", feeds)
    for name, expected in want.items():
        assert_close(result.as_numpy(name), expected)


def triton_dtype(datatype: str) -> np.dtype:
    from tritonclient.utils import triton_to_np_dtype

    return np.dtype(triton_to_np_dtype(datatype))


def test_requested_outputs_only(client) -> None:
    x = np.ones((1, 3), np.int32)
    tensors = []
    for datatype in om.TYPED:
        t = triton.InferInput(f"in_{datatype.lower()}", [1, 3], datatype)
        t.set_data_from_numpy(x.astype(triton_dtype(datatype)))
        tensors.append(t)
    wanted = [triton.InferRequestedOutput("out_int8"), triton.InferRequestedOutput("out_fp16")]
    response = client.infer("typed", tensors, outputs=wanted).get_response()
    assert [o["name"] for o in response["outputs"]] == ["out_int8", "out_fp16"]


def test_classification_extension(client) -> None:
    x = RNG.normal(size=(3, 1, 8, 8)).astype(np.float32)
    tensor = triton.InferInput("input", [3, 1, 8, 8], "FP32")
    tensor.set_data_from_numpy(x)
    wanted = [triton.InferRequestedOutput("logits", class_count=3)]
    result = client.infer("digits", [tensor], outputs=wanted)
    top = result.as_numpy("logits")
    assert top.shape == (3, 3)
    logits = direct(om.DIGITS, {"input": x})["logits"]
    for row, scores in zip(top, logits, strict=True):
        entries = [e.decode().split(":") for e in row]
        indices = [int(index) for _, index, _ in entries]
        assert indices == list(np.argsort(-scores, kind="stable")[:3])
        for value, index, label in entries:
            assert label == index  # the digits' labels are "0".."9"
            assert abs(float(value) - scores[int(index)]) <= 1e-5 * (1 + abs(scores[int(index)]))


def test_model_config_and_statistics(client) -> None:
    config = client.get_model_config("digits")
    assert config["max_batch_size"] > 0
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [1, 8, 8]}]
    assert config["runtime"]["providers"] == ["CPUExecutionProvider"]
    assert "CPUExecutionProvider" in config["runtime"]["provider_options"]
    fixed = client.get_model_config("fixed", "1")
    assert fixed["max_batch_size"] == 0 and fixed["input"][0]["dims"] == [2, 3]
    before = client.get_inference_statistics("affine")["model_stats"][0]
    x = np.zeros((6, 4), np.float32)
    tensor = triton.InferInput("x", [6, 4], "FP32")
    tensor.set_data_from_numpy(x)
    client.infer("affine", [tensor])
    after = client.get_inference_statistics("affine", "1")["model_stats"][0]
    assert after["inference_count"] == before["inference_count"] + 6
    assert after["execution_count"] == before["execution_count"] + 1
    assert (
        after["inference_stats"]["success"]["count"]
        == before["inference_stats"]["success"]["count"] + 1
    )
    everything = client.get_inference_statistics()["model_stats"]
    assert {s["name"] for s in everything} >= {"digits", "affine", "typed"}


def test_repository_index_reports_failures(client) -> None:
    index = {(m["name"], m.get("version")): m for m in client.get_model_repository_index()}
    assert index[("digits", "1")]["state"] == "READY"
    assert index[("bn_train", "1")]["state"] == "UNAVAILABLE"  # not in the start-up list
    with pytest.raises(InferenceServerException, match="training mode") as err:
        client.load_model("bn_train")
    assert err.value.status() == "400"
    index = {(m["name"], m.get("version")): m for m in client.get_model_repository_index()}
    assert "training mode" in index[("bn_train", "1")]["reason"]
    with pytest.raises(InferenceServerException, match="not a valid ONNX file"):
        client.load_model("corrupt")
    assert client.is_server_ready()  # neither was required at start-up


def test_load_and_unload(server: LiveServer, repo: Path) -> None:
    with triton.InferenceServerClient(server.address) as c:
        c.load_model("bn_eval")
        assert c.is_model_ready("bn_eval")
        c.unload_model("bn_eval")
        assert not c.is_model_ready("bn_eval")
        tensor = triton.InferInput("x", [1, 3], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 3), np.float32))
        with pytest.raises(InferenceServerException) as err:
            c.infer("bn_eval", [tensor])
        assert err.value.status() == "503"
        assert not c.is_server_ready()  # bn_eval was required at start-up
        c.load_model("bn_eval")
        assert c.is_server_ready()
        x = RNG.normal(size=(2, 3)).astype(np.float32)
        tensor.set_shape([2, 3])
        tensor.set_data_from_numpy(x)
        got = c.infer("bn_eval", [tensor]).as_numpy("y")
        assert_close(got, direct(repo / "bn_eval" / "1" / "model.onnx", {"x": x})["y"])


def test_load_with_config_parameter_selects_versions(server: LiveServer) -> None:
    with triton.InferenceServerClient(server.address) as c:
        with pytest.raises(InferenceServerException, match="invalid configuration"):
            c.load_model("affine", config='{"version_policy": {"latest": {"num_versions": 0}}}')
        c.load_model("affine", config='{"version_policy": {"all": {}}, "max_batch_size": 8}')
        assert c.get_model_config("affine")["max_batch_size"] == 8
        assert c.is_model_ready("affine")
