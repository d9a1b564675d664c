"""Fold-and-export: checkpoint → eval → fold → ONNX → checks → proof → model repository.

An export proves itself before anything is written: the ONNX file passes `onnx.checker`'s full
check, holds no BatchNormalization in training mode (checked in the file, not assumed from the
code), and ONNX Runtime's outputs on the real validation data match the *unfolded* PyTorch model
within `tolerance·(1 + max|y|)`. Only then is the version folder published, atomically.

Know the exporter: torch 2.13's `torch.onnx.export` folds Conv/ConvTranspose/Gemm→BN by itself
when it optimises the graph (onnxscript's rewrite rules). `export_onnx(..., keep_batchnorm=True)`
turns that off (dynamo export with `optimize=False`), which is how an honestly unfolded reference
file is made; it then folds constants only, because the raw export computes each bias-free
Conv's zero bias at run time (Shape, Expand, CastLike), which would stop ONNX Runtime from fusing
Conv+BN at load as it does for any ordinary file, and make the unfolded file look slower than
an unfolded model is.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import itertools
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir
import onnxscript.optimizer
import torch
from torch import nn

from foldserve import __version__
from foldserve.model_metadata import InputSpec, ModelMetadata, OutputSpec
from training import repository, tolerances
from training.bn.layers import require_eval_mode
from training.data import DataInfo
from training.errors import ExportError, ExportVerificationError
from training.fold import FoldReport, fold_model
from training.train import load_trained_model, validation_data

log = logging.getLogger(__name__)

OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
# Compute dtypes an export can target; inputs and outputs stay float32 in every case.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Verification runs these batch sizes first, so a broken dynamic batch axis shows up.
CHECK_BATCHES = (1, 7, 64)


@dataclass(frozen=True)
class ExportResult:
    path: Path
    name: str
    version: int
    fold_report: FoldReport
    verification: dict[str, Any]
    metadata: ModelMetadata


# --------------------------------------------------------------------------- ONNX export


class ReducedPrecision(nn.Module):
    """Runs a model in fp16/bf16 behind a float32 interface.

    Clients keep sending and receiving FP32 (no client change, no fp16 encoding in JSON); the
    Casts at both ends are exported into the graph, and everything between runs in `dtype`.
    """

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner = inner
        self.dtype = dtype
        self.input_shape = getattr(inner, "input_shape", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(self.dtype)).float()


def fold_for_dtype(
    model: nn.Module, calibration: torch.Tensor, dtype: str
) -> tuple[nn.Module, FoldReport]:
    """Fold in float64 and cast once to the target dtype, refusing weights it cannot hold.

    For fp32 the folder's own float64 arithmetic already casts once. For fp16/bf16, folding the
    float32 model and casting again would round twice, so a float64 copy is folded instead.
    """
    if dtype == "fp32":
        return fold_model(model, calibration)
    target = DTYPES[dtype]
    folded64, report = fold_model(copy.deepcopy(model).double(), calibration.double())
    limit = torch.finfo(target).max
    for name, tensor in itertools.chain(folded64.named_parameters(), folded64.named_buffers()):
        peak = float(tensor.detach().abs().max()) if tensor.numel() else 0.0
        if tensor.is_floating_point() and peak > limit:
            raise ExportError(
                f"{name} holds {peak:.3g} after folding, beyond {dtype}'s "
                f"largest value {limit:.3g}; export in fp32"
            )
    return ReducedPrecision(folded64.to(target), target).eval(), report


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter warns about its own internals and logs missing torchvision ops: noise."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_onnx(
    model: nn.Module, example: torch.Tensor, *, keep_batchnorm: bool = False
) -> onnx.ModelProto:
    """Export an eval-mode model with a dynamic batch axis, input `input`, output `logits`."""
    model.eval()  # the classic mistake is exporting in training mode: never
    require_eval_mode(model, "export to ONNX")
    batch = torch.export.Dim("batch", min=1)
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            opset_version=OPSET,
            optimize=not keep_batchnorm,
            verbose=False,
        )
    proto = _constants_folded(program.model) if keep_batchnorm else program.model_proto
    refuse_training_mode_batchnorm(proto)
    return proto


def _constants_folded(model: onnx_ir.Model) -> onnx.ModelProto:
    """Constant folding and dead-node removal, none of the optimiser's rewrites (BN stays)."""
    with _quiet_exporter():
        onnxscript.optimizer.fold_constants(model)
        onnxscript.optimizer.remove_unused_nodes(model)
    return onnx_ir.to_proto(model)


