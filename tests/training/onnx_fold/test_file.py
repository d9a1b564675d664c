"""fold_onnx_file: the input is only read, external data stays in its folder, output is all or
nothing, and every failure is a typed error with a message a person can act on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from training.errors import OnnxFoldError, OnnxVerificationError
from training.onnx_fold import file as onnx_fold_file
from training.onnx_fold import fold_onnx, fold_onnx_file, verify_onnx_fold

F32 = TensorProto.FLOAT


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def conv_bn(channels: int = 8, seed: int = 0) -> onnx.ModelProto:
    """Conv → BN with weights large enough (> 1 KiB) to go to external data."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (channels, 4, 3, 3)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.uniform(0.5, 2, channels).astype(np.float32), "s"),
        numpy_helper.from_array(rng.normal(0, 1, channels).astype(np.float32), "b"),
        numpy_helper.from_array(rng.normal(0, 1, channels).astype(np.float32), "m"),
        numpy_helper.from_array(rng.uniform(0.5, 2, channels).astype(np.float32), "v"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", F32, ["batch", 4, 6, 6])],
        [helper.make_tensor_value_info("y", F32, ["batch", channels, 6, 6])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_folds_a_real_file_and_leaves_the_input_alone(tmp_path, onnx_cases):
    source = onnx_cases / "trt-polygraphy-residual-block" / "model.onnx"
    before = digest(source)
    report = fold_onnx_file(source, tmp_path / "out" / "folded.onnx")
    assert digest(source) == before
    folded = onnx.load(tmp_path / "out" / "folded.onnx")
    assert sum(n.op_type == "BatchNormalization" for n in folded.graph.node) == 0
    assert report.verification is not None
    assert report.verification.passed
    assert report.checker.startswith("passed")
    assert json.loads(json.dumps(report.to_dict()))["bn_after"] == 0
    assert verify_onnx_fold(onnx.load(source), folded).passed
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["folded.onnx"]  # no temp files


def test_nothing_foldable_is_written_unchanged_and_says_why(tmp_path, onnx_cases):
    source = onnx_cases / "pinto-batchnorm1d-training-mode" / "model.onnx"
    report = fold_onnx_file(source, tmp_path / "same.onnx")
    assert not report.changed
    assert "nothing folded" in str(report)
    assert onnx.load(tmp_path / "same.onnx") == onnx.load(source)


def test_external_data_is_read_and_written_beside_the_model(tmp_path):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    onnx.save_model(
        conv_bn(),
        src_dir / "m.onnx",
        save_as_external_data=True,
        location="m.weights",
        size_threshold=0,
    )
    hashes = {p.name: digest(p) for p in src_dir.iterdir()}
    out = tmp_path / "dst" / "folded.onnx"
    report = fold_onnx_file(src_dir / "m.onnx", out)
    assert {p.name: digest(p) for p in src_dir.iterdir()} == hashes
    assert report.folded
    assert sorted(p.name for p in out.parent.iterdir()) == ["folded.onnx", "folded.onnx.data"]
    reloaded = onnx.load(out)  # loads its external data from its own folder
    weight = next(t for t in reloaded.graph.initializer if t.name.startswith("W"))
    assert numpy_helper.to_array(weight).shape == (8, 4, 3, 3)
    raw = onnx.load(out, load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in raw.graph.initializer)
    assert verify_onnx_fold(conv_bn(), reloaded).passed


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    model = conv_bn()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(bytes(8 * 4 * 9 * 4))
    weight = model.graph.initializer[0]
    weight.ClearField("raw_data")
    del weight.float_data[:]
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", "1152")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    (tmp_path / "models").mkdir()
    onnx.save_model(model, tmp_path / "models" / "m.onnx")
    with pytest.raises(OnnxFoldError, match="outside the model's folder"):
        fold_onnx_file(tmp_path / "models" / "m.onnx", tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_output_over_the_input_is_refused(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(conv_bn(), path)
    before = digest(path)
    with pytest.raises(OnnxFoldError, match="overwrite the input"):
        fold_onnx_file(path, tmp_path / "." / "m.onnx")
    assert digest(path) == before


def test_unreadable_input_is_a_clear_error(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"\x00not a model\xff" * 10)
    with pytest.raises(OnnxFoldError, match="not a readable ONNX model"):
        fold_onnx_file(tmp_path / "junk.onnx", tmp_path / "out.onnx")
    with pytest.raises(OnnxFoldError, match="no such file"):
        fold_onnx_file(tmp_path / "missing.onnx", tmp_path / "out.onnx")


def test_verification_failure_writes_nothing_and_carries_the_figures(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    onnx.save_model(conv_bn(), path)

    def wrong_fold(model, **_):
        folded, report = fold_onnx(model)
        weight = folded.graph.initializer[-2]  # the folded conv weight
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.01, weight.name))
        return folded, report

    monkeypatch.setattr(onnx_fold_file, "fold_onnx", wrong_fold)
    with pytest.raises(OnnxVerificationError, match="differs from the original") as caught:
        fold_onnx_file(path, tmp_path / "out.onnx")
    assert caught.value.result is not None
    assert caught.value.result.max_abs_diff > 1e-3
    assert not (tmp_path / "out.onnx").exists()


def test_user_inputs_from_npz_are_used_and_checked(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(conv_bn(), path)
    good = tmp_path / "inputs.npz"
    np.savez(good, x=np.random.default_rng(1).normal(size=(3, 4, 6, 6)))  # float64: cast
    report = fold_onnx_file(path, tmp_path / "out.onnx", inputs_npz=good)
    assert report.verification.probe == str(good)
    assert report.verification.probe_shapes == {"x": [3, 4, 6, 6]}
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, image=np.zeros((1, 4, 6, 6), np.float32))
    with pytest.raises(OnnxVerificationError, match=r"missing \['x'\], unknown \['image'\]"):
        fold_onnx_file(path, tmp_path / "out2.onnx", inputs_npz=wrong)
    assert not (tmp_path / "out2.onnx").exists()


def test_no_verify_skips_onnx_runtime(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(conv_bn(), path)
    report = fold_onnx_file(path, tmp_path / "out.onnx", verify=False)
    assert report.verification is None
    assert "verification" not in str(report)


def test_checker_failure_introduced_by_the_fold_is_an_error(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    onnx.save_model(conv_bn(), path)

    def broken_fold(model, **_):
        folded, report = fold_onnx(model)
        folded.graph.node[0].input[1] = "no_such_tensor"
        return folded, report

    monkeypatch.setattr(onnx_fold_file, "fold_onnx", broken_fold)
    with pytest.raises(OnnxFoldError, match=r"fails onnx.checker \(full check\)"):
        fold_onnx_file(path, tmp_path / "out.onnx")


def test_inputs_the_model_rejects_give_an_actionable_error():
    data = numpy_helper.from_array(np.arange(3, dtype=np.float32), "data")
    gather = helper.make_node("Gather", ["data", "index"], ["y"])
    graph = helper.make_graph(
        [gather],
        "g",
        [helper.make_tensor_value_info("index", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", F32, [2])],
        [data],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    bad = {"index": np.array([0, 9], np.int64)}  # out of range for a 3-element table
    with pytest.raises(OnnxVerificationError, match=r"cannot run the original model.*--inputs"):
        verify_onnx_fold(model, model, bad)
