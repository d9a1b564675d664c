"""The v2 inference request and response, with Triton's binary tensor data extension.

A request body is a JSON object, optionally followed by binary tensor data; the
`Inference-Header-Content-Length` header gives the JSON's length and then the rest of the body
holds each binary input in the order the inputs are listed, `binary_data_size` bytes each. The
Content-Type header is not consulted: the official client sends none. Validation is by hand,
against the model's own input and output specs, so every message names the tensor at fault and
what the model expects; it is complete before anything runs, so a batcher can trust a request.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from service import datatypes, tensors
from service.classification import classify_output
from service.errors import BadRequestError
from service.runtime import ModelVersion, TensorSpec

HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class OutputRequest:
    name: str
    binary: bool
    classification: int = 0  # top-k requested; 0 for the raw tensor


@dataclass(frozen=True)
class Limits:
    """What one request may declare (`Settings.max_tensor_elements`, `max_request_batch_size`),
    checked on each input's shape before its data is converted."""

    max_tensor_elements: int = 1 << 26
    max_request_batch_size: int = 8192

    def check(self, where: str, shape: tuple[int, ...], model: ModelVersion) -> None:
        count = tensors.element_count(shape)
        if count > self.max_tensor_elements:
            raise BadRequestError(
                f"{where}: shape {list(shape)} holds {count} elements; this server takes at most "
                f"{self.max_tensor_elements} per tensor (max_tensor_elements)"
            )
        if model.batched and shape and shape[0] > self.max_request_batch_size:
            raise BadRequestError(
                f"{where}: a batch of {shape[0]} rows; this server takes at most "
                f"{self.max_request_batch_size} per request (max_request_batch_size)"
            )


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    feeds: dict[str, np.ndarray]
    outputs: tuple[OutputRequest, ...]
    batch_size: int

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(JSON part, binary part) per the binary extension; the whole body is JSON without it."""
    if not body:
        raise BadRequestError(
            "empty request body: send an inference request ($inference_request JSON)"
        )
    if header_length is None:
        return body, memoryview(b"")
    try:
        length = int(header_length)
    except ValueError:
        raise BadRequestError(
            f"{HEADER_LENGTH} must be an integer, not {header_length[:40]!r}"
        ) from None
    if not 0 < length <= len(body):
        raise BadRequestError(
            f"{HEADER_LENGTH} is {length} but the body has {len(body)} bytes; it must give the "
            "length of the JSON object at the start of the body"
        )
    return body[:length], memoryview(body)[length:]


def _loads(text: bytes | memoryview) -> Any:
    """orjson (five times the standard library's speed on a large tensor); what it refuses but
    Python's json takes (NaN, Infinity, integers past 64 bits) goes to the standard library, so
    only malformed JSON fails, with the standard library's message."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(bytes(text))


def load_json_object(text: bytes | memoryview, what: str) -> dict[str, Any]:
    try:
        value = _loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BadRequestError(f"malformed JSON in the {what}: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequestError(f"the {what} must be a JSON object")
    return value


def load_json_array(text: bytes) -> list[Any]:
    try:
        value = _loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BadRequestError(f"malformed JSON: {exc}") from None
    if not isinstance(value, list):
        raise BadRequestError("the body must be a JSON array")
    return value


def _parameters(where: str, raw: dict[str, Any]) -> dict[str, Any]:
    params = raw.get("parameters", {})
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise BadRequestError(f"{where}: 'parameters' must be an object")
    return params


def _flag(where: str, params: dict[str, Any], key: str, default: bool) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise BadRequestError(f"{where}: parameter '{key}' must be true or false")
    return value


def parse_infer_request(
    body: bytes, header_length: str | None, model: ModelVersion, limits: Limits = Limits()
) -> InferRequest:
    """Validate a whole request against `model`; `BadRequestError` names the first problem."""
    head, binary = split_body(body, header_length)
    request = load_json_object(head, "inference request")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequestError("'id' must be a string")
    params = _parameters("request", request)
    binary_output = _flag("request", params, "binary_data_output", False)
    feeds = _inputs(request.get("inputs"), binary, model, limits)
    outputs = _outputs(request.get("outputs"), binary_output, model)
    return InferRequest(request_id, feeds, outputs, _batch_size(feeds, model))


def _inputs(
    raw: Any, binary: memoryview, model: ModelVersion, limits: Limits
) -> dict[str, np.ndarray]:
    if not isinstance(raw, list) or not raw:
        raise BadRequestError("'inputs' must be a non-empty list of input tensors")
    feeds: dict[str, np.ndarray] = {}
    offset = 0
    for item in raw:
        array, used = _input(item, binary, offset, model, feeds, limits)
        feeds[_name(item)] = array
        offset += used
    if offset != len(binary):
        raise BadRequestError(
            f"the body carries {len(binary)} bytes of binary data after the JSON but the inputs' "
            f"binary_data_size add up to {offset}"
        )
    missing = [s.name for s in model.inputs if s.name not in feeds]
    if missing:
        raise BadRequestError(
            f"missing input(s) {', '.join(map(repr, missing))} for model {model.name!r}"
        )
    return feeds


def _name(item: Any) -> str:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise BadRequestError("each input and output must be an object with a string 'name'")
    return item["name"]


def _input(
    item: Any,
    binary: memoryview,
    offset: int,
    model: ModelVersion,
    seen: dict[str, np.ndarray],
    limits: Limits,
) -> tuple[np.ndarray, int]:
    """(array, binary bytes consumed) for one `$request_input`."""
    name = _name(item)
    where = f"input {name!r}"
    spec = model.input(name)
    if spec is None:
        known = ", ".join(repr(s.name) for s in model.inputs)
        raise BadRequestError(f"unknown input {name!r} for model {model.name!r} (inputs: {known})")
    if name in seen:
        raise BadRequestError(f"{where} is given twice")
    datatype = _datatype(where, item.get("datatype"), spec)
    shape = tensors.parse_shape(where, item.get("shape"))
    _check_shape(where, shape, spec)
    params = _parameters(where, item)
    if "binary_data_size" not in params:
        if "data" not in item:
            raise BadRequestError(f"{where}: give 'data', or 'binary_data_size' with binary data")
        limits.check(where, shape, model)
        return tensors.from_json(where, datatype, shape, item["data"]), 0
    if "data" in item:
        raise BadRequestError(f"{where}: give either 'data' or 'binary_data_size', not both")
    size = params["binary_data_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise BadRequestError(f"{where}: 'binary_data_size' must be a non-negative integer")
    expected = tensors.binary_size(where, datatype, shape)
    if expected is not None and size != expected:
        raise BadRequestError(
            f"{where}: binary_data_size is {size} bytes but shape {list(shape)} of {datatype.name} "
            f"needs {expected} bytes"
        )
    if offset + size > len(binary):
        raise BadRequestError(
            f"{where}: binary_data_size {size} runs past the end of the body "
            f"({len(binary) - offset} bytes left)"
        )
    limits.check(where, shape, model)
    return tensors.from_binary(where, datatype, shape, binary[offset : offset + size]), size


def _datatype(where: str, raw: Any, spec: TensorSpec) -> datatypes.Datatype:
    if raw not in datatypes.BY_NAME:
        raise BadRequestError(
            f"{where}: unknown datatype {raw!r} (one of {', '.join(datatypes.NAMES)})"
        )
    if raw != spec.datatype.name:
        raise BadRequestError(
            f"{where}: datatype {raw} given but the model expects {spec.datatype.name}"
        )
    return spec.datatype


def _check_shape(where: str, shape: tuple[int, ...], spec: TensorSpec) -> None:
    fits = len(shape) == len(spec.shape) and all(
        want < 0 or got == want for got, want in zip(shape, spec.shape, strict=True)
    )
    if not fits:
        raise BadRequestError(
            f"{where}: shape {list(shape)} does not match the model's {list(spec.shape)} "
            "(-1 is any size)"
        )


def _batch_size(feeds: dict[str, np.ndarray], model: ModelVersion) -> int:
    if not model.batched:
        return 1
    sizes = {name: a.shape[0] for name, a in feeds.items()}
    if len(set(sizes.values())) > 1:
        raise BadRequestError(f"inputs disagree on the batch size (first dimension): {sizes}")
    return next(iter(sizes.values()))


def _outputs(raw: Any, binary_default: bool, model: ModelVersion) -> tuple[OutputRequest, ...]:
    if raw is None:
        return tuple(OutputRequest(s.name, binary_default) for s in model.outputs)
    if not isinstance(raw, list):
        raise BadRequestError("'outputs' must be a list of requested outputs")
    requested: list[OutputRequest] = []
    for item in raw:
        name = _name(item)
        where = f"output {name!r}"
        spec = model.output(name)
        if spec is None:
            known = ", ".join(repr(s.name) for s in model.outputs)
            raise BadRequestError(
                f"unknown output {name!r} for model {model.name!r} (outputs: {known})"
            )
        if any(r.name == name for r in requested):
            raise BadRequestError(f"{where} is requested twice")
        params = _parameters(where, item)
        binary = _flag(where, params, "binary_data", binary_default)
        top_k = params.get("classification", 0)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise BadRequestError(f"{where}: 'classification' must be a positive integer")
        if top_k and spec.datatype.dtype.kind not in "iuf":
            raise BadRequestError(
                f"{where}: classification needs a numeric output, not {spec.datatype.name}"
            )
        requested.append(OutputRequest(name, binary, top_k))
    return tuple(requested) if requested else _outputs(None, binary_default, model)


def encode_response(
    model: ModelVersion, request: InferRequest, results: dict[str, np.ndarray]
) -> tuple[bytes, dict[str, str]]:
    """(body, headers): JSON alone, or JSON then binary outputs with the header length set."""
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for wanted in request.outputs:
        array = results[wanted.name]
        if wanted.classification:
            array = classify_output(
                array, wanted.classification, model.batched, _labels(model, wanted.name)
            )
        entry: dict[str, Any] = {
            "name": wanted.name,
            "datatype": datatypes.from_numpy(array.dtype).name,
            "shape": list(array.shape),
        }
        if wanted.binary:
            chunk = tensors.to_binary(array)
            entry["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            entry["data"] = tensors.json_ready(array)
        outputs.append(entry)
    response: dict[str, Any] = {"model_name": model.name, "model_version": str(model.version)}
    if request.id is not None:
        response["id"] = request.id
    response["outputs"] = outputs
    head = _dumps(response)
    if not chunks:
        return head, {"Content-Type": "application/json"}
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
    return b"".join([head, *chunks]), headers


def _dumps(response: dict[str, Any]) -> bytes:
    """orjson writes numpy arrays without building Python lists; NaN and infinities, which it
    would silently turn into null (it raises nothing), go to the standard library's NaN and
    Infinity instead. `json_ready` leaves only such outputs (and strings) as lists."""
    if not any(_non_finite(entry.get("data")) for entry in response["outputs"]):
        return orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    for entry in response["outputs"]:
        if isinstance(entry.get("data"), np.ndarray):
            entry["data"] = entry["data"].tolist()
    return json.dumps(response, separators=(",", ":")).encode()


def _non_finite(data: Any) -> bool:
    return isinstance(data, list) and any(
        isinstance(v, float) and not math.isfinite(v) for v in data
    )


def _labels(model: ModelVersion, output: str) -> tuple[str, ...] | None:
    meta = model.metadata
    if meta is None or meta.output.name != output:
        return None
    return meta.labels
