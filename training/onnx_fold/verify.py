"""Prove a fold: run the original and the folded model in ONNX Runtime on the same inputs.

Both run with every graph optimisation disabled (ORT_DISABLE_ALL): with them on, ONNX Runtime
fuses Conv+BN itself and would compare its own fold with ours, hiding a wrong rewrite. The
inputs are the caller's, or random ones that honour each input's dtype; a dynamic or symbolic
dimension becomes `dynamic_dim` (2 by default, so batch-dependent mistakes show), one value per
symbol name. Every graph output is compared and, on request, every intermediate tensor both
models share (the folder keeps names meaning the same value, so those comparisons are exact
evidence; they also catch models whose outputs are saturated, like the zoo's "light" ones).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from training import tolerances
from training.errors import OnnxVerificationError
from training.onnx_fold.report import OnnxVerification, TensorDiff

_PROTOBUF_LIMIT = 2**31 - 1
# Float element types from the least precise up: a model is judged at its least precise one.
_PRECISIONS = {
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.DOUBLE: "float64",
}
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.object_,
}


def verify_onnx_fold(
    original: onnx.ModelProto,
    folded: onnx.ModelProto,
    inputs: Mapping[str, np.ndarray] | None = None,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    intermediates: bool = False,
    seed: int = 0,
    dynamic_dim: int = 2,
    probe: str | None = None,
) -> OnnxVerification:
    """Compare `folded` with `original`; returns the figures, `passed` says if all are close.

    Tolerances default to training.tolerances' "fold-onnx" entry for the model's least precise
    float type among its inputs, outputs and weights (1e-4; 1e-2 for float16 and bfloat16).
    `probe` names the inputs in the result (the file they came from); by default "given" or
    "random (seed N)". Raises OnnxVerificationError when the two cannot be compared at all
    (different inputs or outputs, unusable `inputs`, a model ONNX Runtime refuses).
    """
    dtype = precision(original)
    default = tolerances.tolerance("fold-onnx", dtype)
    rtol, atol = (default if rtol is None else rtol), (default if atol is None else atol)
    _require_same_interface(original, folded)
    extra = _shared_intermediates(original, folded) if intermediates else []
    with _session(original, extra) as reference:
        feeds = _feeds(reference.get_inputs(), inputs, seed, dynamic_dim)
        expected = _run(reference, feeds, "the original model")
    with _session(folded, extra) as candidate:
        got = _run(candidate, feeds, "the folded model")
    outputs = [o.name for o in original.graph.output]
    diffs = [
        compare(name, want, have, rtol, atol, is_output=i < len(outputs))
        for i, (name, want, have) in enumerate(zip([*outputs, *extra], expected, got, strict=True))
    ]
    probe = probe or ("given" if inputs is not None else f"random (seed {seed})")
    return _summarise(diffs, dtype, rtol, atol, feeds, probe, len(outputs))


def _summarise(
    diffs: list[TensorDiff],
    dtype: str,
    rtol: float,
    atol: float,
    feeds: dict[str, Any],
    probe: str,
    n_outputs: int,
) -> OnnxVerification:
    worst = max(diffs, key=lambda d: d.ratio, default=None)
    return OnnxVerification(
        passed=all(d.passed for d in diffs),
        dtype=dtype,
        rtol=rtol,
        atol=atol,
        max_abs_diff=max((d.max_abs_diff for d in diffs), default=0.0),
        max_rel_diff=max((d.max_rel_diff for d in diffs), default=0.0),
        worst_ratio=worst.ratio if worst else 0.0,
        worst_tensor=worst.name if worst else "",
        outputs_compared=n_outputs,
        intermediates_compared=len(diffs) - n_outputs,
        probe_shapes={name: list(np.shape(value)) for name, value in feeds.items()},
        probe=probe,
        failures=tuple(d for d in diffs if not d.passed),
    )


# --------------------------------------------------------------------------- comparison


def compare(
    name: str, expected: Any, got: Any, rtol: float, atol: float, *, is_output: bool = True
) -> TensorDiff:
    """numpy.allclose(got, expected) generalised to what ONNX Runtime returns: tensors of any
    dtype (strings and bools compare equal-or-not), sequences, and maps (ZipMap outputs)."""
    max_abs, max_rel, ratio, passed = _diff(expected, got, rtol, atol)
    return TensorDiff(name, max_abs, max_rel, passed, is_output, ratio)


def _diff(expected: Any, got: Any, rtol: float, atol: float) -> tuple[float, float, float, bool]:
    if isinstance(expected, list | tuple):
        if not isinstance(got, list | tuple) or len(got) != len(expected):
            return _MISMATCH
        return _combine([_diff(e, g, rtol, atol) for e, g in zip(expected, got, strict=True)])
    if isinstance(expected, dict):
        if not isinstance(got, dict) or set(got) != set(expected):
            return _MISMATCH
        return _combine([_diff(expected[k], got[k], rtol, atol) for k in expected])
    return _array_diff(np.asarray(expected), np.asarray(got), rtol, atol)


_MISMATCH = (float("inf"), float("inf"), float("inf"), False)


def _combine(parts: list[tuple[float, float, float, bool]]) -> tuple[float, float, float, bool]:
    if not parts:
        return 0.0, 0.0, 0.0, True
    return (
        max(p[0] for p in parts),
        max(p[1] for p in parts),
        max(p[2] for p in parts),
        all(p[3] for p in parts),
    )


def _array_diff(
    expected: np.ndarray, got: np.ndarray, rtol: float, atol: float
) -> tuple[float, float, float, bool]:
    if expected.shape != got.shape:
        return _MISMATCH
    if expected.size == 0:
        return 0.0, 0.0, 0.0, True
    if expected.dtype.kind not in "fiu" or got.dtype.kind not in "fiu":  # strings, bools, ...
        return (0.0, 0.0, 0.0, True) if np.array_equal(expected, got) else _MISMATCH
    want, have = expected.astype(np.float64), got.astype(np.float64)
    same = (want == have) | (np.isnan(want) & np.isnan(have))
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(same, 0.0, np.abs(have - want))
    diff = np.where(np.isnan(diff), np.inf, diff)
    magnitude = np.abs(np.where(np.isfinite(want), want, 0.0))
    significant = magnitude > atol
    max_rel = (
        float((diff[significant] / magnitude[significant]).max()) if significant.any() else 0.0
    )
    allowed = atol + rtol * magnitude
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = float(np.where(diff == 0, 0.0, diff / allowed).max())
    ok = bool(np.allclose(have, want, rtol=rtol, atol=atol, equal_nan=True))
    return float(diff.max()), max_rel, ratio, ok


# --------------------------------------------------------------------------- running


@contextlib.contextmanager
def _session(model: onnx.ModelProto, extra_outputs: list[str]) -> Iterator[ort.InferenceSession]:
    """An ORT_DISABLE_ALL session on `model` whose outputs also include `extra_outputs`."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in extra_outputs)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4  # failures surface as our exceptions; no log noise
    if probe.ByteSize() < _PROTOBUF_LIMIT:
        yield _open(probe.SerializeToString(), options)
        return
    with tempfile.TemporaryDirectory(prefix="fold-onnx-verify-") as folder:
        path = Path(folder) / "model.onnx"  # over 2 GiB: ORT needs a file + external data
        onnx.save_model(probe, path, save_as_external_data=True, location="model.data")
        yield _open(str(path), options)


