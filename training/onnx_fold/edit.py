"""The mechanics of rewriting a copied ONNX graph, kept apart from the rules deciding what to
rewrite: replace a node's constant inputs, remove a BN on either side, sweep what became unused.

Invariants every edit keeps, so the rules cannot break them by accident:
* a tensor name keeps meaning the same value. A folded node takes over its BN's output name;
  a node whose result changes meaning gets a fresh name; names that lose their producer are
  dropped (with their value_info);
* a constant is never changed in place: new values become new initializers with fresh names,
  so an initializer shared with other nodes stays intact;
* at the end only initializers and constant nodes that a fold stopped reading, and that
  nothing else reads, are removed. Whatever else was in the graph stays, in its order.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from training.fold_records import SkipKind
from training.onnx_fold.graph import (
    ConstantResolver,
    GraphIndex,
    NameAllocator,
    implicit_inputs,
    node_label,
)


class NotFoldable(Exception):  # noqa: N818 - a verdict, not an error: it becomes a report line
    """A rule does not apply: `kind` and the message become the report's skip kind and reason."""

    def __init__(self, kind: SkipKind, reason: str) -> None:
        super().__init__(reason)
        self.kind: SkipKind = kind


# (node, input index, new float64 value, the dtype to store it in, the name to derive from)
Edit = tuple[onnx.NodeProto, int, np.ndarray, np.dtype, str]


