"""The rewrite: fold each eval-mode BatchNormalization of an ONNX graph into a neighbour.

`fold_onnx` copies the model and visits its BNs in graph order. Each BN is first offered to the
node that produces its input (Conv, ConvTranspose, Gemm, MatMul or MatMul+Add), then to the node
that consumes its output (Conv without zero padding, possibly behind an edge/reflect/wrap Pad,
or Gemm with transA=0). A rule either rewrites the graph completely or says why it does not
apply; nothing is half-done. Visiting repeats until a pass folds nothing, so chains
(Conv → BN → BN, BN → BN → Conv) fold all the way.

The skip rules, all explicit:
* the BN is in training mode: `training_mode=1`, or more than one output declared (ONNX Runtime
  runs BatchNormalization-7/9 with its optional outputs in training mode, on batch statistics);
* a BN parameter or the neighbour's weight/bias is not constant (see onnx_fold.graph);
* the tensor between the BN and its neighbour is read by anything else or is a graph output;
* the fold would not be exact: zero padding in a Conv after the BN, Gemm with transA=1 after
  the BN, a MatMul whose result is not rank 2, BN-7 `spatial=0` statistics that vary over
  positions, or folded weights that overflow their float type;
* a BN-before-op fold would cost precision: the BN subtracts a mean far larger than the spread
  of its input (mean-subtraction preprocessing), see `algebra.input_growth`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from training.errors import OnnxFoldError
from training.fold_records import Direction, FoldedBN, SkippedBN
from training.onnx_fold import algebra as fm
from training.onnx_fold.edit import GraphEdit, NotFoldable, require_finite, require_sole_use
from training.onnx_fold.graph import (
    FLOAT_DTYPES,
    STANDARD_DOMAINS,
    ConstantResolver,
    all_nodes,
    attributes,
    count_ops,
    default_opset,
    infer_types,
    node_label,
    set_attribute,
    subgraphs,
    tensors_with_data,
)
from training.onnx_fold.report import OnnxFoldReport

BN = "BatchNormalization"
# A BN-before-op fold may make the op's input this many times larger (3 bits of precision);
# past that the folded model's rounding visibly departs from the original's.
MAX_INPUT_GROWTH = 8.0
PAD_MODES_THAT_COMMUTE = ("edge", "reflect", "wrap")  # copy values, so commute with s*x + t


@dataclass(frozen=True)
class _Param:
    """A constant input of a node in float64, with the dtype to cast the folded value back to."""

    name: str
    value: np.ndarray
    dtype: np.dtype


def fold_onnx(
    model: onnx.ModelProto,
    *,
    fold_into_consumers: bool = True,
    max_input_growth: float = MAX_INPUT_GROWTH,
) -> tuple[onnx.ModelProto, OnnxFoldReport]:
    """Fold every eval-mode BN that can be folded exactly; the input proto is not modified.

    `fold_into_consumers=False` keeps BNs that only a following Conv/Gemm could absorb.
    `max_input_growth` bounds the precision a BN-before-op fold may cost; past it the BN stays.
    The model's tensors must hold their data (load external data first).
    """
    for tensor in tensors_with_data(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise OnnxFoldError(
                f"tensor '{tensor.name}' keeps its data in an external file; load the model "
                "with its external data first (fold_onnx_file does)"
            )
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    return folded, _OnnxFolder(folded, fold_into_consumers, max_input_growth).run()


class _OnnxFolder:
    """One fold of one model: the driver, the BN's own checks, and the rules per neighbour."""

    def __init__(
        self, model: onnx.ModelProto, into_consumers: bool, max_input_growth: float
    ) -> None:
        self.model = model
        self.into_consumers = into_consumers
        self.max_input_growth = max_input_growth
        self.opset = default_opset(model)
        types = infer_types(model)
        self.ranks = {name: rank for name, (_, rank) in types.items() if rank is not None}
        self.constants = ConstantResolver(model, types)
        self.edit = GraphEdit(model, self.constants)
        self.report = OnnxFoldReport(
            nodes_before=len(model.graph.node), bn_before=count_ops(model.graph, BN)
        )

    # ------------------------------------------------------------------- driver

    def run(self) -> OnnxFoldReport:
        self._prefetch_constants()
        verdicts: dict[int, NotFoldable] = {}
        progress = True
        while progress:  # a fold can open another (BN → BN → Conv): repeat until none does
            progress, verdicts = False, {}
            for position, node in enumerate(self.edit.nodes):
                if node is None or node.op_type != BN or node.domain not in STANDARD_DOMAINS:
                    continue
                outcome = self._fold_one(position, node)
                if isinstance(outcome, FoldedBN):
                    self.report.folded.append(outcome)
                    self.edit.reindex()
                    progress = True
                else:
                    verdicts[position] = outcome
        self._finish(verdicts)
        return self.report

    def _fold_one(self, position: int, bn: onnx.NodeProto) -> FoldedBN | NotFoldable:
        """The fold, or the verdict against it: the BN's own, or why neither side takes it.

        With both sides refused, the kind is the producer side's unless there simply is no
        foldable producer, as in the PyTorch folder; the reason gives both.
        """
        try:
            affine, growth = self._bn_affine(bn)
        except NotFoldable as verdict:
            return verdict
        try:
            return self._into_producer(position, bn, affine)
        except NotFoldable as verdict:
            after = verdict
        if not self.into_consumers:
            return NotFoldable(
                after.kind, f"{after}; folding into a following node is switched off"
            )
        try:
            return self._into_consumer(position, bn, affine, growth)
        except NotFoldable as before:
            kind = after.kind if after.kind != "no-adjacent-layer" else before.kind
            return NotFoldable(kind, f"{after}; {before}")

    def _finish(self, verdicts: dict[int, NotFoldable]) -> None:
        for position, verdict in verdicts.items():
            node = self.edit.nodes[position]
            self.report.skipped.append(SkippedBN(node_label(node), verdict.kind, str(verdict)))
        self._skip_subgraph_bns()
        self.edit.finish()
        self.report.nodes_after = len(self.model.graph.node)
        self.report.bn_after = count_ops(self.model.graph, BN)
        if self.model.ir_version < 4 and self.report.folded:
            self.report.notes.append(
                f"IR {self.model.ir_version} model: initializers count as constants even when "
                "listed as graph inputs (IR < 4 required that listing)"
            )

    def _skip_subgraph_bns(self) -> None:
        for node in filter(None, self.edit.nodes):
            for inner in (n for sub in subgraphs(node) for n in all_nodes(sub)):
                if inner.op_type == BN:
                    where = f"inside a sub-graph of {node.op_type} {node_label(node)}"
                    reason = f"{where}; sub-graphs are not rewritten"
                    self.report.skipped.append(SkippedBN(node_label(inner), "sub-graph", reason))

    def _prefetch_constants(self) -> None:
        """Evaluate every constant a rule may read in one runtime session, not one per BN."""
        ops = {BN, "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Pad"}
        names = [
            name
            for node in filter(None, self.edit.nodes)
            if node.op_type in ops
            for name in node.input[0 if node.op_type == "Add" else 1 :]
        ]
        self.constants.prefetch(names)

    # ------------------------------------------------------------------- the BN itself

    def _bn_affine(self, bn: onnx.NodeProto) -> tuple[fm.Affine, float]:
        """The BN's per-channel map, and the input growth a fold into a consumer would cost."""
        if self.opset < 7:
            raise NotFoldable(
                "unsupported-bn", f"BatchNormalization-{self.opset} (opset < 7) is not handled"
            )
        if len(bn.output) > 1:
            raise NotFoldable(
                "batch-statistics",
                f"declares {len(bn.output)} outputs: a BN with running-statistics outputs runs "
                "in training mode (batch statistics)",
            )
        attrs = attributes(bn)
        if attrs.get("training_mode", 0):
            raise NotFoldable(
                "batch-statistics", "training_mode=1: it normalises with batch statistics"
            )
        if len(bn.input) != 5:
            raise NotFoldable("unsupported-bn", f"has {len(bn.input)} inputs, expected 5")
        scale, bias, mean, var = (
            self._param(bn, i, what).value
            for i, what in enumerate(("scale", "bias", "mean", "var"), 1)
        )
        epsilon = float(attrs.get("epsilon", 1e-5))
        affine = fm.bn_affine(scale, bias, mean, var, epsilon)
        growth = fm.input_growth(scale, bias, mean, var, epsilon)
        if affine.scale.ndim == 1 and affine.shift.ndim == 1:
            return affine, growth
        reduced = fm.per_channel(affine)  # BN-7 spatial=0: per-element statistics
        if reduced is None:
            raise NotFoldable(
                "inexact",
                f"spatial=0 statistics of shape {list(np.shape(scale))} differ between "
                "positions of a channel, so no per-channel weight can absorb them",
            )
        return reduced, growth

    def _param(self, node: onnx.NodeProto, index: int, what: str) -> _Param:
        name = node.input[index] if index < len(node.input) else ""
        value = self.constants.value(name) if name else None
        owner = "its" if node.op_type == BN else f"{node.op_type} {node_label(node)}"
        unsupported = "unsupported-bn" if node.op_type == BN else "unsupported-layer"
        if value is None:
            why = self.constants.why_not_constant(name) if name else "missing"
            raise NotFoldable("not-constant", f"{owner} {what} is not constant: {why}")
        if value.dtype not in FLOAT_DTYPES:
            raise NotFoldable(unsupported, f"{owner} {what} has dtype {value.dtype}")
        if self.constants.producer_op(name) == "DequantizeLinear":
            raise NotFoldable(
                unsupported,
                f"{owner} {what} is dequantized from integers; folding would store it as float "
                "and undo the model's quantisation",
            )
        return _Param(name, value.astype(np.float64), value.dtype)

    def _optional_param(self, node: onnx.NodeProto, index: int, what: str) -> _Param | None:
        has_it = index < len(node.input) and node.input[index]
        return self._param(node, index, what) if has_it else None

    # ------------------------------------------------------------------- BN after an op

    def _into_producer(self, position: int, bn: onnx.NodeProto, affine: fm.Affine) -> FoldedBN:
        source = bn.input[0]
        producer = self.edit.node_at(source)
        if producer is None:
            raise NotFoldable(
                "no-adjacent-layer",
                f"not after a foldable op (its input '{source}' is a graph input)",
            )
        rule = _AFTER_RULES.get(producer.op_type)
        if rule is None or producer.domain not in STANDARD_DOMAINS:
            raise NotFoldable(
                "no-adjacent-layer", f"not after a foldable op (follows {producer.op_type})"
            )
        require_sole_use(self.edit, source, bn, f"{producer.op_type} output")
        return rule(self, position, bn, producer, affine)

    def _after_conv(
        self, position: int, bn: onnx.NodeProto, conv: onnx.NodeProto, affine: fm.Affine
    ) -> FoldedBN:
        weight, bias = self._param(conv, 1, "weight"), self._optional_param(conv, 2, "bias")
        _require_channels(affine, weight.value.shape[0], conv)
        new_w, new_b = fm.after_conv(weight.value, _value(bias), affine)
        self.edit.set_inputs([_edit(conv, 1, new_w, weight), _bias_edit(conv, new_b, bias, weight)])
        self.edit.remove_bn_after(position, conv)
        return _folded(bn, conv, "bn-after", affine, (weight, new_w))

    def _after_conv_transpose(
        self, position: int, bn: onnx.NodeProto, conv: onnx.NodeProto, affine: fm.Affine
    ) -> FoldedBN:
        weight, bias = self._param(conv, 1, "weight"), self._optional_param(conv, 2, "bias")
        group = int(attributes(conv).get("group", 1))
        _require_channels(affine, weight.value.shape[1] * group, conv)
        new_w, new_b = fm.after_conv_transpose(weight.value, _value(bias), affine, group)
        self.edit.set_inputs([_edit(conv, 1, new_w, weight), _bias_edit(conv, new_b, bias, weight)])
        self.edit.remove_bn_after(position, conv)
        return _folded(bn, conv, "bn-after", affine, (weight, new_w))

    def _after_gemm(
        self, position: int, bn: onnx.NodeProto, gemm: onnx.NodeProto, affine: fm.Affine
    ) -> FoldedBN:
        b, c, alpha, beta, trans_b = self._gemm_operands(gemm, affine, "bn-after")
        new_b, new_c = fm.after_gemm(b.value, _value(c), affine, alpha, beta, trans_b)
        self._set_gemm_operands(gemm, (b, new_b), (c, new_c))
        self.edit.remove_bn_after(position, gemm)
        return _folded(bn, gemm, "bn-after", affine, (b, new_b))

    def _after_matmul(
        self, position: int, bn: onnx.NodeProto, matmul: onnx.NodeProto, affine: fm.Affine
    ) -> FoldedBN:
        """MatMul → BN: scale the weight; the BN becomes the bias Add, in the same place."""
        weight = self._matmul_weight(matmul, bn.input[0])
        _require_channels(affine, weight.value.shape[1], matmul)
        new_w, new_b = fm.after_matmul(weight.value, None, affine)
        with np.errstate(over="ignore", invalid="ignore"):
            bias = new_b.astype(weight.dtype)
        require_finite([bias])  # checked before any edit, like set_inputs does
        self.edit.set_inputs([_edit(matmul, 1, new_w, weight)])
        bias_name = self.edit.add_initializer(bias, f"{weight.name}_bnfold_bias")
        scaled = self._rename_changed_output(matmul)
        add = onnx.helper.make_node(
            "Add",
            [scaled, bias_name],
            [bn.output[0]],
            name=self.edit.names.fresh(f"{matmul.name or 'MatMul'}_bnfold_bias"),
        )
        self.edit.replace_node(position, add)
        return _folded(bn, matmul, "bn-after", affine, (weight, new_w), via="new Add")

    def _after_add(
        self, position: int, bn: onnx.NodeProto, add: onnx.NodeProto, affine: fm.Affine
    ) -> FoldedBN:
        """MatMul → Add(constant bias) → BN: scale the weight, fold the BN into the bias."""
        side = _matmul_side(self.edit, add)
        if side is None:
            raise NotFoldable(
                "no-adjacent-layer",
                "not after a foldable op (follows an Add that is no MatMul + bias)",
            )
        matmul = self.edit.node_at(add.input[side])
        require_sole_use(self.edit, add.input[side], add, "MatMul output")
        weight = self._matmul_weight(matmul, bn.input[0])
        bias = self._param(add, 1 - side, "bias")
        _require_channels(affine, weight.value.shape[1], matmul)
        new_w, new_b = fm.after_matmul(weight.value, bias.value, affine)
        if new_b.ndim > 2:
            raise NotFoldable(
                "unsupported-layer",
                f"the Add's bias of shape {list(bias.value.shape)} is not a row bias",
            )
        self.edit.set_inputs([_edit(matmul, 1, new_w, weight), _edit(add, 1 - side, new_b, bias)])
        add.input[side] = self._rename_changed_output(matmul)
        self.edit.remove_bn_after(position, add)
        return _folded(bn, matmul, "bn-after", affine, (weight, new_w), via="Add")

    def _matmul_weight(self, matmul: onnx.NodeProto, result: str) -> _Param:
        weight = self._param(matmul, 1, "weight")
        if weight.value.ndim != 2:
            raise NotFoldable(
                "unsupported-layer", f"the MatMul weight has rank {weight.value.ndim}, not 2"
            )
        rank = self.ranks.get(result, self.ranks.get(matmul.input[0]))
        if rank != 2:
            raise NotFoldable(
                "axis-mismatch",
                f"the MatMul result has rank {rank if rank is not None else 'unknown'}: BN "
                "normalises axis 1, the weight's output axis is the last, equal only at rank 2",
            )
        return weight

    def _rename_changed_output(self, node: onnx.NodeProto) -> str:
        """A node whose result now means something else gets a fresh output name, so that
        every name in both models keeps holding the same value."""
        fresh = self.edit.names.fresh(f"{node.output[0]}_bnfold")
        self.edit.rename_output(node, fresh)
        return fresh

    def _gemm_operands(
        self, gemm: onnx.NodeProto, affine: fm.Affine, direction: Direction
    ) -> tuple[_Param, _Param | None, float, float, bool]:
        """B, C, alpha, beta and transB of a Gemm whose B' axis matches the BN's channels:
        B' is (K, N), so a BN after the Gemm meets its N columns, one before it its K rows."""
        attrs = attributes(gemm)
        b, c = self._param(gemm, 1, "B"), self._optional_param(gemm, 2, "C")
        trans_b = bool(attrs.get("transB", 0))
        columns = direction == "bn-after"
        _require_channels(affine, b.value.shape[int(columns != trans_b)], gemm)
        alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
        return b, c, alpha, beta, trans_b

    def _set_gemm_operands(
        self,
        gemm: onnx.NodeProto,
        b: tuple[_Param, np.ndarray],
        c: tuple[_Param | None, np.ndarray],
    ) -> None:
        """The new B and C; the new C already carries the old beta, so beta becomes 1."""
        (old_b, new_b), (old_c, new_c) = b, c
        self.edit.set_inputs([_edit(gemm, 1, new_b, old_b), _bias_edit(gemm, new_c, old_c, old_b)])
        set_attribute(gemm, "beta", 1.0)

    # ------------------------------------------------------------------- BN before an op

    def _into_consumer(
        self, position: int, bn: onnx.NodeProto, affine: fm.Affine, growth: float
    ) -> FoldedBN:
        output = bn.output[0]
        at = self.edit.index.sole_consumer(output)
        if at is None:
            uses = self.edit.index.describe_uses(output, self.edit.nodes)
            shared = self.edit.index.use_count(output) > 1
            kind = "shared-output" if shared else "no-adjacent-layer"
            raise NotFoldable(kind, f"its output feeds {uses}, not one Conv or Gemm")
        consumer = self.edit.nodes[at]
        op = consumer.op_type
        reads_once_as_data = consumer.input[0] == output and list(consumer.input).count(output) == 1
        if consumer.domain not in STANDARD_DOMAINS or not reads_once_as_data:
            raise NotFoldable("no-adjacent-layer", f"its output feeds {op}, not a Conv or Gemm")
        if op in _BEFORE_RULES and growth > self.max_input_growth:
            raise NotFoldable(
                "precision",
                f"folding it into the following {op} would feed that op inputs {growth:.0f}x "
                "larger (its mean is far from zero: mean subtraction) and cost that much "
                f"precision (limit {self.max_input_growth:g}x)",
            )
        rule = _BEFORE_RULES.get(op)
        if rule is None:
            raise NotFoldable("no-adjacent-layer", f"its output feeds {op}, not a Conv or Gemm")
        return rule(self, position, bn, consumer, affine)

    def _before_conv(
        self,
        position: int,
        bn: onnx.NodeProto,
        conv: onnx.NodeProto,
        affine: fm.Affine,
        via: onnx.NodeProto | None = None,
    ) -> FoldedBN:
        weight, bias = self._param(conv, 1, "weight"), self._optional_param(conv, 2, "bias")
        group = int(attributes(conv).get("group", 1))
        _require_channels(affine, weight.value.shape[1] * group, conv)
        _require_no_zero_padding(conv, weight.value.shape[2:])
        new_w, new_b = fm.before_conv(weight.value, _value(bias), affine, group)
        self.edit.set_inputs([_edit(conv, 1, new_w, weight), _bias_edit(conv, new_b, bias, weight)])
        if via is not None:  # the Pad now pads the BN's input
            conv.input[0] = self._rename_changed_output(via)
        self.edit.remove_bn_before(position, via or conv)
        via_text = f"Pad(mode={_pad_mode(via)})" if via is not None else ""
        return _folded(bn, conv, "bn-before", affine, (weight, new_w), via=via_text)

    def _before_pad(
        self, position: int, bn: onnx.NodeProto, pad: onnx.NodeProto, affine: fm.Affine
    ) -> FoldedBN:
        """BN → Pad(edge/reflect/wrap) → Conv: such a Pad copies values, so it commutes with
        the BN's per-channel map, as long as it leaves the channel axis alone."""
        mode = _pad_mode(pad)
        if mode not in PAD_MODES_THAT_COMMUTE:
            raise NotFoldable(
                "inexact", f"its output feeds a Pad in {mode} mode, which adds new values"
            )
        self._require_channel_axis_unpadded(pad, bn.input[0])
        at = self.edit.index.sole_consumer(pad.output[0])
        conv = self.edit.nodes[at] if at is not None else None
        if conv is None or conv.op_type != "Conv" or conv.input[0] != pad.output[0]:
            raise NotFoldable(
                "no-adjacent-layer", "its output feeds a Pad that does not feed exactly one Conv"
            )
        return self._before_conv(position, bn, conv, affine, via=pad)

    def _require_channel_axis_unpadded(self, pad: onnx.NodeProto, data: str) -> None:
        if self.opset < 11:
            pads = np.asarray(attributes(pad).get("pads", []), np.int64)
        else:
            pads = self._int_input(pad, 1, "pads")
        axes = self._int_input(pad, 3, "axes") if len(pad.input) > 3 and pad.input[3] else None
        rank = len(pads) // 2 if axes is None else self.ranks.get(data)
        if rank is None:
            raise NotFoldable(
                "unsupported-layer", "its output feeds a Pad with axes, on a tensor of unknown rank"
            )
        axes = np.arange(rank) if axes is None else axes
        for i, axis in enumerate(int(a) % rank for a in axes):
            if axis == 1 and (pads[i] != 0 or pads[i + len(axes)] != 0):
                raise NotFoldable("inexact", "its output feeds a Pad that pads the channel axis")

    def _int_input(self, node: onnx.NodeProto, index: int, what: str) -> np.ndarray:
        name = node.input[index] if index < len(node.input) else ""
        value = self.constants.value(name) if name else None
        if value is None:
            raise NotFoldable(
                "not-constant", f"{node.op_type} {node_label(node)} {what} is not constant"
            )
        return np.asarray(value, np.int64).reshape(-1)

    def _before_gemm(
        self, position: int, bn: onnx.NodeProto, gemm: onnx.NodeProto, affine: fm.Affine
    ) -> FoldedBN:
        if attributes(gemm).get("transA", 0):
            raise NotFoldable(
                "axis-mismatch", "its output feeds Gemm with transA=1: the BN's channels are rows"
            )
        b, c, alpha, beta, trans_b = self._gemm_operands(gemm, affine, "bn-before")
        new_b, new_c = fm.before_gemm(b.value, _value(c), affine, alpha, beta, trans_b)
        self._set_gemm_operands(gemm, (b, new_b), (c, new_c))
        self.edit.remove_bn_before(position, gemm)
        return _folded(bn, gemm, "bn-before", affine, (b, new_b))


