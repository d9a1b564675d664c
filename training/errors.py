"""The training half's domain errors, in one place.

Every error a person can fix (a bad path, an unknown model, a refused checkpoint, a diverged run)
derives from `TrainingError`; the CLI prints those as one line and exits non-zero. Anything
else is a bug and keeps its traceback. This module imports nothing heavy, so the CLI can catch
these without importing torch.
"""

from __future__ import annotations


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


class ExportError(TrainingError, RuntimeError):
    """An export that cannot be written: bad name or version, or a graph that is unsafe to serve."""


class ExportVerificationError(ExportError):
    """The exported ONNX file disagrees with the unfolded PyTorch model beyond tolerance."""
