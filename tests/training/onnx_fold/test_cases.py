"""fold_onnx on every real third-party model of the ONNX corpus (see its SOURCES.md).

The corpus lives outside the repository (``FOLDSERVE_ONNX_CASES``, default
``../shared/onnx-cases``; located by bench/onnx_cases.py): without it the tests that read it skip,
and CI (``FOLDSERVE_REQUIRE_ONNX_CASES=1``) fails instead. So that a clone anywhere still tests
every rule, each corpus file's rule is also built in memory; the table says where.

For each file the number of BNs that must remain is pinned here, with the reason, read off the
graph by hand (which op feeds each BN, where its parameters come from, what reads its output),
so "nothing foldable is left" is never judged by the folder's own rules. Every folded model is
run against its original in ONNX Runtime with optimisations off: outputs and every intermediate
tensor the two share must satisfy numpy.allclose (rtol = atol = 1e-4; 1e-2 for float16).

Corpus file → the rule it exercises → the in-memory test of the same rule ("here" is this
module, "rules" is test_rules.py, "file" is test_file.py):

- burn-batch-norm-1d-2d → a BN on a graph input and one after Reshape are kept; mean/var come
  through Identity of initializers → here: test_bn_on_a_graph_input_and_after_reshape_is_kept,
  test_statistics_fed_through_identity_fold
- burn-batch-norm-partial-constant → mean/var are graph inputs, kept →
  rules: test_parameter_from_a_graph_input_is_kept
- burn-mnist-gemm-bn → Gemm(transB=1) → BN folds; BN after Relu kept →
  rules: test_gemm_then_bn_folds_with_any_flags, test_report_is_readable_and_json_serialisable
- onnx-light-densenet121 → Conv parameters from constant sub-graphs fold; a BN after Concat (or
  pooling) that feeds a Mul is kept → rules:
  test_parameters_in_constant_nodes_and_constant_subgraphs_fold; here:
  test_bn_after_concat_feeding_mul_is_kept
- onnx-light-inception-v2, onnx-light-resnet50 → Conv → BN with computed parameters folds →
  rules: test_parameters_in_constant_nodes_and_constant_subgraphs_fold, test_chains_fold_all_the_way
- onnx-light-shufflenet → grouped and depthwise Conv → BN folds →
  rules: test_grouped_and_depthwise_conv_then_bn_folds
- onnx-node-batchnorm-example → runtime parameters kept, shipped outputs reproduced →
  rules: test_parameter_from_a_graph_input_is_kept; here:
  test_reference_outputs_are_reproduced_after_the_fold[eval]
- onnx-node-batchnorm-example-training-mode → training_mode=1 with statistics outputs kept, shipped
  outputs reproduced → rules: test_bn15_training_mode_is_kept; here:
  test_reference_outputs_are_reproduced_after_the_fold[training-mode]
- onnx2c-mnist-matmul-bn → rank-2 MatMul → BN with scale/bias in Constant nodes folds →
  rules: test_rank2_matmul_then_bn_folds_with_or_without_add,
  test_parameters_in_constant_nodes_and_constant_subgraphs_fold
- ort-conv-bn-add-mul-fp16 → float16 folds and is judged at float16 tolerance →
  rules: test_half_model_folds_and_keeps_its_dtype
- ort-conv-bn-mul-add-unsqueeze → a graph output named twice survives →
  here: test_duplicated_graph_output_name_survives_the_fold
- ort-conv-bn-mul-add-unsqueeze-negaxes → Unsqueeze with negative axes before Mul/Add →
  here: test_unsqueeze_with_negative_axes_before_mul_add
- ort-conv-bn-mul-add-unsqueeze-no-bias, ort-conv-bn-no-bias → IR 3 Conv without bias → BN folds,
  initializers are constants → rules: test_conv_then_bn_folds_for_every_bn_opset,
  test_ir3_initializers_listed_as_inputs_are_constants
- pinto-batchnorm1d-training-mode, pinto-batchnorm2d-training-mode → training_mode=1 with stored
  statistics kept, the file written unchanged → rules: test_bn15_training_mode_is_kept; here:
  test_nothing_foldable_file_is_written_unchanged
- trt-polygraphy-residual-block → Conv → BN through the file API, a dynamic batch →
  file: test_external_data_is_read_and_written_beside_the_model; here:
  test_dynamic_batch_verifies_at_several_batch_sizes
- winml-squeezenet-imagescaler-bn → ImageScaler → mean-subtraction BN → VALID Conv stays;
  STRING and ZipMap outputs through the file API → rules:
  test_mean_subtraction_bn_before_conv_is_kept_for_precision; here:
  test_imagescaler_then_mean_subtraction_bn_stays,
  test_zipmap_and_string_outputs_through_the_file_api
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bench.onnx_cases import onnx_case_files
from tests.training.onnx_fold.test_rules import (
    F32,
    bn_node,
    bn_params,
    conv_bn_model,
    fold_and_verify,
    make_model,
    ops,
    tensor,
)
from training.onnx_fold import fold_onnx, fold_onnx_file, verify_onnx_fold


@dataclass(frozen=True)
class Pin:
    bn_before: int
    bn_left: int
    why: str  # the hand-derived reason, for the reader
    kept_reasons: tuple[str, ...] = ()  # phrases the report must give for the kept BNs
    training_bns: int = 0  # BNs in training mode, which must come out byte-identical
    left_after: tuple[tuple[str, int], ...] = ()  # op feeding each BN left, and how many


PINS: dict[str, Pin] = {
    "burn-batch-norm-1d-2d": Pin(
        2,
        2,
        "BatchNorm1d reads the graph input directly and feeds a Reshape; BatchNorm2d follows "
        "that Reshape and is the graph output: no Conv/Gemm/MatMul on either side",
        ("'input.1' is a graph input", "follows Reshape"),
        left_after=(("<graph input>", 1), ("Reshape", 1)),
    ),
    "burn-batch-norm-partial-constant": Pin(
        1,
        1,
        "mean and var are graph inputs: run-time parameters",
        ("'mean' is a graph input",),
        left_after=(("<graph input>", 1),),
    ),
    "burn-mnist-gemm-bn": Pin(
        2,
        1,
        "norm2 follows Gemm (transB=1) and folds; norm1 follows a Relu and feeds Flatten",
        ("follows Relu",),
        left_after=(("Relu", 1),),
    ),
    "onnx-light-densenet121": Pin(
        121,
        62,
        "59 BNs follow a Conv (weights and stats from ConstantOfShape sub-graphs) and fold; the "
        "pre-activation BNs follow Concat (58), AveragePool (3) or MaxPool (1) and feed the Mul "
        "of a caffe2 Scale layer, so neither side can absorb them",
        ("follows Concat", "follows AveragePool", "follows MaxPool"),
        left_after=(("AveragePool", 3), ("Concat", 58), ("MaxPool", 1)),
    ),
    "onnx-light-inception-v2": Pin(69, 0, "every BN follows its own Conv"),
    "onnx-light-resnet50": Pin(53, 0, "every BN follows its own Conv"),
    "onnx-light-shufflenet": Pin(49, 0, "every BN follows its own (grouped/depthwise) Conv"),
    "onnx-node-batchnorm-example": Pin(
        1,
        1,
        "all four parameters are graph inputs",
        ("'s' is a graph input",),
        left_after=(("<graph input>", 1),),
    ),
    "onnx-node-batchnorm-example-training-mode": Pin(
        1,
        1,
        "training_mode=1 with running-statistics outputs",
        ("training mode",),
        training_bns=1,
        left_after=(("<graph input>", 1),),
    ),
    "onnx2c-mnist-matmul-bn": Pin(
        2, 0, "both BNs follow a rank-2 MatMul; scale/bias are Constant nodes"
    ),
    "ort-conv-bn-add-mul-fp16": Pin(1, 0, "float16 Conv (no bias) → BN"),
    "ort-conv-bn-mul-add-unsqueeze": Pin(1, 0, "Conv (with bias) → BN"),
    "ort-conv-bn-mul-add-unsqueeze-negaxes": Pin(1, 0, "Conv (with bias) → BN"),
    "ort-conv-bn-mul-add-unsqueeze-no-bias": Pin(1, 0, "IR 3 Conv (no bias) → BN"),
    "ort-conv-bn-no-bias": Pin(1, 0, "IR 3 Conv (no bias) → BN, initializers not inputs"),
    "pinto-batchnorm1d-training-mode": Pin(
        1,
        1,
        "training_mode=1: batch statistics, whatever the stored ones",
        ("training",),
        training_bns=1,
        left_after=(("<graph input>", 1),),
    ),
    "pinto-batchnorm2d-training-mode": Pin(
        1,
        1,
        "training_mode=1: batch statistics, whatever the stored ones",
        ("training",),
        training_bns=1,
        left_after=(("<graph input>", 1),),
    ),
    "trt-polygraphy-residual-block": Pin(5, 0, "five Conv → BN pairs, dynamic batch"),
    "winml-squeezenet-imagescaler-bn": Pin(
        1,
        1,
        "the BN follows ImageScaler (nothing to fold into) and feeds a VALID Conv, which would "
        "absorb it exactly in real arithmetic; but it is a mean subtraction (mean 104/117/123, "
        "var 1, epsilon 0), and folding it makes the conv read inputs ~120x larger, which "
        "costs float32 more precision than the tolerance allows "
        "(test_forced_mean_subtraction_fold_loses_precision)",
        ("follows ImageScaler", "mean subtraction"),
        left_after=(("ImageScaler", 1),),
    ),
}


@pytest.fixture
def load(onnx_cases: Path) -> Callable[[str], onnx.ModelProto]:
    """Loads one corpus model by folder name (the test skips, or fails in CI, without it)."""
    return lambda name: onnx.load(onnx_cases / name / "model.onnx")


def test_every_shared_model_is_pinned(onnx_cases: Path):
    assert {p.parent.name for p in onnx_case_files(onnx_cases)} == set(PINS)


def bn_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "BatchNormalization"]


def is_training(node: onnx.NodeProto) -> bool:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return len(node.output) > 1 or attrs.get("training_mode", 0) == 1


def producers_of_bns(model: onnx.ModelProto) -> tuple[tuple[str, int], ...]:
    """Which op feeds each BN, counted: read off the graph, not the folder's report."""
    producer = {out: node.op_type for node in model.graph.node for out in node.output}
    fed_by = Counter(producer.get(bn.input[0], "<graph input>") for bn in bn_nodes(model))
    return tuple(sorted(fed_by.items()))


