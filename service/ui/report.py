"""How a model was made, as rows a page can show: training, fold report, verification, input.

The figures come from the model's own metadata (`foldserve.model_metadata`). Our exporter
writes them, but a repository may hold files from an older exporter or from elsewhere, so
every reader here tolerates a missing or odd-shaped field and shows what is there instead of
failing the page. Known keys get a readable label and format; unknown ones are shown as they
are, so nothing the file says is hidden.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from foldserve.model_metadata import InputSpec


@dataclass(frozen=True)
class Fact:
    """One labelled figure; `good` marks a pass (True) or a failure (False), else neutral."""

    label: str
    value: str
    good: bool | None = None


@dataclass(frozen=True)
class FoldedRow:
    bn: str
    layers: str
    direction: str
    exactness: str


@dataclass(frozen=True)
class SkippedRow:
    bn: str
    kind: str
    reason: str


@dataclass(frozen=True)
class CountRow:
    what: str
    before: str
    after: str


@dataclass(frozen=True)
class FoldView:
    folded: list[FoldedRow]
    skipped: list[SkippedRow]
    counts: list[CountRow]
    facts: list[Fact]


Format = Callable[[Any], str]


def show(value: Any) -> str:
    """A value as a person reads it: 65,834; 0.0001; yes; a, b; compact JSON for the rest."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, str | int | float) for v in value):
        return ", ".join(show(v) for v in value)
    return json.dumps(value, sort_keys=True, default=str)


def percent(value: Any) -> str:
    return (
        f"{value:.2%}"
        if isinstance(value, int | float) and not isinstance(value, bool)
        else show(value)
    )


def _recalibration(value: Any) -> str:
    if not isinstance(value, Mapping):
        return show(value) if value else "none"
    before, after = value.get("val_acc_before"), value.get("val_acc_after")
    return (
        f"{show(value.get('batches'))} batches; validation accuracy {percent(before)} → "
        f"{percent(after)}"
    )


TRAINING: list[tuple[str, str, Format]] = [
    ("data_source", "data", show),
    ("epochs", "epochs", show),
    ("val_acc", "validation accuracy", percent),
    ("val_loss", "validation loss", show),
    ("recalibration", "BatchNorm recalibration", _recalibration),
]
VERIFICATION: list[tuple[str, str, Format]] = [
    ("passed", "passed", show),
    ("examples", "validation examples", show),
    ("batch_sizes", "batch sizes run", show),
    ("accuracy_torch_unfolded", "accuracy, unfolded PyTorch", percent),
    ("accuracy_onnx_folded", "accuracy, folded ONNX", percent),
    ("argmax_agreement", "argmax agreement", percent),
    ("max_abs_diff", "largest absolute difference", show),
    ("max_rel_diff", "largest relative difference", show),
    ("bound", "allowed difference", show),
    ("tolerance", "tolerance", show),
]
FOLD_CHECK: list[tuple[str, str, Format]] = [
    ("passed", "fold self-check passed", show),
    (
        "probe_shape",
        "probe batch",
        lambda v: "×".join(map(str, v)) if isinstance(v, list) else show(v),
    ),
    ("dtype", "dtype", show),
    ("max_abs_diff", "largest difference, folded vs float64 original", show),
    ("bound", "allowed difference", show),
    ("unfolded_abs_diff", "the unfolded model's own error", show),
    ("worst_layer", "worst folded layer", show),
]
EXPORT: list[tuple[str, str, Format]] = [
    ("created", "exported", show),
    ("foldserve_version", "foldserve version", show),
    ("opset", "ONNX opset", show),
    ("dtype", "compute dtype", show),
]
COUNTS = ("parameters", "buffers", "batchnorms", "leaf_modules")


def facts(record: Any, known: list[tuple[str, str, Format]]) -> list[Fact]:
    """Known keys in order with their labels, then any other keys as they are."""
    if not isinstance(record, Mapping):
        return []
    rows = [
        Fact(label, fmt(record[key]), _verdict(key, record[key]))
        for key, label, fmt in known
        if key in record
    ]
    labelled = {key for key, _, _ in known}
    rows += [
        Fact(key.replace("_", " "), show(v)) for key, v in record.items() if key not in labelled
    ]
    return rows


def _verdict(key: str, value: Any) -> bool | None:
    return value if key == "passed" and isinstance(value, bool) else None


def fold_view(fold: Any) -> FoldView | None:
    """The fold report summary: pairs folded, BNs skipped and why, counts before and after."""
    if not isinstance(fold, Mapping) or not fold:
        return None
    folded = [
        FoldedRow(
            bn=show(p.get("bn")),
            layers=show(p.get("layers")),
            direction=show(p.get("direction")),
            exactness=show(p.get("exactness")),
        )
        for p in _dicts(fold.get("folded"))
    ]
    skipped = [
        SkippedRow(bn=show(s.get("bn")), kind=show(s.get("kind")), reason=show(s.get("reason")))
        for s in _dicts(fold.get("skipped"))
    ]
    before, after = _mapping(fold.get("before")), _mapping(fold.get("after"))
    keys = [k for k in COUNTS if k in before or k in after]
    keys += sorted((set(before) | set(after)) - set(COUNTS))
    counts = [CountRow(k.replace("_", " "), show(before.get(k)), show(after.get(k))) for k in keys]
    extra: list[Fact] = []
    if "max_rel_weight_change" in fold:
        extra.append(Fact("largest relative weight change", show(fold["max_rel_weight_change"])))
    if "foldable_left" in fold:
        left = fold["foldable_left"]
        extra.append(
            Fact("foldable BNs left", show(left), left == 0 if isinstance(left, int) else None)
        )
    return FoldView(folded, skipped, counts, extra + facts(fold.get("verification"), FOLD_CHECK))


def input_facts(spec: InputSpec) -> list[Fact]:
    """The preprocessing a picture or array goes through before the model sees it."""
    rows = [
        Fact("input tensor", spec.name),
        Fact("layout", spec.layout),
        Fact("shape (no batch axis)", " × ".join(map(str, spec.shape))),
        Fact("value range", f"{show(spec.value_range[0])} to {show(spec.value_range[1])}"),
        Fact("normalisation", f"(raw − {show(list(spec.mean))}) / {show(list(spec.std))}"),
    ]
    if spec.color_mode:
        rows.append(Fact("colour mode", spec.color_mode))
    if spec.resize:
        rows.append(Fact("resize filter", spec.resize))
    if spec.ink:
        ink = (
            "high (strokes are large values; pictures are inverted)"
            if spec.ink == "high"
            else "low"
        )
        rows.append(Fact("ink", ink))
    return rows


def _dicts(value: Any) -> list[Mapping[str, Any]]:
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}