def check_onnx(proto: onnx.ModelProto, dtype: str = "fp32") -> None:
    """onnx.checker's full check (types and shapes inferred through the graph), as ExportError."""
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        hint = f" ({dtype} is not a type every ONNX operator accepts; try fp16)" * (dtype == "bf16")
        raise ExportError(
            f"onnx.checker rejects the exported model{hint}: {str(exc).strip().splitlines()[0]}"
        ) from None


def batchnorm_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in proto.graph.node if n.op_type == "BatchNormalization"]


def refuse_training_mode_batchnorm(proto: onnx.ModelProto) -> None:
    """A served graph must normalise with stored statistics: check every BN node in the file."""
    for node in batchnorm_nodes(proto):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        used_outputs = [o for o in node.output[1:] if o]
        if attrs.get("training_mode", 0) == 1 or used_outputs:
            raise ExportError(
                f"BatchNormalization node {node.name!r} is in training mode (it would use "
                "batch statistics): export the model in eval mode"
            )


# --------------------------------------------------------------------------- verification


def verify_against_torch(
    proto_bytes: bytes,
    reference: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    tolerance: float | None = None,
) -> dict[str, Any]:
    """Run the file in ONNX Runtime and the unfolded model in PyTorch on the same data.

    `tolerance` defaults to training.tolerances' float32 entry for "export".
    """
    import onnxruntime as ort

    tolerance = tolerance if tolerance is not None else tolerances.tolerance("export", "float32")
    try:
        session = ort.InferenceSession(proto_bytes, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types, one per status code
        raise ExportError(
            f"ONNX Runtime (CPU) cannot load the exported model, so it cannot be verified: "
            f"{str(exc).strip().splitlines()[0]}"
        ) from None
    reference.eval()
    onnx_out, torch_out = [], []
    for chunk in _chunks(len(x)):
        part = x[chunk]
        onnx_out.append(session.run([OUTPUT_NAME], {INPUT_NAME: part})[0])
        with torch.inference_mode():
            torch_out.append(reference(torch.from_numpy(part)).numpy())
    got, want = np.concatenate(onnx_out), np.concatenate(torch_out)
    max_abs = float(np.max(np.abs(got - want)))
    scale = float(np.max(np.abs(want)))
    bound = tolerance * (1 + scale)
    return {
        "examples": len(x),
        "batch_sizes": sorted({len(range(*c.indices(len(x)))) for c in _chunks(len(x))}),
        "max_abs_diff": max_abs,
        "max_rel_diff": max_abs / scale if scale > 0 else 0.0,
        "bound": bound,
        "tolerance": tolerance,
        "passed": max_abs <= bound,
        "argmax_agreement": float(np.mean(got.argmax(1) == want.argmax(1))),
        "accuracy_torch_unfolded": float(np.mean(want.argmax(1) == y)),
        "accuracy_onnx_folded": float(np.mean(got.argmax(1) == y)),
    }


def _chunks(n: int, size: int = 256) -> list[slice]:
    """Batches of 1, 7 and 64 first (the dynamic axis at work), then `size` at a time."""
    out, start = [], 0
    for length in (*CHECK_BATCHES, *([size] * (n // size + 1))):
        if start >= n:
            break
        out.append(slice(start, min(n, start + length)))
        start += length
    return out


# --------------------------------------------------------------------------- the pipeline


def build_metadata(
    name: str,
    state: dict[str, Any],
    checkpoint_sha256: str,
    report: FoldReport,
    verification: dict[str, Any],
    dtype: str = "fp32",
) -> ModelMetadata:
    info = DataInfo.from_dict(state["data_info"])
    history = state.get("history") or [{}]
    return ModelMetadata(
        labels=info.label_names,
        input=InputSpec(
            name=INPUT_NAME,
            layout=info.layout,
            shape=info.input_shape,
            mean=info.normalization.mean,
            std=info.normalization.std,
            value_range=info.value_range,
            color_mode=info.color_mode,
            resize=info.resize or ("bilinear" if info.layout == "NCHW" else None),
            ink=info.ink,
        ),
        output=OutputSpec(name=OUTPUT_NAME, kind="logits", softmax_applied=False),
        model={
            "name": name,
            "architecture": state["model"]["name"],
            "config": state["model"]["config"],
        },
        checkpoint_sha256=checkpoint_sha256,
        training={
            "epochs": state["epoch"],
            "val_acc": history[-1].get("val_acc"),
            "val_loss": history[-1].get("val_loss"),
            "recalibration": state.get("recalibration"),
            "data_source": info.source,
        },
        fold=fold_summary(report),
        verification=verification,
        export={
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "foldserve_version": __version__,
            "opset": OPSET,
            "dtype": str(DTYPES[dtype]).removeprefix("torch."),
            "io_dtype": "float32",
        },
    )


def fold_summary(report: FoldReport) -> dict[str, Any]:
    full = report.to_dict()
    return {
        "folded": [
            {k: p[k] for k in ("bn", "layers", "direction", "exactness")} for p in full["folded"]
        ],
        "skipped": full["skipped"],
        "before": full["before"],
        "after": full["after"],
        "foldable_left": full["foldable_left"],
        "max_rel_weight_change": full["max_rel_weight_change"],
        "verification": full.get("verification"),
    }


def export_checkpoint(
    checkpoint: str | Path,
    repository_dir: str | Path,
    name: str,
    version: int | None = None,
    tolerance: float | None = None,
    dtype: str = "fp32",
) -> ExportResult:
    """The whole job; raises before writing anything if any check fails.

    `dtype` is the compute precision inside the file ("fp32", "fp16" or "bf16"); `tolerance`
    defaults to training.tolerances' "export" entry for that dtype.
    """
    checkpoint, repository_dir = Path(checkpoint), Path(repository_dir)
    repository.check_name(name)
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if tolerance is None:
        tolerance = tolerances.tolerance("export", str(DTYPES[dtype]).removeprefix("torch."))
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest() if checkpoint.is_file() else ""
    model, state = load_trained_model(checkpoint)
    val_x, val_y = validation_data(state)

    folded, report = fold_for_dtype(model, torch.from_numpy(val_x[:64]), dtype)
    log.debug("%s", report)
    proto = export_onnx(folded, torch.from_numpy(val_x[:2]))
    check_onnx(proto, dtype)
    verification = verify_against_torch(proto.SerializeToString(), model, val_x, val_y, tolerance)
    verification["dtype"] = dtype
    if not verification["passed"]:
        raise ExportVerificationError(
            f"exported model differs from the unfolded PyTorch model by "
            f"{verification['max_abs_diff']:.3g} (allowed {verification['bound']:.3g}) on the "
            "validation data; nothing was written"
        )

    # Through JSON and back, so the result equals what a reader of the file gets (tuples
    # become lists): the metadata returned is exactly the metadata written.
    built = build_metadata(name, state, digest, report, verification, dtype)
    metadata = ModelMetadata.from_props(built.to_props())
    onnx.helper.set_model_props(proto, metadata.to_props())
    version = version or repository.next_version(repository_dir, name)
    folder = repository.publish(
        repository_dir, name, version, {repository.MODEL_FILE: proto.SerializeToString()}
    )
    path = folder / repository.MODEL_FILE
    return ExportResult(path, name, version, report, verification, metadata)