def user_inputs(model: onnx.ModelProto) -> list[tuple[str, onnx.TypeProto]]:
    initializers = {t.name for t in model.graph.initializer}
    return [(i.name, i.type) for i in model.graph.input if i.name not in initializers]


@pytest.mark.parametrize("name", sorted(PINS))
def test_shared_model_folds_to_the_pinned_count_and_matches(name, load):
    pin, model = PINS[name], load(name)
    folded, report = fold_onnx(model)

    assert len(bn_nodes(model)) == pin.bn_before
    assert len(bn_nodes(folded)) == pin.bn_left, f"{pin.why}\n{report}"
    assert producers_of_bns(folded) == pin.left_after, pin.why
    reasons = " | ".join(s.reason for s in report.skipped)
    for phrase in pin.kept_reasons:
        assert phrase in reasons, f"{pin.why}\n{report}"
    training = [n for n in bn_nodes(model) if is_training(n)]
    assert len(training) == pin.training_bns
    assert all(node in bn_nodes(folded) for node in training)  # untouched, byte for byte

    assert user_inputs(folded) == user_inputs(model)
    assert [(o.name, o.type) for o in folded.graph.output] == [
        (o.name, o.type) for o in model.graph.output
    ]
    result = verify_onnx_fold(model, folded, intermediates=True)
    assert result.passed, result.summary()
    assert result.outputs_compared == len(model.graph.output)
    if len(folded.graph.node) > 1:
        assert result.intermediates_compared > 0


