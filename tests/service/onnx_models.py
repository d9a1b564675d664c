"""Tiny ONNX models built with onnx.helper, and repositories of them in temporary folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from foldserve.model_metadata import InputSpec, ModelMetadata, OutputSpec
from tests.conftest import REPO_ROOT

DIGITS = REPO_ROOT / "models" / "digits" / "1" / "model.onnx"
OPSET = 17
IR_VERSION = 8  # what onnxruntime 1.31 reads at least

# v2 datatype → ONNX element type, for every numeric type the service serves
TYPED = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
}


def _model(graph: onnx.GraphProto, props: dict[str, str] | None = None) -> bytes:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )
    if props:
        helper.set_model_props(model, props)
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def typed_model() -> bytes:
    """One input per datatype, [batch, 3]; each output is its input through Identity."""
    inputs, outputs, nodes = [], [], []
    for name, elem in TYPED.items():
        low = name.lower()
        inputs.append(helper.make_tensor_value_info(f"in_{low}", elem, ["batch", 3]))
        outputs.append(helper.make_tensor_value_info(f"out_{low}", elem, ["batch", 3]))
        nodes.append(helper.make_node("Identity", [f"in_{low}"], [f"out_{low}"]))
    return _model(helper.make_graph(nodes, "typed", inputs, outputs))


def affine_model(scale: float = 2.0, labels: int = 4) -> bytes:
    """y = scale * x + 1 on [batch, 4] FP32, with foldserve metadata (NC layout, labels)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    inits = [
        numpy_helper.from_array(np.full(4, scale, np.float32), "scale"),
        numpy_helper.from_array(np.ones(4, np.float32), "one"),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["t"]),
        helper.make_node("Add", ["t", "one"], ["y"]),
    ]
    meta = ModelMetadata(
        labels=tuple(f"class{i}" for i in range(labels)),
        input=InputSpec("x", "NC", (4,), (0.0,), (1.0,), (0.0, 1.0)),
        output=OutputSpec("y"),
    )
    return _model(helper.make_graph(nodes, "affine", [x], [y], inits), meta.to_props())


def fixed_batch_model() -> bytes:
    """Relu on a fixed [2, 3] FP32 input: no batch dimension."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    return _model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "fixed", [x], [y]))


def batchnorm_model(training: bool) -> bytes:
    """BatchNormalization over [batch, 3]; in training mode it also emits running stats."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    names = ("s", "b", "m", "v")
    inits = [numpy_helper.from_array(np.ones(3, np.float32), n) for n in names]
    outs, extra = ["y"], []
    if training:
        outs += ["rm", "rv"]
        extra = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3]) for n in ("rm", "rv")]
    node = helper.make_node(
        "BatchNormalization", ["x", *names], outs, name="bn1", training_mode=int(training)
    )
    return _model(helper.make_graph([node], "bn", [x], [y, *extra], inits))


def publish(root: Path, name: str, version: int, data: bytes | Path) -> Path:
    folder = root / name / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "model.onnx"
    if isinstance(data, Path):
        shutil.copyfile(data, target)
    else:
        target.write_bytes(data)
    return target
