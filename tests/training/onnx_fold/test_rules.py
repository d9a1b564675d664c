"""fold_onnx on graphs built here with onnx.helper: every rule, every skip, and properties.

Each folded model is checked against its original in ONNX Runtime with optimisations off,
outputs and every shared intermediate tensor, and the BNs left are counted by hand from the
graph each test builds (never from the folder's own verdicts).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from training.errors import OnnxFoldError
from training.onnx_fold import OnnxFoldReport, fold_onnx, verify_onnx_fold
from training.onnx_fold import algebra as fm
from training.onnx_fold.verify import compare

F32 = TensorProto.FLOAT


# --------------------------------------------------------------------------- graph builders


def tensor(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def bn_params(
    rng: np.random.Generator, channels: int, prefix: str = "bn", dtype: type = np.float32
) -> list[TensorProto]:
    """Random per-channel statistics and affine, signs included: never the identity."""
    scale = rng.uniform(0.5, 2.0, channels) * rng.choice([-1.0, 1.0], channels)
    values = {
        "scale": scale,
        "bias": rng.normal(0.0, 1.0, channels),
        "mean": rng.normal(0.0, 1.0, channels),
        "var": rng.uniform(0.5, 2.0, channels),
    }
    return [tensor(f"{prefix}_{k}", v.astype(dtype)) for k, v in values.items()]


def bn_node(x: str, y: str, prefix: str = "bn", **attrs: object) -> onnx.NodeProto:
    inputs = [x, *(f"{prefix}_{k}" for k in ("scale", "bias", "mean", "var"))]
    return helper.make_node("BatchNormalization", inputs, [y], name=prefix, **attrs)


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: list[tuple[str, int, list]],
    outputs: list[str],
    initializers: list[TensorProto],
    *,
    opset: int = 17,
    ir: int = 8,
    elem: int = F32,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, elem, None) for n in outputs],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    return model


def ops(model: onnx.ModelProto, op_type: str = "BatchNormalization") -> int:
    return sum(node.op_type == op_type for node in model.graph.node)


def fold_and_verify(
    model: onnx.ModelProto, bn_left: int, **fold_options: object
) -> tuple[onnx.ModelProto, OnnxFoldReport]:
    """Fold, then require: the pinned BN count, untouched input, same interface, same values."""
    before = model.SerializeToString()
    folded, report = fold_onnx(model, **fold_options)
    assert model.SerializeToString() == before, "fold_onnx modified its input"
    assert ops(folded) == bn_left, str(report)
    assert report.bn_after == bn_left
    assert len(report.folded) + len(report.skipped) == report.bn_before
    assert [(i.name, i.type) for i in folded.graph.input if not is_init(folded, i.name)] == [
        (i.name, i.type) for i in model.graph.input if not is_init(model, i.name)
    ]
    assert [(o.name, o.type) for o in folded.graph.output] == [
        (o.name, o.type) for o in model.graph.output
    ]
    result = verify_onnx_fold(model, folded, intermediates=True)
    assert result.passed, result.summary()
    return folded, report


def is_init(model: onnx.ModelProto, name: str) -> bool:
    return any(t.name == name for t in model.graph.initializer)


def conv_bn_model(
    rng: np.random.Generator,
    *,
    c_in: int = 4,
    c_out: int = 6,
    group: int = 1,
    bias: bool = True,
    opset: int = 17,
    dtype: type = np.float32,
) -> onnx.ModelProto:
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [tensor("W", rng.normal(0, 0.5, (c_out, c_in // group, 3, 3)).astype(dtype))]
    conv_inputs = ["x", "W"]
    if bias:
        inits.append(tensor("B", rng.normal(0, 1, c_out).astype(dtype)))
        conv_inputs.append("B")
    nodes = [
        helper.make_node("Conv", conv_inputs, ["c"], name="conv", pads=[1, 1, 1, 1], group=group),
        bn_node("c", "y"),
    ]
    inits += bn_params(rng, c_out, dtype=dtype)
    return make_model(nodes, [("x", elem, ["N", c_in, 5, 5])], ["y"], inits, opset=opset, elem=elem)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# --------------------------------------------------------------------------- BN after an op


@pytest.mark.parametrize("opset", [7, 9, 14, 15, 17])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_then_bn_folds_for_every_bn_opset(rng, opset, bias):
    folded, report = fold_and_verify(conv_bn_model(rng, opset=opset, bias=bias), bn_left=0)
    assert [(f.layers, f.direction) for f in report.folded] == [(("conv",), "bn-after")]
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert folded.graph.node[0].output == ["y"]  # the BN's output name lives on


@pytest.mark.parametrize("group", [1, 2, 4])
def test_grouped_and_depthwise_conv_then_bn_folds(rng, group):
    fold_and_verify(conv_bn_model(rng, c_in=4, c_out=4, group=group), bn_left=0)


@pytest.mark.parametrize(
    ("c_in", "c_out", "group"),
    [(3, 5, 1), (4, 6, 2), (6, 6, 6), (4, 8, 4)],
    ids=["plain", "groups2", "depthwise", "depthwise-multiplier2"],
)
@pytest.mark.parametrize("bias", [True, False])
def test_conv_transpose_then_bn_folds(rng, c_in, c_out, group, bias):
    weight = rng.normal(0, 0.5, (c_in, c_out // group, 3, 3)).astype(np.float32)
    inits = [tensor("W", weight), *bn_params(rng, c_out)]
    inputs = ["x", "W"]
    if bias:
        inits.append(tensor("B", rng.normal(0, 1, c_out).astype(np.float32)))
        inputs.append("B")
    nodes = [
        helper.make_node(
            "ConvTranspose",
            inputs,
            ["t"],
            name="deconv",
            group=group,
            strides=[2, 2],
            pads=[1, 1, 1, 1],
            output_padding=[1, 1],
        ),
        bn_node("t", "y"),
    ]
    model = make_model(nodes, [("x", F32, ["N", c_in, 4, 4])], ["y"], inits)
    _, report = fold_and_verify(model, bn_left=0)
    assert report.folded[0].layer_types == ("ConvTranspose",)


GEMM_FLAGS = [
    {"transA": 0, "transB": 0},
    {"transA": 1, "transB": 0},
    {"transA": 0, "transB": 1},
    {"transA": 1, "transB": 1, "alpha": 0.7, "beta": -1.3},
    {"transB": 1, "alpha": 2.5},
    {"beta": 0.0},
]


def gemm_model(
    rng: np.random.Generator,
    flags: dict,
    c_shape: tuple | None,
    *,
    bn_before: bool = False,
    dtype: type = np.float32,
) -> onnx.ModelProto:
    m, k, n = 3, 5, 4
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    trans_a, trans_b = flags.get("transA", 0), flags.get("transB", 0)
    a_shape = [k, m] if trans_a else [m, k]
    b = rng.normal(0, 0.5, (n, k) if trans_b else (k, n)).astype(dtype)
    inits = [tensor("B", b)]
    gemm_inputs = ["a", "B"]
    if c_shape is not None:
        inits.append(tensor("C", rng.normal(0, 1, c_shape).astype(dtype)))
        gemm_inputs.append("C")
    if bn_before:  # BN on the Gemm's A, whose channel axis is K (or M with transA)
        inits += bn_params(rng, a_shape[1], dtype=dtype)
        nodes = [bn_node("x", "a"), helper.make_node("Gemm", gemm_inputs, ["y"], "gemm", **flags)]
    else:
        inits += bn_params(rng, n, dtype=dtype)
        gemm = helper.make_node("Gemm", ["x", *gemm_inputs[1:]], ["g"], "gemm", **flags)
        nodes = [gemm, bn_node("g", "y")]
    return make_model(nodes, [("x", elem, a_shape)], ["y"], inits, opset=13, elem=elem)


@pytest.mark.parametrize("flags", GEMM_FLAGS, ids=str)
@pytest.mark.parametrize("c_shape", [None, (4,), (1, 4), (3, 4), ()], ids=str)
def test_gemm_then_bn_folds_with_any_flags(rng, flags, c_shape):
    folded, _ = fold_and_verify(gemm_model(rng, flags, c_shape), bn_left=0)
    gemm = folded.graph.node[0]
    assert {a.name: helper.get_attribute_value(a) for a in gemm.attribute}.get("beta") == 1.0


@pytest.mark.parametrize("flags", GEMM_FLAGS, ids=str)
@pytest.mark.parametrize("c_shape", [None, (4,), (3, 4)], ids=str)
def test_bn_then_gemm_folds_unless_trans_a(rng, flags, c_shape):
    model = gemm_model(rng, flags, c_shape, bn_before=True)
    # transA=1: A is (K, M), so the BN's channel axis is M, a row of the product: no weight
    # of B can scale rows, and the BN must stay.
    left = 1 if flags.get("transA") else 0
    _, report = fold_and_verify(model, bn_left=left)
    if left:
        assert "transA=1" in report.skipped[0].reason
    else:
        assert report.folded[0].direction == "bn-before"


def matmul_model(
    rng: np.random.Generator, *, add: str | None, x_shape: list, bias_shape: tuple = (4,)
) -> onnx.ModelProto:
    inits = [tensor("W", rng.normal(0, 0.5, (x_shape[-1], 4)).astype(np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="matmul")]
    bn_input = "mm"
    if add is not None:
        inits.append(tensor("b", rng.normal(0, 1, bias_shape).astype(np.float32)))
        operands = ["mm", "b"] if add == "bias-second" else ["b", "mm"]
        nodes.append(helper.make_node("Add", operands, ["mm_b"], name="add"))
        bn_input = "mm_b"
    nodes.append(bn_node(bn_input, "y"))
    inits += bn_params(rng, 4 if len(x_shape) == 2 else x_shape[1])
    return make_model(nodes, [("x", F32, x_shape)], ["y"], inits, opset=15)


@pytest.mark.parametrize("add", [None, "bias-second", "bias-first"])
def test_rank2_matmul_then_bn_folds_with_or_without_add(rng, add):
    folded, report = fold_and_verify(matmul_model(rng, add=add, x_shape=["N", 6]), bn_left=0)
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add"]
    assert report.folded[0].layer_types == ("MatMul",)


def test_matmul_add_with_full_row_bias_folds(rng):
    fold_and_verify(
        matmul_model(rng, add="bias-second", x_shape=[3, 6], bias_shape=(1, 4)), bn_left=0
    )


def test_rank3_matmul_then_bn_is_kept(rng):
    # x (N, 4, 6) @ W (6, 4) is (N, 4, 4): the BN normalises axis 1, W's columns are axis 2.
    _, report = fold_and_verify(matmul_model(rng, add=None, x_shape=["N", 4, 6]), bn_left=1)
    assert "rank 3" in report.skipped[0].reason


# --------------------------------------------------------------------------- BN before an op


def bn_conv_model(
    rng: np.random.Generator,
    *,
    group: int = 1,
    pad: dict | None = None,
    kernel: int = 3,
    edge_pad: str | None = None,
    c: int = 4,
    pads: tuple = (0, 0, 1, 2, 0, 0, 2, 1),
    opset: int = 17,
) -> onnx.ModelProto:
    inits = [
        tensor("W", rng.normal(0, 0.5, (8, c // group, kernel, kernel)).astype(np.float32)),
        tensor("B", rng.normal(0, 1, 8).astype(np.float32)),
        *bn_params(rng, c),
    ]
    nodes = [bn_node("x", "n")]
    conv_in = "n"
    if edge_pad is not None and opset < 11:  # Pad-2: pads is an attribute
        nodes.append(helper.make_node("Pad", ["n"], ["p"], mode=edge_pad, pads=list(pads)))
        conv_in = "p"
    elif edge_pad is not None:
        inits.append(tensor("pads", np.array(pads, np.int64)))
        nodes.append(helper.make_node("Pad", ["n", "pads"], ["p"], name="pad", mode=edge_pad))
        conv_in = "p"
    conv = helper.make_node(
        "Conv", [conv_in, "W", "B"], ["y"], name="conv", group=group, **(pad or {})
    )
    nodes.append(conv)
    return make_model(nodes, [("x", F32, ["N", c, 6, 6])], ["y"], inits, opset=opset)


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize(
    "pad",
    [{}, {"pads": [0, 0, 0, 0]}, {"auto_pad": "VALID"}, {"strides": [2, 2], "dilations": [2, 1]}],
    ids=["default", "zero-pads", "valid", "strided-dilated"],
)
def test_bn_then_unpadded_conv_folds(rng, group, pad):
    _, report = fold_and_verify(bn_conv_model(rng, group=group, pad=pad), bn_left=0)
    assert (report.folded[0].layers, report.folded[0].direction) == (("conv",), "bn-before")


def test_bn_then_same_padded_1x1_conv_folds(rng):
    # SAME padding with a 1×1 kernel pads nothing, at any stride.
    pad = {"auto_pad": "SAME_UPPER", "strides": [2, 2]}
    fold_and_verify(bn_conv_model(rng, pad=pad, kernel=1), bn_left=0)


@pytest.mark.parametrize(
    "pad", [{"pads": [1, 1, 1, 1]}, {"pads": [0, 1, 0, 0]}, {"auto_pad": "SAME_LOWER"}], ids=str
)
def test_bn_then_zero_padded_conv_is_kept(rng, pad):
    _, report = fold_and_verify(bn_conv_model(rng, pad=pad), bn_left=1)
    assert "zero padding" in report.skipped[0].reason


@pytest.mark.parametrize("mode", ["edge", "reflect"])
@pytest.mark.parametrize("opset", [9, 17])
def test_bn_then_copying_pad_then_conv_folds(rng, mode, opset):
    folded, report = fold_and_verify(bn_conv_model(rng, edge_pad=mode, opset=opset), bn_left=0)
    assert report.folded[0].via == f"Pad(mode={mode})"
    assert [n.op_type for n in folded.graph.node] == ["Pad", "Conv"]


def test_bn_then_pad_of_the_channel_axis_is_kept(rng):
    # Edge-padding channels would add channels carrying another channel's BN: no 1:1 fold.
    model = bn_conv_model(rng, edge_pad="edge", c=3, pads=(0, 1, 0, 0, 0, 0, 0, 0))
    weight = next(t for t in model.graph.initializer if t.name == "W")
    weight.CopyFrom(tensor("W", rng.normal(0, 0.5, (8, 4, 3, 3)).astype(np.float32)))
    _, report = fold_and_verify(model, bn_left=1)
    assert "pads the channel axis" in report.skipped[0].reason


def test_bn_then_constant_pad_is_kept(rng):
    # Constant padding inserts zeros where the unfolded model had BN-shifted values.
    _, report = fold_and_verify(bn_conv_model(rng, edge_pad="constant"), bn_left=1)
    assert "constant mode" in report.skipped[0].reason


def test_mean_subtraction_bn_before_conv_is_kept_for_precision(rng):
    """BN that subtracts a large mean (pixel preprocessing): folding would make the conv read
    inputs ~100x larger and cancel a big bias afterwards, costing ~7 bits of float32."""
    model = bn_conv_model(rng, pad={"auto_pad": "VALID"})
    params = {t.name: t for t in model.graph.initializer}
    params["bn_mean"].CopyFrom(tensor("bn_mean", np.full(4, 117.0, np.float32)))
    params["bn_var"].CopyFrom(tensor("bn_var", np.ones(4, np.float32)))
    _, report = fold_and_verify(model, bn_left=1)
    assert "mean subtraction" in report.skipped[0].reason
    fold_and_verify(model, bn_left=0, max_input_growth=1e9)  # allowed if asked for


def test_fold_into_consumers_can_be_switched_off(rng):
    _, report = fold_and_verify(bn_conv_model(rng), bn_left=1, fold_into_consumers=False)
    assert "switched off" in report.skipped[0].reason


# --------------------------------------------------------------------------- training mode


def test_bn9_with_statistics_outputs_is_training_mode_and_kept(rng):
    # ONNX Runtime runs BatchNormalization-9 with its optional outputs on batch statistics.
    model = conv_bn_model(rng, opset=9)
    bn = model.graph.node[1]
    bn.output.extend(["running_mean", "running_var", "saved_mean", "saved_var"])
    folded, report = fold_and_verify(model, bn_left=1)
    assert folded.graph.node[1] == bn
    assert "training mode" in report.skipped[0].reason


def test_bn15_training_mode_is_kept(rng):
    model = conv_bn_model(rng, opset=15)
    bn = model.graph.node[1]
    bn.output.extend(["running_mean", "running_var"])
    bn.attribute.append(helper.make_attribute("training_mode", 1))
    folded, report = fold_and_verify(model, bn_left=1)
    assert folded.graph.node[1] == bn
    assert "training" in report.skipped[0].reason


# --------------------------------------------------------------------------- BN-7 spatial=0


def spatial0_model(rng: np.random.Generator, stats_shape: tuple, uniform: bool) -> onnx.ModelProto:
    c = stats_shape[0]
    inits = [tensor("W", rng.normal(0, 0.5, (c, 2, 3, 3)).astype(np.float32))]
    for key in ("scale", "bias", "mean", "var"):
        low = 0.5 if key in ("scale", "var") else -1.0
        per_channel = rng.uniform(low, 2.0, (c,) + (1,) * (len(stats_shape) - 1))
        values = np.broadcast_to(per_channel, stats_shape).copy()
        if not uniform:
            values = rng.uniform(low, 2.0, stats_shape)
        inits.append(tensor(f"bn_{key}", values.astype(np.float32)))
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        bn_node("c", "y", spatial=0),
    ]
    return make_model(nodes, [("x", F32, [2, 2, 5, 5])], ["y"], inits, opset=7, ir=3)


def test_spatial0_with_same_statistics_at_every_position_folds(rng):
    fold_and_verify(spatial0_model(rng, (3, 3, 3), uniform=True), bn_left=0)


def test_spatial0_with_per_position_statistics_is_kept(rng):
    _, report = fold_and_verify(spatial0_model(rng, (3, 3, 3), uniform=False), bn_left=1)
    assert "spatial=0" in report.skipped[0].reason


def test_spatial0_after_gemm_has_per_channel_statistics_and_folds(rng):
    model = gemm_model(rng, {"transB": 1}, (4,))
    model.opset_import[0].version = 7
    model.graph.node[1].attribute.append(helper.make_attribute("spatial", 0))
    fold_and_verify(model, bn_left=0)


# --------------------------------------------------------------------------- constants


def test_parameters_in_constant_nodes_and_constant_subgraphs_fold(rng):
    model = conv_bn_model(rng)
    inits = {t.name: t for t in model.graph.initializer}
    scale, mean, weight = inits.pop("bn_scale"), inits.pop("bn_mean"), inits.pop("W")
    half = numpy_helper.to_array(weight) / 2
    del model.graph.initializer[:]
    model.graph.initializer.extend([*inits.values(), tensor("W_half", half)])
    constant_nodes = [
        helper.make_node("Constant", [], ["bn_scale"], value=scale),
        helper.make_node("Constant", [], ["mean_src"], value=mean),
        helper.make_node("Identity", ["mean_src"], ["bn_mean"]),
        helper.make_node("Add", ["W_half", "W_half"], ["W"]),  # a computed conv weight
    ]
    nodes = [*constant_nodes, *model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    folded, _ = fold_and_verify(model, bn_left=0)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]  # the constant nodes are swept
    assert {t.name for t in folded.graph.initializer} == {"W_bnfold", "B_bnfold"}


def test_dequantized_weight_is_left_quantised(rng):
    model = conv_bn_model(rng)
    weight = next(t for t in model.graph.initializer if t.name == "W")
    values = numpy_helper.to_array(weight)
    weight.CopyFrom(tensor("W_q", np.round(values / 0.01).astype(np.int8)))
    model.graph.initializer.append(tensor("W_scale", np.array(0.01, np.float32)))
    dequantize = helper.make_node("DequantizeLinear", ["W_q", "W_scale"], ["W"])
    model.graph.node.insert(0, dequantize)
    _, report = fold_and_verify(model, bn_left=1)
    assert "dequantized" in report.skipped[0].reason


def test_bn_before_opset_7_is_left_alone(rng):
    model = conv_bn_model(rng, opset=6)
    folded, report = fold_onnx(model)  # ONNX Runtime cannot run BatchNormalization-6
    assert ops(folded) == 1
    assert "opset < 7" in report.skipped[0].reason


def test_parameter_from_a_graph_input_is_kept(rng):
    model = conv_bn_model(rng)
    model.graph.input.append(helper.make_tensor_value_info("var_in", F32, [6]))
    model.graph.node[1].input[4] = "var_in"
    _, report = fold_and_verify(model, bn_left=1)
    assert "'var_in' is a graph input" in report.skipped[0].reason


def test_initializer_listed_as_input_is_overridable_from_ir4(rng):
    model = conv_bn_model(rng)  # IR 8
    model.graph.input.append(helper.make_tensor_value_info("bn_mean", F32, [6]))
    _, report = fold_and_verify(model, bn_left=1)
    assert "override" in report.skipped[0].reason


def test_ir3_initializers_listed_as_inputs_are_constants(rng):
    model = conv_bn_model(rng, opset=7)
    model.ir_version = 3
    for t in model.graph.initializer:  # IR < 4 requires every initializer to be an input
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, t.dims))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", F32, ["N", 6, 5, 5]))
    folded, report = fold_and_verify(model, bn_left=0)
    assert folded.graph.input[0].name == "x"
    inputs = {i.name for i in folded.graph.input[1:]}
    assert inputs == {t.name for t in folded.graph.initializer} == {"W_bnfold", "B_bnfold"}
    onnx.checker.check_model(folded, full_check=True)
    assert any("IR 3" in note for note in report.notes)


def test_shared_weight_is_cloned_not_changed_in_place(rng):
    w = tensor("W", rng.normal(0, 0.5, (4, 4, 1, 1)).astype(np.float32))
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c1"], name="conv1"),
        bn_node("c1", "y1", prefix="bn1"),
        helper.make_node("Conv", ["x", "W"], ["c2"], name="conv2"),
        bn_node("c2", "y2", prefix="bn2"),
        helper.make_node("Conv", ["x", "W"], ["y3"], name="conv3"),  # no BN: keeps W as is
    ]
    inits = [w, *bn_params(rng, 4, "bn1"), *bn_params(rng, 4, "bn2")]
    model = make_model(nodes, [("x", F32, [1, 4, 3, 3])], ["y1", "y2", "y3"], inits)
    folded, _ = fold_and_verify(model, bn_left=0)
    weights = {t.name: t for t in folded.graph.initializer}
    assert weights["W"] == w
    assert [n.input[1] for n in folded.graph.node] == ["W_bnfold", "W_bnfold_2", "W"]


@pytest.mark.parametrize("where", ["other-consumer", "graph-output"])
def test_producer_output_read_elsewhere_is_kept(rng, where):
    model = conv_bn_model(rng)
    if where == "other-consumer":
        model.graph.node.append(helper.make_node("Relu", ["c"], ["r"], name="relu"))
        model.graph.output.append(helper.make_tensor_value_info("r", F32, None))
    else:
        model.graph.output.append(helper.make_tensor_value_info("c", F32, None))
    _, report = fold_and_verify(model, bn_left=1)
    assert "also feeds" in report.skipped[0].reason


def test_output_read_inside_a_subgraph_counts_as_a_reader(rng):
    model = conv_bn_model(rng)
    then = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["t_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("t_out", F32, None)],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["y"], ["e_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", F32, None)],
    )
    model.graph.initializer.append(tensor("cond", np.array(True)))
    model.graph.node.append(
        helper.make_node("If", ["cond"], ["z"], name="if", then_branch=then, else_branch=other)
    )
    model.graph.output.append(helper.make_tensor_value_info("z", F32, None))
    _, report = fold_and_verify(model, bn_left=1)
    assert "also feeds" in report.skipped[0].reason


def test_bn_inside_a_subgraph_is_reported_and_left(rng):
    inner = helper.make_graph(
        [bn_node("x", "b_out")], "then", [], [helper.make_tensor_value_info("b_out", F32, None)]
    )
    plain = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", F32, None)],
    )
    inits = [tensor("cond", np.array(True)), *bn_params(rng, 3)]
    node = helper.make_node("If", ["cond"], ["y"], then_branch=inner, else_branch=plain)
    model = make_model([node], [("x", F32, [2, 3, 4])], ["y"], inits)
    folded, report = fold_onnx(model)
    assert report.bn_before == report.bn_after == 1
    assert "sub-graph" in report.skipped[0].reason
    assert verify_onnx_fold(model, folded).passed


# --------------------------------------------------------------------------- chains, dtypes


def test_chains_fold_all_the_way(rng):
    w = tensor("W", rng.normal(0, 0.5, (4, 4, 1, 1)).astype(np.float32))
    w2 = tensor("W2", rng.normal(0, 0.5, (4, 4, 1, 1)).astype(np.float32))
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        bn_node("c", "b1", prefix="bn1"),
        bn_node("b1", "b2", prefix="bn2"),  # Conv → BN → BN
        helper.make_node("Relu", ["b2"], ["r"]),
        bn_node("r", "b3", prefix="bn3"),
        bn_node("b3", "b4", prefix="bn4"),  # BN → BN → Conv
        helper.make_node("Conv", ["b4", "W2"], ["y"], name="conv2"),
    ]
    inits = [w, w2, *(p for i in range(1, 5) for p in bn_params(rng, 4, f"bn{i}"))]
    model = make_model(nodes, [("x", F32, ["N", 4, 3, 3])], ["y"], inits)
    folded, _ = fold_and_verify(model, bn_left=0)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu", "Conv"]


def test_half_model_folds_and_keeps_its_dtype(rng):
    folded, _ = fold_and_verify(conv_bn_model(rng, dtype=np.float16), bn_left=0)
    assert {numpy_helper.to_array(t).dtype for t in folded.graph.initializer} == {
        np.dtype(np.float16)
    }


@pytest.mark.parametrize("before", [False, True])
def test_double_model_folds_and_keeps_its_dtype(rng, before):
    # ONNX Runtime has no float64 Conv kernel on CPU; Gemm and BN have one.
    model = gemm_model(rng, {"transB": 1}, (4,), bn_before=before, dtype=np.float64)
    folded, _ = fold_and_verify(model, bn_left=0)
    assert {numpy_helper.to_array(t).dtype for t in folded.graph.initializer} == {
        np.dtype(np.float64)
    }


def test_fp16_overflow_is_refused(rng):
    model = conv_bn_model(rng, dtype=np.float16)
    params = {t.name: t for t in model.graph.initializer}
    params["bn_var"].CopyFrom(tensor("bn_var", np.full(6, 1e-7, np.float16)))
    params["W"].CopyFrom(tensor("W", np.full((6, 4, 3, 3), 6e4, np.float16)))
    folded, report = fold_onnx(model)
    assert ops(folded) == 1
    assert "overflow" in report.skipped[0].reason


def test_nothing_to_fold_keeps_the_model_and_says_why(rng):
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    model = make_model(nodes, [("x", F32, [1, 3])], ["y"], [])
    folded, report = fold_onnx(model)
    assert folded == model
    assert not report.changed
    assert "no BatchNormalization" in report.why_nothing_folded()
    assert "nothing to fold" in str(report)


def test_external_data_must_be_loaded_first(rng):
    model = conv_bn_model(rng)
    model.graph.initializer[0].data_location = TensorProto.EXTERNAL
    with pytest.raises(OnnxFoldError, match="external"):
        fold_onnx(model)


def test_report_is_readable_and_json_serialisable(rng):
    model = conv_bn_model(rng)
    model.graph.node.append(helper.make_node("Relu", ["y"], ["r"]))
    model.graph.node.append(bn_node("r", "z", prefix="late"))
    model.graph.output[0].name = "z"
    model.graph.initializer.extend(bn_params(rng, 6, "late"))
    folded, report = fold_onnx(model)
    report.verification = verify_onnx_fold(model, folded)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["bn_before"] == 2
    assert data["bn_after"] == 1
    assert data["folded"][0]["layers"] == ["conv"]
    assert data["verification"]["passed"] is True
    text = str(report)
    assert "folded into Conv conv (BN after it)" in text
    assert "late: kept: not after a foldable op (follows Relu)" in text
    assert "nodes 4 -> 3" in text


# --------------------------------------------------------------------------- comparison


def test_compare_handles_strings_maps_sequences_and_nan():
    assert compare("s", np.array(["a", "b"]), np.array(["a", "b"]), 1e-4, 1e-4).passed
    assert not compare("s", np.array(["a"]), np.array(["b"]), 1e-4, 1e-4).passed
    seq = [{"cat": np.float32(0.5)}, {"cat": np.float32(0.25)}]
    assert compare("m", seq, [{"cat": 0.50001}, {"cat": 0.25}], 1e-4, 1e-4).passed
    assert not compare("m", seq, [{"dog": 0.5}, {"cat": 0.25}], 1e-4, 1e-4).passed
    assert compare("n", np.array([np.nan, np.inf]), np.array([np.nan, np.inf]), 0, 0).passed
    assert not compare("n", np.array([1.0]), np.array([np.nan]), 1e-4, 1e-4).passed
    assert not compare("shape", np.zeros((2, 3)), np.zeros((3, 2)), 1e-4, 1e-4).passed
    diff = compare("x", np.array([1.0, 100.0]), np.array([1.001, 100.0]), 1e-4, 1e-4)
    assert diff.max_abs_diff == pytest.approx(1e-3)
    assert diff.ratio == pytest.approx(1e-3 / 2e-4)
    assert not diff.passed


# --------------------------------------------------------------------------- math and properties


def test_bn_affine_matches_the_onnx_reference_formula(rng):
    x = rng.normal(size=(2, 3, 4))
    scale, bias, mean, var = rng.normal(size=(4, 3))
    var = np.abs(var)
    affine = fm.bn_affine(scale, bias, mean, var, 1e-5)
    ref = (x - mean[:, None]) / np.sqrt(var[:, None] + 1e-5) * scale[:, None] + bias[:, None]
    np.testing.assert_allclose(affine.scale[:, None] * x + affine.shift[:, None], ref)


@settings(max_examples=25)
@given(
    seed=st.integers(0, 2**32 - 1),
    op=st.sampled_from(["Conv", "ConvTranspose"]),
    group=st.sampled_from([1, 2, 3]),
    per_group=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    bias=st.booleans(),
    before=st.booleans(),
)
def test_property_conv_family_folds_exactly(
    seed, op, group, per_group, kernel, stride, bias, before
):
    rng = np.random.default_rng(seed)
    c_in, c_out = group * per_group[0], group * per_group[1]
    before = before and op == "Conv"  # BN before a ConvTranspose is not foldable exactly
    w_shape = (c_out, per_group[0]) if op == "Conv" else (c_in, per_group[1])
    inits = [tensor("W", rng.normal(0, 0.5, (*w_shape, kernel, kernel)).astype(np.float32))]
    inits += bn_params(rng, c_in if before else c_out)
    inputs = ["n" if before else "x", "W"]
    if bias:
        inits.append(tensor("B", rng.normal(0, 1, c_out).astype(np.float32)))
        inputs.append("B")
    conv = helper.make_node(
        op, inputs, ["y" if before else "c"], name="conv", group=group, strides=[stride, stride]
    )
    nodes = [bn_node("x", "n"), conv] if before else [conv, bn_node("c", "y")]
    model = make_model(nodes, [("x", F32, ["N", c_in, 5, 5])], ["y"], inits)
    fold_and_verify(model, bn_left=0)


@settings(max_examples=25)
@given(
    seed=st.integers(0, 2**32 - 1),
    flags=st.fixed_dictionaries(
        {},
        optional={
            "transA": st.integers(0, 1),
            "transB": st.integers(0, 1),
            "alpha": st.floats(-3, 3).filter(lambda a: abs(a) > 0.1),
            "beta": st.floats(-3, 3),
        },
    ),
    c_shape=st.sampled_from([None, (4,), (1, 4), (3, 4), ()]),
    before=st.booleans(),
)
def test_property_gemm_folds_exactly(seed, flags, c_shape, before):
    model = gemm_model(np.random.default_rng(seed), flags, c_shape, bn_before=before)
    fold_and_verify(model, bn_left=1 if before and flags.get("transA") else 0)
