"""Every error the training half raises on purpose, in one place.

Every error a person can fix (a bad path, an unknown model, a refused checkpoint, a diverged run,
a fold or an export that does not verify) derives from `TrainingError`; the CLI prints those as
one line and exits non-zero. Anything else is a bug and keeps its traceback. This module imports
nothing heavy (no torch, no onnx), so the CLI can catch these without importing torch, and the
ONNX folder, which never imports torch, raises them too.

Two exceptions are not errors and stay where they are used: the ONNX rules' `NotFoldable` and
the PyTorch folder's `_NotConstantError` are verdicts that end up as a report's skip reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from training.fold_report import FoldReport, FoldVerification
    from training.onnx_fold.report import OnnxVerification


class TrainingError(Exception):
    """Base of every error whose message tells the user what to fix."""


class ConfigError(TrainingError, ValueError):
    """An invalid training or model option."""


class UnknownModelError(ConfigError):
    """A model name that is not in the registry."""


class DataError(TrainingError, ValueError):
    """A data source that cannot be read as the caller asked."""


class CheckpointError(TrainingError, ValueError):
    """A checkpoint that cannot be loaded safely, or resumed with another configuration."""


class TrainingDivergedError(TrainingError, RuntimeError):
    """The loss became NaN or infinite; nothing from that epoch is saved."""


class TrainingModeError(TrainingError, RuntimeError):
    """A model evaluated, folded or exported while its BatchNorms would use batch statistics."""


# --------------------------------------------------------------------------- PyTorch folding


class FoldError(TrainingError):
    """Base class of the PyTorch folder's errors."""


class MissingProbeInputError(FoldError, ValueError):
    """No example input was given and the model has no ``input_shape`` to build one from."""


class UntraceableModelError(FoldError, ValueError):
    """torch.fx cannot trace the model (data-dependent control flow, for instance)."""


class FoldRangeError(FoldError, ValueError):
    """A folded weight does not fit the layer's dtype (e.g. a near-zero variance in float16).

    The folder turns it into a skipped BatchNorm ("dtype-range"); it only escapes from direct
    calls of the arithmetic.
    """


class FoldVerificationError(FoldError, RuntimeError):
    """The folded model differs from the original by more than the tolerance."""

    def __init__(self, report: FoldReport, check: FoldVerification) -> None:
        self.report = report
        self.max_abs_diff = check.max_abs_diff
        self.worst_layer = check.worst_layer
        super().__init__(
            f"folded model differs from the original by {check.max_abs_diff:.3g} "
            f"(allowed {check.bound:.3g}); worst folded layer: {check.worst_layer} "
            f"(normalised difference {check.worst_layer_diff:.3g})"
        )


# --------------------------------------------------------------------------- ONNX folding


class OnnxFoldError(TrainingError):
    """The model cannot be folded or written as asked (bad path, unsafe external data, ...)."""


class OnnxVerificationError(OnnxFoldError):
    """The folded model does not compute what the original computes, within tolerance."""

    def __init__(self, message: str, result: OnnxVerification | None = None) -> None:
        super().__init__(message)
        self.result = result


# --------------------------------------------------------------------------- export


class ExportError(TrainingError, RuntimeError):
    """An export that cannot be written: bad name or version, or a graph that is unsafe to serve."""


class ExportVerificationError(ExportError):
    """The exported ONNX file disagrees with the unfolded PyTorch model beyond tolerance."""
