"""Find BatchNormalization nodes in training mode by reading the ONNX protobuf wire format.

ONNX Runtime loads such a model and runs it, normalising each batch by its own statistics:
answers then depend on the batch a request lands in, which is exactly the bug folding exists to
rule out. The service must refuse these models, but it installs neither `onnx` nor `protobuf`
(ONNX Runtime hides its graph), so this module walks the few message fields it needs by hand:

    ModelProto.graph = 7, ModelProto.functions = 25, FunctionProto.node = 5
    GraphProto.node = 1
    NodeProto: output = 2, name = 3, op_type = 4, attribute = 5, domain = 7
    AttributeProto: name = 1, i = 3, g = 6, graphs = 11

Subgraphs (If, Loop, Scan bodies) and model-local functions are searched too.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from service.errors import OnnxWireError

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5


@dataclass(frozen=True)
class TrainingBatchNorm:
    node: str
    reason: str


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise OnnxWireError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) for each field of one message."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == VARINT:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == LENGTH:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise OnnxWireError("truncated field")
            yield number, wire, buf[pos : pos + size]
            pos += size
        elif wire == FIXED64:
            pos += 8
        elif wire == FIXED32:
            pos += 4
        else:
            raise OnnxWireError(f"unsupported wire type {wire}")
    if pos != len(buf):
        raise OnnxWireError("truncated message")


def _messages(buf: memoryview, number: int) -> Iterator[memoryview]:
    for n, wire, value in _fields(buf):
        if n == number and wire == LENGTH and isinstance(value, memoryview):
            yield value


def _node_findings(node: memoryview) -> Iterator[TrainingBatchNorm]:
    op_type = name = domain = ""
    outputs: list[str] = []
    attributes: list[memoryview] = []
    for n, wire, value in _fields(node):
        if wire != LENGTH or not isinstance(value, memoryview):
            continue
        if n == 2:
            outputs.append(bytes(value).decode("utf-8", "replace"))
        elif n == 3:
            name = bytes(value).decode("utf-8", "replace")
        elif n == 4:
            op_type = bytes(value).decode("utf-8", "replace")
        elif n == 5:
            attributes.append(value)
        elif n == 7:
            domain = bytes(value).decode("utf-8", "replace")
    for attribute in attributes:
        yield from _attribute_findings(attribute, op_type, domain, name or "(unnamed)")
    if op_type == "BatchNormalization" and domain in ("", "ai.onnx"):
        extra = [o for o in outputs[1:] if o]
        if extra:
            yield TrainingBatchNorm(
                name or "(unnamed)",
                f"it produces running statistics ({', '.join(extra)}), which only training "
                "mode computes",
            )


def _attribute_findings(
    attribute: memoryview, op_type: str, domain: str, node: str
) -> Iterator[TrainingBatchNorm]:
    attr_name = ""
    int_value: int | None = None
    for n, wire, value in _fields(attribute):
        if n == 1 and isinstance(value, memoryview):
            attr_name = bytes(value).decode("utf-8", "replace")
        elif n == 3 and wire == VARINT and isinstance(value, int):
            int_value = value
        elif n in (6, 11) and isinstance(value, memoryview):
            yield from _graph_findings(value)
    is_bn = op_type == "BatchNormalization" and domain in ("", "ai.onnx")
    if is_bn and attr_name == "training_mode" and int_value:
        yield TrainingBatchNorm(node, "training_mode=1")


def _graph_findings(graph: memoryview) -> Iterator[TrainingBatchNorm]:
    for node in _messages(graph, 1):
        yield from _node_findings(node)


def training_batchnorms(data: bytes | memoryview) -> list[TrainingBatchNorm]:
    """Every BatchNormalization in training mode in a serialised ModelProto; [] if none."""
    model = memoryview(data)
    found: list[TrainingBatchNorm] = []
    for graph in _messages(model, 7):
        found.extend(_graph_findings(graph))
    for function in _messages(model, 25):
        for node in _messages(function, 5):
            found.extend(_node_findings(node))
    return found


def check_inference_mode(path: Path) -> None:
    """Raise `ValueError` naming each BatchNormalization that would run in training mode."""
    found = training_batchnorms(path.read_bytes())
    if found:
        listed = "; ".join(f"node {f.node!r}: {f.reason}" for f in found[:5])
        raise ValueError(
            f"the model contains {len(found)} BatchNormalization node(s) in training mode, "
            f"which normalise each batch by its own statistics ({listed}); export it in "
            "eval mode (model.eval()) or fold its BatchNorms first"
        )