_Rule = Callable[[_OnnxFolder, int, onnx.NodeProto, onnx.NodeProto, fm.Affine], FoldedBN]
_AFTER_RULES: dict[str, _Rule] = {
    "Conv": _OnnxFolder._after_conv,
    "ConvTranspose": _OnnxFolder._after_conv_transpose,
    "Gemm": _OnnxFolder._after_gemm,
    "MatMul": _OnnxFolder._after_matmul,
    "Add": _OnnxFolder._after_add,
}
_BEFORE_RULES: dict[str, _Rule] = {
    "Conv": _OnnxFolder._before_conv,
    "Gemm": _OnnxFolder._before_gemm,
    "Pad": _OnnxFolder._before_pad,
}


def _folded(
    bn: onnx.NodeProto,
    layer: onnx.NodeProto,
    direction: Direction,
    affine: fm.Affine,
    weight: tuple[_Param, np.ndarray],
    via: str = "",
) -> FoldedBN:
    """The record of one fold; `weight` is the layer's weight before and after it."""
    before, after = weight
    return FoldedBN(
        bn=node_label(bn),
        layers=(node_label(layer),),
        layer_types=(layer.op_type,),
        direction=direction,
        exactness="scale-only" if not np.any(affine.shift) else "exact",
        max_rel_weight_change=fm.relative_change(before.value, after),
        via=via,
    )