def test_half_precision_model_is_judged_at_half_precision_tolerance(load):
    model = load("ort-conv-bn-add-mul-fp16")
    folded, _ = fold_onnx(model)
    result = verify_onnx_fold(model, folded, intermediates=True)
    assert (result.rtol, result.atol) == (1e-2, 1e-2)
    assert result.passed


def test_dynamic_batch_model_verifies_at_several_batch_sizes(load):
    model = load("trt-polygraphy-residual-block")  # input [-1, 3, 224, 224]
    folded, _ = fold_onnx(model)
    for batch in (1, 3):
        result = verify_onnx_fold(model, folded, dynamic_dim=batch, seed=batch)
        assert result.probe_shapes == {"gpu_0/data_0": [batch, 3, 224, 224]}
        assert result.passed, result.summary()


@pytest.mark.parametrize(
    "name", ["onnx-node-batchnorm-example", "onnx-node-batchnorm-example-training-mode"]
)
def test_upstream_test_data_still_gives_the_upstream_outputs(name, load, onnx_cases):
    folder = onnx_cases / name / "test_data_set_0"
    model = load(name)
    inputs = {
        i.name: numpy_helper.to_array(onnx.load_tensor(folder / f"input_{k}.pb"))
        for k, i in enumerate(model.graph.input)
    }
    folded, _ = fold_onnx(model)
    result = verify_onnx_fold(model, folded, inputs)
    assert result.passed
    assert result.probe == "given"
    import onnxruntime as ort

    session = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"])
    for k, got in enumerate(session.run(None, inputs)):
        want = numpy_helper.to_array(onnx.load_tensor(folder / f"output_{k}.pb"))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_forced_mean_subtraction_fold_loses_precision(load):
    """Why the winml BN is kept: folded anyway, float32 rounding departs from the original's
    beyond rtol = atol = 1e-4 in the intermediate tensors (observed: ~6x the tolerance)."""
    model = load("winml-squeezenet-imagescaler-bn")
    folded, report = fold_onnx(model, max_input_growth=float("inf"))
    assert len(report.folded) == 1
    result = verify_onnx_fold(model, folded, intermediates=True)
    assert not result.passed
    assert all(not d.is_output for d in result.failures)  # outputs pass: the loss is inside