def _open(source: bytes | str, options: ort.SessionOptions) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as error:
        raise OnnxVerificationError(f"ONNX Runtime cannot load the model: {error}") from error


def _run(session: ort.InferenceSession, feeds: dict[str, np.ndarray], which: str) -> list[Any]:
    try:
        return session.run(None, feeds)
    except Exception as error:
        shapes = {name: list(np.shape(value)) for name, value in feeds.items()}
        hint = "" if "folded" in which else "; pass inputs the model accepts (--inputs data.npz)"
        raise OnnxVerificationError(
            f"ONNX Runtime cannot run {which} on inputs {shapes}: {error}{hint}"
        ) from error


def _feeds(
    declared: list[Any], given: Mapping[str, np.ndarray] | None, seed: int, dynamic_dim: int
) -> dict[str, np.ndarray]:
    if given is not None:
        return _check_given(declared, given)
    rng = np.random.default_rng(seed)
    symbols: dict[str, int] = {}
    return {arg.name: _random_input(arg, rng, symbols, dynamic_dim) for arg in declared}


def _random_input(
    arg: Any, rng: np.random.Generator, symbols: dict[str, int], dynamic_dim: int
) -> np.ndarray:
    dtype = _ORT_DTYPES.get(arg.type)
    if dtype is None:
        raise OnnxVerificationError(
            f"cannot make a random value for input '{arg.name}' of type {arg.type}; "
            "pass your own inputs"
        )
    shape = [
        dim if isinstance(dim, int) and dim >= 0 else symbols.setdefault(str(dim), dynamic_dim)
        for dim in arg.shape
    ]
    if dtype is np.object_:
        return np.full(shape, "a", dtype=object)
    if dtype is np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(dtype, np.integer):  # small and non-negative: safe as indices and sizes
        return rng.integers(0, 4, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def _check_given(declared: list[Any], given: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [arg.name for arg in declared]
    missing, unknown = set(names) - set(given), set(given) - set(names)
    if missing or unknown:
        raise OnnxVerificationError(
            f"the inputs do not match the model: missing {sorted(missing)}, unknown "
            f"{sorted(unknown)}; the model takes {names}"
        )
    feeds = {}
    for arg in declared:
        want, value = _ORT_DTYPES.get(arg.type), np.asarray(given[arg.name])
        if want is not None and value.dtype != want:
            if not np.can_cast(value.dtype, want, casting="same_kind"):
                raise OnnxVerificationError(
                    f"input '{arg.name}' has dtype {value.dtype}, the model wants {arg.type}"
                )
            value = value.astype(want)  # e.g. numpy's default float64 for a float32 input
        feeds[arg.name] = value
    return feeds


# --------------------------------------------------------------------------- model facts


def _require_same_interface(original: onnx.ModelProto, folded: onnx.ModelProto) -> None:
    before = [o.name for o in original.graph.output]
    after = [o.name for o in folded.graph.output]
    if before != after:
        raise OnnxVerificationError(f"the folded model's outputs {after} differ from {before}")


def _shared_intermediates(original: onnx.ModelProto, folded: onnx.ModelProto) -> list[str]:
    """Tensors produced by top-level nodes of both models, graph outputs excluded."""
    outputs = {o.name for o in [*original.graph.output, *folded.graph.output]}
    produced = {name for node in folded.graph.node for name in node.output if name}
    ordered = [name for node in original.graph.node for name in node.output if name]
    return [name for name in dict.fromkeys(ordered) if name in produced and name not in outputs]


def precision(model: onnx.ModelProto) -> str:
    """The least precise float type among the inputs, outputs and weights ("float32" if none)."""
    graph = model.graph
    io = [v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]]
    present = {*io, *(t.data_type for t in graph.initializer)}
    return next((name for elem, name in _PRECISIONS.items() if elem in present), "float32")
