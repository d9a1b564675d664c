from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from service.errors import OnnxWireError
from service.onnx_scan import training_batchnorms
from tests.service import onnx_models as om


def test_training_mode_found_and_named() -> None:
    found = training_batchnorms(om.batchnorm_model(training=True))
    assert [f.node for f in found] == ["bn1", "bn1"]  # the attribute, and the extra outputs
    assert "training_mode=1" in {f.reason for f in found}


def test_eval_mode_and_digits_pass() -> None:
    assert training_batchnorms(om.batchnorm_model(training=False)) == []
    assert training_batchnorms(om.DIGITS.read_bytes()) == []


def test_training_bn_inside_a_subgraph_is_found() -> None:
    inner = onnx.load_from_string(om.batchnorm_model(training=True)).graph
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    node = helper.make_node("If", ["c"], ["y"], then_branch=inner, else_branch=inner)
    graph = helper.make_graph([node], "g", [cond, *inner.input], [y])
    model = helper.make_model(graph).SerializeToString()
    assert len(training_batchnorms(model)) == 4


def test_corrupt_bytes_raise() -> None:
    with pytest.raises(OnnxWireError):
        training_batchnorms(b"\x0a\xff\xff\xff\xff\x0f")


def test_third_party_files_parse(onnx_cases: Path) -> None:
    for path in sorted(onnx_cases.rglob("*.onnx"))[:10]:
        model = onnx.load(str(path), load_external_data=False)
        expected = sum(
            1
            for n in model.graph.node
            if n.op_type == "BatchNormalization"
            and any(a.name == "training_mode" and a.i for a in n.attribute)
        )
        found = [f for f in training_batchnorms(path.read_bytes()) if f.reason == "training_mode=1"]
        assert len(found) == expected, path
