"""Reading an ONNX graph the way the folder needs it: who produces and who consumes each
tensor, which tensors are constants (and their values), what rank a tensor has, fresh names.

No rewriting happens here. The one judgement this module makes is what counts as a constant:

* an initializer, unless a caller can override it at run time. From IR 4 on, an initializer
  that is also listed as a graph input is such a default value, so it is *not* constant. Before
  IR 4 every initializer had to be listed as a graph input (the listing carried no meaning), and
  ONNX Runtime treats those as constants too (`Graph::CanOverrideInitializer` is `ir >= 4`), so
  there they *are* constant;
* the output of a `Constant` node, or of any deterministic standard-domain node without
  sub-graphs whose inputs are all constant (a "constant sub-graph", such as the
  ConstantOfShape → weights of the ONNX model-zoo "light" models). Those are evaluated once,
  in ONNX Runtime with optimisations off, so the folder sees the very values the runtime does.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

log = logging.getLogger(__name__)

STANDARD_DOMAINS = ("", "ai.onnx")
# Ops whose output differs from run to run: never constant, whatever their inputs.
NONDETERMINISTIC = frozenset(
    {
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "Dropout",
    }
)
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
# (ONNX element type, 0 if unknown; rank, None if unknown)
TensorType = tuple[int, int | None]


def attributes(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def set_attribute(node: onnx.NodeProto, name: str, value: float | int | str) -> None:
    """Replace (or add) one attribute, keeping the others in their order."""
    for index, attr in enumerate(node.attribute):
        if attr.name == name:
            node.attribute[index].CopyFrom(onnx.helper.make_attribute(name, value))
            return
    node.attribute.append(onnx.helper.make_attribute(name, value))


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of a graph and of the sub-graphs nested in it (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for sub in subgraphs(node):
            yield from all_nodes(sub)


def implicit_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a node's sub-graphs read. Over-approximate (names defined inside are included too):
    a spurious extra use can only make the folder skip, never fold wrongly."""
    return {name for sub in subgraphs(node) for inner in all_nodes(sub) for name in inner.input}


def node_label(node: onnx.NodeProto) -> str:
    """How a report names a node: its name, or its op and first output when it has no name."""
    return node.name or f"<{node.op_type} -> {node.output[0] if node.output else '?'}>"


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in STANDARD_DOMAINS:
            return entry.version
    return 1  # IR 1 models could omit it; anything that old is left alone by the folder


class GraphIndex:
    """Producers and consumers of the main graph's tensors, over a list of nodes in which
    removed nodes are None (so positions stay stable while the folder rewrites)."""

    def __init__(self, nodes: list[onnx.NodeProto | None], graph_outputs: Iterable[str]) -> None:
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        self.graph_outputs = set(graph_outputs)
        for position, node in enumerate(nodes):
            if node is None:
                continue
            for name in node.output:
                if name:
                    self.producer[name] = position
            for name in {*node.input, *implicit_inputs(node)}:
                if name:
                    self.consumers[name].append(position)

    def sole_consumer(self, name: str) -> int | None:
        """The one node reading `name`, if exactly one does and `name` is no graph output."""
        users = self.consumers.get(name, [])
        if len(users) != 1 or name in self.graph_outputs:
            return None
        return users[0]

    def use_count(self, name: str) -> int:
        """How many nodes read `name`, plus one if it is a graph output."""
        return len(self.consumers.get(name, [])) + (name in self.graph_outputs)

    def describe_uses(self, name: str, nodes: list[onnx.NodeProto | None]) -> str:
        users = [node_label(nodes[i]) for i in self.consumers.get(name, []) if nodes[i]]
        parts = [f"{len(users)} node(s) ({', '.join(users[:4])})"] if users else []
        if name in self.graph_outputs:
            parts.append("the graph outputs")
        return " and ".join(parts) or "nothing"


