"""What `fold-onnx` did: plain data, readable and JSON-serialisable.

Every BatchNormalization in the input appears in the report exactly once, either as folded
(with the node it went into and from which side) or as skipped (with the rule that stopped it),
so a reader never has to guess why a BN is still in the output. Those entries are
training.fold_records', the records the PyTorch folder reports in too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from training.fold_records import FoldedBN, SkippedBN


@dataclass(frozen=True)
class TensorDiff:
    """How far one tensor of the folded model is from the original's."""

    name: str
    max_abs_diff: float
    max_rel_diff: float
    passed: bool  # numpy.allclose
    is_output: bool
    ratio: float  # largest |a - b| / (atol + rtol * |b|); at most 1 where allclose holds


@dataclass(frozen=True)
class OnnxVerification:
    """ONNX Runtime (all graph optimisations off) on the same inputs, original vs folded.

    Where a field means what training.fold_report.FoldVerification's does, it has its name
    (passed, probe, dtype, max_abs_diff, max_rel_diff); the rule differs, so the records do:
    this one is numpy.allclose per tensor, that one a bound per unit of (1 + max|y|).
    `max_rel_diff` is |a - b| / |b| over elements where |b| > atol (near-zero references make
    relative figures meaningless); `passed` is numpy.allclose on every compared tensor.
    """

    passed: bool
    dtype: str  # the model's least precise float type, which chose the default tolerance
    rtol: float
    atol: float
    max_abs_diff: float
    max_rel_diff: float
    worst_ratio: float  # largest |a - b| / (atol + rtol * |b|): at most 1 where allclose holds
    worst_tensor: str
    outputs_compared: int
    intermediates_compared: int
    probe_shapes: dict[str, list[int]]  # every input's shape, by input name
    probe: str  # where the inputs came from: "random (seed N)", "given", or their file
    failures: tuple[TensorDiff, ...] = ()

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"verification {verdict} (ONNX Runtime, optimisations off, {self.probe} "
            f"inputs {self.probe_shapes}): {self.outputs_compared} outputs and "
            f"{self.intermediates_compared} intermediate tensors compared; max |diff| "
            f"{self.max_abs_diff:.3g}, max rel diff {self.max_rel_diff:.3g}; tolerance "
            f"rtol={self.rtol:g}, atol={self.atol:g}, of which the closest tensor "
            f"({self.worst_tensor or '-'}) uses {self.worst_ratio:.1%}"
        )


@dataclass
class OnnxFoldReport:
    """The outcome of one `fold_onnx` (and, from `fold_onnx_file`, its checks)."""

    folded: list[FoldedBN] = field(default_factory=list)
    skipped: list[SkippedBN] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0
    bn_before: int = 0
    bn_after: int = 0
    notes: list[str] = field(default_factory=list)
    checker: str = "not run"
    verification: OnnxVerification | None = None

    @property
    def changed(self) -> bool:
        return bool(self.folded)

    def why_nothing_folded(self) -> str:
        """One sentence for the case a person asks about: the output equals the input."""
        if self.folded:
            return ""
        if self.bn_before == 0:
            return "nothing to fold: the model has no BatchNormalization node"
        return (
            f"nothing folded: all {self.bn_before} BatchNormalization node(s) were kept "
            "(reasons below); the model is written out unchanged"
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"changed": self.changed}

    def __str__(self) -> str:
        lines = [
            f"fold-onnx: {len(self.folded)} of {self.bn_before} BatchNormalization node(s) "
            f"folded, {self.bn_after} left; nodes {self.nodes_before} -> {self.nodes_after}"
        ]
        if not self.folded:
            lines.append(self.why_nothing_folded())
        lines += [f"  folded  {folded_line(item)}" for item in self.folded]
        lines += [
            f"  skipped {item.bn}: kept: {item.reason} [{item.kind}]" for item in self.skipped
        ]
        lines += [f"  note: {note}" for note in self.notes]
        lines.append(f"checker: {self.checker}")
        if self.verification is not None:
            lines.append(self.verification.summary())
            lines += [
                f"  mismatch {d.name}: max |diff| {d.max_abs_diff:.3g}, "
                f"max rel {d.max_rel_diff:.3g}"
                for d in self.verification.failures[:10]
            ]
        return "\n".join(lines)


def folded_line(item: FoldedBN) -> str:
    """`bn: folded into Conv conv (BN after it)`, naming what the fold went through."""
    into = ", ".join(f"{t} {n}" for t, n in zip(item.layer_types, item.layers, strict=True))
    side = "after" if item.direction == "bn-after" else "before"
    via = f" (through {item.via})" if item.via else ""
    return f"{item.bn}: folded into {into} (BN {side} it){via}"