def _value(param: _Param | None) -> np.ndarray | None:
    return None if param is None else param.value


def _edit(node: onnx.NodeProto, index: int, value: np.ndarray, old: _Param) -> tuple:
    return node, index, value, old.dtype, old.name


def _bias_edit(
    node: onnx.NodeProto, value: np.ndarray, bias: _Param | None, weight: _Param
) -> tuple:
    """A new bias (Conv B, Gemm C) replaces the old one, or is added in the weight's dtype."""
    if bias is not None:
        return _edit(node, 2, value, bias)
    return node, 2, value, weight.dtype, f"{weight.name}_bnfold_bias"


def _matmul_side(edit: GraphEdit, add: onnx.NodeProto) -> int | None:
    """Which input of a two-input Add a MatMul produces (the first such), if any."""
    if len(add.input) != 2:
        return None
    for side in (0, 1):
        producer = edit.node_at(add.input[side])
        if producer is not None and producer.op_type == "MatMul":
            return side
    return None


def _require_channels(affine: fm.Affine, channels: int, node: onnx.NodeProto) -> None:
    if affine.scale.shape[0] != channels:
        raise NotFoldable(
            "axis-mismatch",
            f"the BN has {affine.scale.shape[0]} channels, {node.op_type} {node_label(node)} "
            f"has {channels}",
        )


def _require_no_zero_padding(conv: onnx.NodeProto, kernel: tuple[int, ...]) -> None:
    """A Conv after the BN sees padded zeros, not the BN's shift, unless it does not pad.
    SAME padding with a 1×1 kernel pads nothing, whatever the stride."""
    attrs = attributes(conv)
    auto_pad = _text(attrs.get("auto_pad", "NOTSET"))
    if auto_pad == "VALID" or (auto_pad.startswith("SAME") and all(k == 1 for k in kernel)):
        return
    pads = list(attrs.get("pads", []))
    if auto_pad.startswith("SAME") or any(pads):
        padding = f"auto_pad={auto_pad}" if auto_pad.startswith("SAME") else f"pads={pads}"
        raise NotFoldable(
            "inexact",
            f"its output feeds Conv {node_label(conv)} with {padding}: the zero padding would "
            "not see the BN's shift",
        )


def _pad_mode(pad: onnx.NodeProto | None) -> str:
    return _text(attributes(pad).get("mode", "constant")) if pad is not None else ""


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
