"""Checking a fold: run folded and original graphs side by side and find the worst layer.

The reference is a float64 copy of the unfolded graph, so the folded model's error is measured
against the exact function, next to the unfolded model's own rounding error in its dtype: a fold
may at most double that error, plus a tolerance scaled by the output's magnitude.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, fx

from training import tolerances
from training.fold_report import FoldVerification


class Recorder(fx.Interpreter):
    """Runs a graph, remembering shapes, non-tensor values and copies of chosen outputs."""

    def __init__(self, graph_module: fx.GraphModule, keep: frozenset[str] = frozenset()) -> None:
        super().__init__(graph_module)
        self.keep = keep
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.values: dict[str, Any] = {}
        self.kept: dict[str, Tensor] = {}
        self.result: Any = None

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, Tensor):
            self.shapes[n.name] = tuple(out.shape)
            if n.name in self.keep:  # copy now: an in-place ReLU may overwrite it later
                self.kept[n.name] = out.detach().clone()
        elif _is_plain(out):
            self.values[n.name] = out
        return out

    def run_recorded(self, x: Tensor) -> Recorder:
        with torch.no_grad():
            self.result = self.run(x)
        return self


def _is_plain(value: Any) -> bool:
    """Sizes, ints and other constants a layout op may take as arguments."""
    if isinstance(value, tuple | list):
        return all(_is_plain(v) for v in value)
    return isinstance(value, int | float | bool | str | type(None))


def verify_fold(
    reference: fx.GraphModule,
    folded: fx.GraphModule,
    probe: Tensor,
    unfolded_output: Any,
    value_map: Mapping[str, tuple[str, str]],
    tolerance: float | None,
) -> FoldVerification:
    ref_names = frozenset(ref for ref, _ in value_map.values())
    ref = Recorder(reference.double(), ref_names).run_recorded(probe.double())
    out = Recorder(folded, frozenset(value_map)).run_recorded(probe)
    y_ref, y, y_unfolded = _tensors(ref.result), _tensors(out.result), _tensors(unfolded_output)
    scale = max((_max_abs(t) for t in y_ref), default=0.0)
    err, unfolded_err = _max_diff(y, y_ref), _max_diff(y_unfolded, y_ref)
    dtype = str(probe.dtype).removeprefix("torch.")
    allowed = tolerance if tolerance is not None else tolerances.tolerance("fold", dtype)
    bound = 2 * unfolded_err + allowed * (1 + scale)
    worst, worst_diff = None, 0.0
    for node, (ref_node, label) in value_map.items():
        a_ref = ref.kept[ref_node]
        diff = _max_diff([out.kept[node]], [a_ref]) / (1 + _max_abs(a_ref))
        if worst is None or diff > worst_diff:
            worst, worst_diff = label, diff
    return FoldVerification(
        probe="",
        probe_shape=tuple(probe.shape),
        dtype=dtype,
        max_abs_diff=err,
        max_rel_diff=err / scale if scale > 0 else err,
        unfolded_abs_diff=unfolded_err,
        bound=bound,
        passed=err <= bound,
        worst_layer=worst,
        worst_layer_diff=worst_diff,
    )


def _max_abs(t: Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [t for item in value for t in _tensors(item)]
    return []


def _max_diff(values: list[Tensor], references: list[Tensor]) -> float:
    """Largest absolute difference; inf on any shape mismatch or NaN."""
    if len(values) != len(references):
        return math.inf
    worst = 0.0
    for a, b in zip(values, references, strict=True):
        if a.shape != b.shape:
            return math.inf
        if a.numel():
            diff = float((a.double() - b.double()).abs().max())
            worst = math.inf if math.isnan(diff) else max(worst, diff)
    return worst