class GraphEdit:
    """A model being rewritten: its top-level nodes as a list in which removed nodes become
    None (positions stay stable), an index over them, and what to sweep when done."""

    def __init__(self, model: onnx.ModelProto, constants: ConstantResolver) -> None:
        self.model, self.graph = model, model.graph
        self.constants = constants
        self.names = NameAllocator(model)
        self.nodes: list[onnx.NodeProto | None] = [_copy(n) for n in self.graph.node]
        self.index = GraphIndex(self.nodes, [o.name for o in self.graph.output])
        self._released: set[str] = set()  # names an edit stopped reading
        self._dropped: set[str] = set()  # tensor names that no longer exist
        self._new_initializers: list[onnx.TensorProto] = []
        input_names = {i.name for i in self.graph.input}
        self._list_initializers_as_inputs = model.ir_version < 4 and any(
            t.name in input_names for t in self.graph.initializer
        )

    def node_at(self, name: str) -> onnx.NodeProto | None:
        """The node producing `name`, or None for graph inputs, initializers and unknowns."""
        position = self.index.producer.get(name)
        return None if position is None else self.nodes[position]

    def reindex(self) -> None:
        self.index = GraphIndex(self.nodes, self.index.graph_outputs)

    # ------------------------------------------------------------------- edits

    def set_inputs(self, edits: list[Edit]) -> None:
        """Point node inputs at new initializers holding the values, cast to their dtypes.
        Every value is checked before any input changes, so a refusal leaves no trace."""
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is refused just below
            cast = [(node, i, value.astype(dtype), base) for node, i, value, dtype, base in edits]
        require_finite([array for _, _, array, _ in cast])
        for node, i, array, base in cast:
            present = i < len(node.input) and bool(node.input[i])
            name = self.add_initializer(array, f"{base}_bnfold" if present else base)
            while len(node.input) <= i:
                node.input.append("")
            if present:
                self._released.add(node.input[i])
            node.input[i] = name

    def add_initializer(self, array: np.ndarray, base: str) -> str:
        name = self.names.fresh(base)
        array = np.ascontiguousarray(array)
        self._new_initializers.append(numpy_helper.from_array(array, name))
        self.constants.add(name, array)
        if self._list_initializers_as_inputs:  # an IR < 4 graph lists every initializer
            elem = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
            self.graph.input.append(onnx.helper.make_tensor_value_info(name, elem, array.shape))
        return name

    def rename_output(self, node: onnx.NodeProto, new_name: str) -> None:
        self._dropped.add(node.output[0])
        node.output[0] = new_name

    def replace_node(self, position: int, node: onnx.NodeProto | None) -> None:
        """Put `node` (None: nothing) where a BN was; the BN's parameters are released."""
        self.release_inputs(self.nodes[position], start=1)
        self.nodes[position] = node

    def remove_bn_after(self, position: int, producer: onnx.NodeProto) -> None:
        """The producer takes over the BN's output name; its own old output disappears."""
        self.rename_output(producer, self.nodes[position].output[0])
        self.replace_node(position, None)

    def remove_bn_before(self, position: int, reader: onnx.NodeProto) -> None:
        """The reader reads the BN's input instead; the BN's output disappears."""
        bn = self.nodes[position]
        reader.input[0] = bn.input[0]
        self._dropped.add(bn.output[0])
        self.replace_node(position, None)

    def release_inputs(self, node: onnx.NodeProto, start: int = 0) -> None:
        self._released.update(name for name in node.input[start:] if name)

    # ------------------------------------------------------------------- finishing

    def finish(self) -> None:
        """Sweep what the edits left unused and write nodes, initializers and value_info back."""
        self.graph.initializer.extend(self._new_initializers)
        self._sweep_unused()
        del self.graph.node[:]
        self.graph.node.extend(n for n in self.nodes if n is not None)
        kept_info = [v for v in self.graph.value_info if v.name not in self._dropped]
        del self.graph.value_info[:]
        self.graph.value_info.extend(kept_info)

    def _sweep_unused(self) -> None:
        """Remove released initializers and constant nodes that nothing reads any more."""
        uses = _use_counts(self.nodes, self.graph.output)
        producer = {name: i for i, n in enumerate(self.nodes) if n for name in n.output}
        initializers = {t.name for t in self.graph.initializer}
        unused_initializers: set[str] = set()
        pending = set(self._released)
        while pending:
            name = pending.pop()
            if uses.get(name, 0) > 0:
                continue
            if name in initializers:
                unused_initializers.add(name)
            elif name in producer and self._removable(producer[name], uses):
                node = self.nodes[producer[name]]
                self.nodes[producer[name]] = None
                self._dropped.update(node.output)
                for used in {*node.input, *implicit_inputs(node)}:
                    uses[used] -= 1
                    pending.add(used)
        self._drop_initializers(unused_initializers)

    def _removable(self, position: int, uses: dict[str, int]) -> bool:
        node = self.nodes[position]
        outputs = [o for o in node.output if o] if node is not None else []
        return bool(outputs) and all(
            uses.get(o, 0) == 0 and self.constants.is_constant(o) for o in outputs
        )

    def _drop_initializers(self, names: set[str]) -> None:
        if not names:
            return
        kept = [t for t in self.graph.initializer if t.name not in names]
        del self.graph.initializer[:]
        self.graph.initializer.extend(kept)
        if self.model.ir_version < 4:  # there they were listed as inputs only to be legal
            inputs = [i for i in self.graph.input if i.name not in names]
            del self.graph.input[:]
            self.graph.input.extend(inputs)


def require_finite(arrays: list[np.ndarray]) -> None:
    for array in arrays:
        if not np.all(np.isfinite(array)):
            raise NotFoldable(
                "dtype-range", f"the folded values do not fit in {array.dtype} (overflow)"
            )


def require_sole_use(edit: GraphEdit, name: str, reader: onnx.NodeProto, what: str) -> None:
    """Folding rewrites the tensor between two nodes, so no one else may read it."""
    if edit.index.sole_consumer(name) is None:
        uses = edit.index.describe_uses(name, edit.nodes)
        raise NotFoldable(
            "shared-output", f"the {what} '{name}' also feeds {uses}, not only {node_label(reader)}"
        )


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def _use_counts(
    nodes: list[onnx.NodeProto | None], outputs: list[onnx.ValueInfoProto]
) -> dict[str, int]:
    counts: dict[str, int] = {o.name: 1 for o in outputs}
    for node in nodes:
        for name in {*node.input, *implicit_inputs(node)} if node is not None else ():
            counts[name] = counts.get(name, 0) + 1
    return counts
