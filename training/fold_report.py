"""What a PyTorch fold did: the report, its self-check, its printing and JSON form.

Kept apart from the rewrite so callers (the CLI, the exporter, the ONNX metadata) can read a
report without the graph machinery. Its folded and skipped entries are training.fold_records',
the records the ONNX folder reports in too.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from training.fold_records import FoldedBN, SkippedBN

# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class ModelCounts:
    parameters: int
    buffers: int
    leaf_modules: int
    batchnorms: int


@dataclass(frozen=True)
class FoldVerification:
    """Folded model vs a float64 eval copy of the original on one probe batch."""

    probe: str
    probe_shape: tuple[int, ...]
    dtype: str
    max_abs_diff: float
    max_rel_diff: float  # max_abs_diff / max|y_ref|
    unfolded_abs_diff: float  # the original model's own error in its dtype
    bound: float  # 2 * unfolded_abs_diff + tolerance * (1 + max|y_ref|)
    passed: bool
    worst_layer: str | None
    worst_layer_diff: float  # max|a - a_ref| / (1 + max|a_ref|) at that layer's output


@dataclass(frozen=True)
class FoldReport:
    model: str
    folded: tuple[FoldedBN, ...]
    skipped: tuple[SkippedBN, ...]
    before: ModelCounts
    after: ModelCounts
    foldable_left: int  # BNs a fresh analysis of the folded graph would still fold (want 0)
    verification: FoldVerification | None = None

    @property
    def max_rel_weight_change(self) -> float:
        return max((p.max_rel_weight_change for p in self.folded), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["max_rel_weight_change"] = self.max_rel_weight_change
        return _json_safe(data)

    def __str__(self) -> str:
        return "\n".join(_report_lines(self))


# --------------------------------------------------------------------------- printing


def _report_lines(report: FoldReport) -> Iterator[str]:
    b, a = report.before, report.after
    yield (
        f"BatchNorm folding of {report.model}: {len(report.folded)} folded, "
        f"{len(report.skipped)} skipped, {report.foldable_left} foldable left"
    )
    yield f"  parameters {b.parameters:,} -> {a.parameters:,}"
    yield f"  buffers {b.buffers:,} -> {a.buffers:,}"
    yield f"  leaf modules {b.leaf_modules} -> {a.leaf_modules}"
    yield f"  BatchNorms {b.batchnorms} -> {a.batchnorms}"
    yield f"  largest relative weight change: {report.max_rel_weight_change:.3g}"
    if report.folded:
        yield "folded:"
        width = max(len(p.bn) for p in report.folded)
        for p in report.folded:
            layers = ", ".join(f"{n} ({t})" for n, t in zip(p.layers, p.layer_types, strict=True))
            yield f"  {p.bn:<{width}}  {p.direction:<9}  {p.exactness:<10}  into {layers}"
    if report.skipped:
        yield "skipped:"
        for s in report.skipped:
            yield f"  {s.bn} [{s.kind}]: {s.reason}"
    yield from _verification_lines(report.verification)


def _verification_lines(check: FoldVerification | None) -> Iterator[str]:
    if check is None:
        yield "verification: not run"
        return
    shape = "x".join(map(str, check.probe_shape))
    yield (
        f"verification ({check.probe} probe {shape}, {check.dtype}): "
        f"{'passed' if check.passed else 'FAILED'}"
    )
    yield (
        f"  max abs diff {check.max_abs_diff:.3g} (rel {check.max_rel_diff:.3g}) vs float64 "
        f"original; unfolded model's own diff {check.unfolded_abs_diff:.3g}; "
        f"allowed {check.bound:.3g}"
    )
    if check.worst_layer:
        yield f"  worst folded layer: {check.worst_layer} ({check.worst_layer_diff:.3g})"


def _json_safe(value: Any) -> Any:
    """Plain JSON types only: tuples become lists, and non-finite floats become strings."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