# --------------------------------------------------------------- the same rules, in memory
# Each test below builds, with onnx.helper, the pattern that makes a corpus file interesting
# (see the table above), so the rule is tested in a clone that has no corpus.

ML = "ai.onnx.ml"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(2024)


def test_statistics_fed_through_identity_fold(rng):
    """burn-batch-norm-1d-2d: mean and var are Identity outputs of initializers."""
    model = conv_bn_model(rng)
    for key in ("mean", "var"):
        source = next(t for t in model.graph.initializer if t.name == f"bn_{key}")
        source.name = f"bn_{key}_src"
        model.graph.node.insert(0, helper.make_node("Identity", [source.name], [f"bn_{key}"]))
    folded, _ = fold_and_verify(model, bn_left=0)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]


def test_bn_on_a_graph_input_and_after_reshape_is_kept(rng):
    """burn-batch-norm-1d-2d: BatchNorm1d on the input, Reshape, BatchNorm2d as the output."""
    inits = [
        *bn_params(rng, 4, "bn1"),
        *bn_params(rng, 2, "bn2"),
        tensor("shape", np.array([1, 2, 2, 5], np.int64)),
    ]
    nodes = [
        bn_node("x", "b1", prefix="bn1"),
        helper.make_node("Reshape", ["b1", "shape"], ["r"]),
        bn_node("r", "y", prefix="bn2"),
    ]
    model = make_model(nodes, [("x", F32, [1, 4, 5])], ["y"], inits)
    _, report = fold_and_verify(model, bn_left=2)
    reasons = " | ".join(s.reason for s in report.skipped)
    assert "'x' is a graph input" in reasons
    assert "follows Reshape" in reasons


