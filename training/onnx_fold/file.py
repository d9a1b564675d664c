"""`fold-onnx` on files: load (external data too), fold, check, verify, write atomically.

The input is only ever read. External data may only come from the model's own folder (a model
file is untrusted input, and a `location` of `../../etc/...` must not make us read elsewhere).
The output is written only after the checker and the verification pass, through a temporary
file and a rename, so a failed or interrupted run leaves no output, or the previous one, whole.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from training.atomic import atomic_write_bytes
from training.errors import OnnxFoldError, OnnxVerificationError
from training.onnx_fold.graph import tensors_with_data
from training.onnx_fold.report import OnnxFoldReport
from training.onnx_fold.rules import fold_onnx
from training.onnx_fold.verify import verify_onnx_fold

PathLike = str | os.PathLike[str]
EXTERNAL_THRESHOLD = 1024  # bytes: smaller tensors stay inline, as onnx.save does
_INLINE_LIMIT = 1_800_000_000  # stay clear of protobuf's 2 GiB message limit


def fold_onnx_file(
    in_path: PathLike,
    out_path: PathLike,
    *,
    inputs_npz: PathLike | None = None,
    verify: bool = True,
    intermediates: bool = False,
    fold_into_consumers: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
) -> OnnxFoldReport:
    """Fold `in_path` into `out_path` and return the report; nothing is written on error.

    `intermediates=True` also compares every tensor both models share, not only the outputs;
    `rtol`/`atol` override the default tolerance (training.tolerances: 1e-4, or 1e-2 for
    float16 models).

    Raises OnnxFoldError (unreadable input, unsafe external data, output that would overwrite
    the input, a folded model the checker rejects although the original passes) and
    OnnxVerificationError (the folded model differs from the original beyond tolerance).
    """
    source, target = Path(in_path), Path(out_path)
    model, external_files = load_model(source)
    _refuse_overwriting(source, target, external_files)
    folded, report = fold_onnx(model, fold_into_consumers=fold_into_consumers)
    report.checker = check(model, folded)
    if verify:
        inputs = load_inputs(Path(inputs_npz)) if inputs_npz is not None else None
        label = str(inputs_npz) if inputs_npz is not None else None
        result = verify_onnx_fold(
            model, folded, inputs, rtol=rtol, atol=atol, intermediates=intermediates, probe=label
        )
        report.verification = result
        if not result.passed:
            raise OnnxVerificationError(
                f"the folded model differs from the original: {result.summary()}; "
                f"nothing was written to {target}",
                result,
            )
    save_model(folded, target, external=bool(external_files))
    return report


def load_model(path: Path) -> tuple[onnx.ModelProto, list[Path]]:
    """The model with its external data loaded, and the external data files it read."""
    if not path.is_file():
        raise OnnxFoldError(f"{path}: no such file")
    try:
        model = onnx.load_model(path, load_external_data=False)
    except Exception as error:  # protobuf's DecodeError, OSError, ValueError, ...
        raise OnnxFoldError(f"{path} is not a readable ONNX model: {error}") from error
    folder = path.parent.resolve()
    files = sorted({_external_file(tensor, folder) for tensor in _external_tensors(model)})
    if files:
        onnx.external_data_helper.load_external_data_for_model(model, str(folder))
    return model, files


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [
        tensor
        for tensor in tensors_with_data(model.graph)
        if tensor.data_location == onnx.TensorProto.EXTERNAL
    ]


def _external_file(tensor: onnx.TensorProto, folder: Path) -> Path:
    location = {entry.key: entry.value for entry in tensor.external_data}.get("location", "")
    target = (folder / location).resolve()
    if not location or Path(location).is_absolute() or not target.is_relative_to(folder):
        raise OnnxFoldError(
            f"tensor '{tensor.name}' keeps its data at '{location}', outside the model's folder "
            f"{folder}; refusing to read it (move the data file next to the model)"
        )
    if not target.is_file():
        raise OnnxFoldError(f"tensor '{tensor.name}': external data file {target} is missing")
    return target


def _refuse_overwriting(source: Path, target: Path, external_files: list[Path]) -> None:
    protected = {source.resolve(), *external_files}
    written = {target.resolve(), _data_path(target).resolve()}
    clash = sorted(protected & written)
    if clash:
        raise OnnxFoldError(
            f"writing {target} would overwrite the input ({', '.join(map(str, clash))}); "
            "choose another output path"
        )


def check(original: onnx.ModelProto, folded: onnx.ModelProto) -> str:
    """onnx.checker on the folded model, full check first, then the basic one. A level counts
    only where the original passes it: some real models (IR 3 files, files with odd value_info)
    fail the checker and still run, and folding cannot be blamed for that."""
    if folded.ByteSize() >= _INLINE_LIMIT:
        return "skipped: the model is too large to check in memory"
    if _checker_error(folded, full=True) is None:
        return "passed (full check)"
    original_full = _checker_error(original, full=True)
    _blame_fold(original_full, folded, "full check")
    if _checker_error(folded, full=False) is None:
        return f"passed (basic check); the original fails the full check too: {original_full}"
    original_basic = _checker_error(original, full=False)
    _blame_fold(original_basic, folded, "basic check")
    return f"skipped: the original model fails it too ({original_basic})"


def _blame_fold(original_error: str | None, folded: onnx.ModelProto, level: str) -> None:
    """Raise if the original passes a check level the folded model fails."""
    if original_error is None:
        raise OnnxFoldError(
            f"the folded model fails onnx.checker ({level}) although the original passes: "
            f"{_checker_error(folded, full=level == 'full check')}"
        )


def _checker_error(model: onnx.ModelProto, *, full: bool) -> str | None:
    try:
        onnx.checker.check_model(model, full_check=full)
    except Exception as error:  # the checker and shape inference raise several unrelated types
        return str(error).strip().splitlines()[0][:200]
    return None


def load_inputs(path: Path) -> dict[str, np.ndarray]:
    """A .npz of named input arrays (numpy.savez), read without unpickling anything."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError) as error:
        raise OnnxFoldError(f"cannot read inputs from {path}: {error}") from error


def save_model(model: onnx.ModelProto, path: Path, *, external: bool) -> None:
    """Write atomically; large tensors go to `<name>.data` beside it when the input kept its
    weights outside, or when the model is too big for one protobuf message. The data file is
    written first, so the model file never points at data that is not there yet."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if external or out.ByteSize() >= _INLINE_LIMIT:
        data_path = _data_path(path)
        atomic_write_bytes(data_path, _move_to_external(out, data_path.name))
    atomic_write_bytes(path, out.SerializeToString())


def _data_path(path: Path) -> Path:
    return path.with_name(path.name + ".data")


def _move_to_external(model: onnx.ModelProto, location: str) -> bytes:
    """Move every raw tensor of at least EXTERNAL_THRESHOLD bytes into one blob, in place."""
    blob = bytearray()
    for tensor in tensors_with_data(model.graph):
        if not tensor.HasField("raw_data") or len(tensor.raw_data) < EXTERNAL_THRESHOLD:
            continue
        offset = -len(blob) % 4096 + len(blob)  # page-aligned, so runtimes can mmap it
        blob.extend(bytes(offset - len(blob)))
        blob.extend(tensor.raw_data)
        del tensor.external_data[:]
        fields = {"location": location, "offset": offset, "length": len(tensor.raw_data)}
        for key, value in fields.items():
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        tensor.ClearField("raw_data")
    return bytes(blob)