class ConstantResolver:
    """Which tensors of the main graph are constant, and their values (read or evaluated)."""

    def __init__(self, model: onnx.ModelProto, types: dict[str, TensorType]) -> None:
        graph = model.graph
        self._model = model
        self._types = types
        self._initializers = {t.name: t for t in graph.initializer}
        input_names = {i.name for i in graph.input}
        self._overridable = (
            input_names & set(self._initializers) if model.ir_version >= 4 else set()
        )
        self._graph_inputs = input_names - set(self._initializers)
        self._producer = {name: node for node in graph.node for name in node.output if name}
        self._values: dict[str, np.ndarray] = {}
        self._failed: dict[str, str] = {}
        self._constant = self._constant_names(graph)

    def _constant_names(self, graph: onnx.GraphProto) -> set[str]:
        """One pass in node order (ONNX graphs are topologically sorted)."""
        constant = set(self._initializers) - self._overridable
        for node in graph.node:
            foldable = (
                node.domain in STANDARD_DOMAINS
                and node.op_type not in NONDETERMINISTIC
                and not any(True for _ in subgraphs(node))
                and all(name in constant for name in self._value_inputs(node) if name)
            )
            if foldable:
                constant.update(name for name in node.output if name)
        return constant

    def _value_inputs(self, node: onnx.NodeProto) -> list[str]:
        """The inputs whose values matter. CastLike reads only the *type* of its second input
        (the dynamo exporter writes a Conv's zero bias as Expand(CastLike(0, input), ...)),
        so it is constant when its first input is and that type is known."""
        if node.op_type == "CastLike" and len(node.input) == 2:
            known = self._types.get(node.input[1], (0, None))[0] != 0
            return [node.input[0]] if known else list(node.input)
        return list(node.input)

    def is_constant(self, name: str) -> bool:
        return name in self._constant

    def producer_op(self, name: str) -> str | None:
        node = self._producer.get(name)
        return None if node is None else node.op_type

    def why_not_constant(self, name: str) -> str:
        if name in self._overridable:
            return (
                f"'{name}' is an initializer also listed as a graph input (IR >= 4), so a "
                "caller can override it at run time"
            )
        if name in self._graph_inputs:
            return f"'{name}' is a graph input"
        if name in self._failed:
            return f"'{name}' could not be evaluated: {self._failed[name]}"
        node = self._producer.get(name)
        if node is None:
            return f"'{name}' is not defined in the main graph"
        return f"'{name}' is computed at run time by {node.op_type} {node_label(node)}"

    def add(self, name: str, value: np.ndarray) -> None:
        """Record a tensor the folder created, so later folds can read it back."""
        self._constant.add(name)
        self._values[name] = value

    def value(self, name: str) -> np.ndarray | None:
        """The constant's value, or None if it is not constant (or could not be evaluated)."""
        if not self.is_constant(name) or name in self._failed:
            return None
        if name not in self._values:
            if name in self._initializers:
                self._values[name] = numpy_helper.to_array(self._initializers[name])
            else:
                self.prefetch([name])
        return self._values.get(name)

    def prefetch(self, names: Iterable[str]) -> None:
        """Evaluate the given constant node outputs in one ONNX Runtime session."""
        wanted = sorted(
            {n for n in names if self.is_constant(n) and n in self._producer}
            - set(self._values)
            - set(self._failed)
        )
        if not wanted:
            return
        try:
            self._values.update(zip(wanted, self._evaluate(wanted), strict=True))
        except Exception as error:
            if len(wanted) == 1:
                self._failed[wanted[0]] = str(error).splitlines()[0][:200]
                return
            for name in wanted:  # isolate the culprit; the others still evaluate
                self.prefetch([name])

    def _evaluate(self, names: list[str]) -> list[np.ndarray]:
        sub = self._subgraph_model(names)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 4  # failures surface as exceptions
        session = ort.InferenceSession(
            sub.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        results = session.run(names, {})
        for name, result in zip(names, results, strict=True):
            if not isinstance(result, np.ndarray):
                raise TypeError(f"'{name}' is not a tensor")
        return [np.asarray(r) for r in results]

    def _subgraph_model(self, names: list[str]) -> onnx.ModelProto:
        """A model with no inputs computing `names` from the nodes and initializers they need."""
        needed: dict[int, onnx.NodeProto] = {}
        needed_inits: set[str] = set()
        stack = list(names)
        while stack:
            name = stack.pop()
            if name in self._initializers:
                needed_inits.add(name)
            elif name in self._producer and id(self._producer[name]) not in needed:
                node = self._producer[name]
                needed[id(node)] = node
                stack.extend(n for n in self._value_inputs(node) if n)
        order = {id(node): i for i, node in enumerate(self._model.graph.node)}
        nodes = [self._standalone(n) for n in sorted(needed.values(), key=lambda n: order[id(n)])]
        graph = onnx.helper.make_graph(
            nodes,
            "constant_subgraph",
            inputs=[],
            outputs=[onnx.ValueInfoProto(name=name) for name in names],
            initializer=[self._initializers[name] for name in sorted(needed_inits)],
        )
        sub = onnx.helper.make_model(graph, opset_imports=list(self._model.opset_import))
        sub.ir_version = max(self._model.ir_version, 4)  # IR >= 4: initializers need no input
        sub.functions.extend(self._model.functions)
        return sub

    def _standalone(self, node: onnx.NodeProto) -> onnx.NodeProto:
        """The node as it can run without the graph's inputs: CastLike becomes a Cast."""
        if self._value_inputs(node) == list(node.input):
            return node
        target = self._types[node.input[1]][0]
        return onnx.helper.make_node("Cast", [node.input[0]], list(node.output), to=target)


def infer_types(model: onnx.ModelProto) -> dict[str, TensorType]:
    """Element types and ranks from the model's annotations plus ONNX shape inference."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference is a hint: without it some folds are skipped, none is wrong
        log.debug("shape inference failed; folding without inferred types", exc_info=True)
        inferred = model
    graph = inferred.graph
    types: dict[str, TensorType] = {t.name: (t.data_type, len(t.dims)) for t in graph.initializer}
    for info in [*graph.input, *graph.output, *graph.value_info]:
        if info.type.HasField("tensor_type"):
            tensor_type = info.type.tensor_type
            rank = len(tensor_type.shape.dim) if tensor_type.HasField("shape") else None
            types.setdefault(info.name, (tensor_type.elem_type, rank))
    return types


class NameAllocator:
    """Fresh tensor and node names, unique across the model and all of its sub-graphs."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        taken: set[str] = {t.name for t in graph.initializer}
        taken |= {v.name for v in [*graph.input, *graph.output, *graph.value_info]}
        for node in all_nodes(graph):
            taken.update([*node.input, *node.output, node.name])
        self._taken = taken

    def fresh(self, base: str) -> str:
        name, counter = base, 1
        while name in self._taken:
            counter += 1
            name = f"{base}_{counter}"
        self._taken.add(name)
        return name


def count_ops(graph: onnx.GraphProto, op_type: str) -> int:
    return Counter(node.op_type for node in all_nodes(graph))[op_type]


def tensors_with_data(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor that can hold weights: initializers and tensor attributes, sub-graphs too."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from tensors_with_data(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from tensors_with_data(sub)