def test_bn_after_concat_feeding_mul_is_kept(rng):
    """onnx-light-densenet121: a pre-activation BN after Concat, read by a caffe2 Scale Mul."""
    inits = [
        *bn_params(rng, 6),
        tensor("gamma", rng.normal(0, 1, (6, 1, 1)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Concat", ["x", "x2"], ["c"], axis=1),
        bn_node("c", "n"),
        helper.make_node("Mul", ["n", "gamma"], ["y"]),
    ]
    inputs = [("x", F32, [1, 4, 3, 3]), ("x2", F32, [1, 2, 3, 3])]
    _, report = fold_and_verify(make_model(nodes, inputs, ["y"], inits), bn_left=1)
    assert "follows Concat" in report.skipped[0].reason


def scale_shift_after(model: onnx.ModelProto, rng: np.random.Generator, axes: list[int]) -> None:
    """Append the ORT fusion test's tail: y → Mul(Unsqueeze(w)) → Add(Unsqueeze(b)) → Flatten."""
    channels = 6
    model.graph.initializer.extend(
        [
            tensor("w", rng.normal(0, 1, channels).astype(np.float32)),
            tensor("b", rng.normal(0, 1, channels).astype(np.float32)),
        ]
    )
    model.graph.node.extend(
        [
            helper.make_node("Unsqueeze", ["w"], ["w4"], axes=axes),
            helper.make_node("Mul", ["y", "w4"], ["m"]),
            helper.make_node("Unsqueeze", ["b"], ["b4"], axes=axes),
            helper.make_node("Add", ["m", "b4"], ["a"]),
            helper.make_node("Flatten", ["a"], ["fused_result"], axis=0),
        ]
    )
    model.graph.output[0].name = "fused_result"


def test_duplicated_graph_output_name_survives_the_fold(rng):
    """ort-conv-bn-mul-add-unsqueeze: the graph output list names `fused_result` twice."""
    model = conv_bn_model(rng, opset=7)
    scale_shift_after(model, rng, axes=[1, 2])
    model.graph.output.append(model.graph.output[0])
    folded, _ = fold_and_verify(model, bn_left=0)
    assert [o.name for o in folded.graph.output] == ["fused_result", "fused_result"]


def test_unsqueeze_with_negative_axes_before_mul_add(rng):
    """ort-conv-bn-mul-add-unsqueeze-negaxes: opset 11, Unsqueeze axes [-2, -1]."""
    model = conv_bn_model(rng, opset=11)
    scale_shift_after(model, rng, axes=[-2, -1])
    folded, _ = fold_and_verify(model, bn_left=0)
    assert ops(folded, "Mul") == ops(folded, "Add") == 1  # only the BN goes


def test_imagescaler_then_mean_subtraction_bn_stays(rng):
    """winml-squeezenet: ImageScaler → BN (mean 104/117/123, var 1, epsilon 0) → VALID Conv."""
    inits = [
        tensor("W", rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32)),
        tensor("B", rng.normal(0, 1, 8).astype(np.float32)),
        tensor("bn_scale", np.ones(3, np.float32)),
        tensor("bn_bias", np.zeros(3, np.float32)),
        tensor("bn_mean", np.array([104.0, 117.0, 123.0], np.float32)),
        tensor("bn_var", np.ones(3, np.float32)),
    ]
    nodes = [
        helper.make_node("ImageScaler", ["x"], ["s"], scale=1.0, bias=[0.0, 0.0, 0.0]),
        bn_node("s", "n", epsilon=0.0, spatial=1),
        helper.make_node("Conv", ["n", "W", "B"], ["y"], auto_pad="VALID", strides=[2, 2]),
    ]
    model = make_model(nodes, [("x", F32, ["N", 3, 9, 9])], ["y"], inits, opset=7, ir=4)
    _, report = fold_and_verify(model, bn_left=1)
    assert "follows ImageScaler" in report.skipped[0].reason
    assert "mean subtraction" in report.skipped[0].reason


def classifier_with_string_outputs(rng: np.random.Generator) -> onnx.ModelProto:
    """Conv → BN → Flatten → Softmax, then ArgMax → ArrayFeatureExtractor (a STRING label) and
    ZipMap (a sequence of string→float maps), as the winml SqueezeNet ends."""
    labels = [b"cat", b"dog", b"eel", b"fox"]
    inits = [
        tensor("W", rng.normal(0, 0.5, (4, 3, 4, 4)).astype(np.float32)),
        *bn_params(rng, 4),
        helper.make_tensor("labels", TensorProto.STRING, [1, 4], labels),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        bn_node("c", "n"),
        helper.make_node("Flatten", ["n"], ["f"]),
        helper.make_node("Softmax", ["f"], ["p"], axis=1),
        helper.make_node("ArgMax", ["p"], ["i"], axis=1),
        helper.make_node("ArrayFeatureExtractor", ["labels", "i"], ["classLabel"], domain=ML),
        helper.make_node("ZipMap", ["p"], ["loss"], domain=ML, classlabels_strings=labels),
    ]
    loss = onnx.ValueInfoProto(name="loss")
    zipped = loss.type.sequence_type.elem_type.map_type
    zipped.key_type = TensorProto.STRING
    zipped.value_type.tensor_type.elem_type = F32
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", F32, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("classLabel", TensorProto.STRING, None), loss],
        inits,
    )
    opsets = [helper.make_opsetid("", 13), helper.make_opsetid(ML, 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def test_zipmap_and_string_outputs_through_the_file_api(tmp_path, rng):
    """winml-squeezenet: a STRING output and a ZipMap output, folded and verified from a file."""
    model = classifier_with_string_outputs(rng)
    onnx.save_model(model, tmp_path / "in.onnx")
    report = fold_onnx_file(tmp_path / "in.onnx", tmp_path / "out.onnx", intermediates=True)
    folded = onnx.load(tmp_path / "out.onnx")
    assert ops(folded) == 0
    assert report.verification is not None
    assert report.verification.passed
    assert report.verification.outputs_compared == 2
    assert [(o.name, o.type) for o in folded.graph.output] == [
        (o.name, o.type) for o in model.graph.output
    ]


def test_nothing_foldable_file_is_written_unchanged(tmp_path, rng):
    """pinto-batchnorm*-training-mode: all-initializer parameters, training_mode=1, and only `y`
    of its three outputs is a graph output."""
    model = conv_bn_model(rng, opset=15)
    model.graph.node[1].output.extend(["running_mean", "running_var"])
    model.graph.node[1].attribute.append(helper.make_attribute("training_mode", 1))
    onnx.save_model(model, tmp_path / "in.onnx")
    report = fold_onnx_file(tmp_path / "in.onnx", tmp_path / "same.onnx")
    assert not report.changed
    assert "nothing folded" in str(report)
    assert onnx.load(tmp_path / "same.onnx") == model


def test_dynamic_batch_verifies_at_several_batch_sizes(rng):
    """trt-polygraphy-residual-block: a symbolic batch dimension, checked at 1 and 3."""
    model = conv_bn_model(rng)  # input ["N", 4, 5, 5]
    folded, _ = fold_onnx(model)
    for batch in (1, 3):
        result = verify_onnx_fold(model, folded, dynamic_dim=batch, seed=batch)
        assert result.probe_shapes == {"x": [batch, 4, 5, 5]}
        assert result.passed, result.summary()


@pytest.mark.parametrize("training", [False, True], ids=["eval", "training-mode"])
def test_reference_outputs_are_reproduced_after_the_fold(rng, training):
    """onnx-node-batchnorm-example(-training-mode): a lone BN with runtime parameters, whose
    shipped outputs came from the ONNX reference; here the reference computes them."""
    from onnx.reference import ReferenceEvaluator

    outputs = ["y", "running_mean", "running_var"] if training else ["y"]
    node = helper.make_node(
        "BatchNormalization",
        ["x", "s", "bias", "mean", "var"],
        outputs,
        training_mode=int(training),
    )
    inputs = [("x", F32, [2, 3, 4, 5])] + [(k, F32, [3]) for k in ("s", "bias", "mean", "var")]
    model = make_model([node], inputs, outputs, [], opset=15)
    feeds = {
        "x": rng.normal(0, 1, (2, 3, 4, 5)).astype(np.float32),
        "s": rng.uniform(0.5, 2, 3).astype(np.float32),
        "bias": rng.normal(0, 1, 3).astype(np.float32),
        "mean": rng.normal(0, 1, 3).astype(np.float32),
        "var": rng.uniform(0.5, 2, 3).astype(np.float32),
    }
    shipped = ReferenceEvaluator(model).run(None, feeds)
    folded, report = fold_onnx(model)
    assert report.bn_after == 1
    result = verify_onnx_fold(model, folded, feeds)
    assert result.passed
    assert result.probe == "given"
    import onnxruntime as ort

    session = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"])
    for got, want in zip(session.run(None, feeds), shipped, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
