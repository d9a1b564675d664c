"""Reading the model repository: Triton's `<root>/<name>/<version>/model.onnx` layout.

Names and versions come from URLs, so both are validated before they touch the file system: a
name is one plain folder name (no separators, no dot-dot, nothing hidden) and must resolve
inside the repository; a version is a positive integer. Each model may carry
`<root>/<name>/config.json`, validated by `ModelConfig` (the one documented schema):

    {
      "version_policy": {"latest": {"num_versions": 1}}      # default
                      | {"all": {}}
                      | {"specific": {"versions": [1, 3]}},
      "max_batch_size": 64,            # dynamic batcher (service/batching.py); default: the
      "max_queue_delay_us": 500,       # settings'. false turns batching off for this model;
      "dynamic_batching": true,        # a model without a dynamic batch dim never batches
      "preprocessing": {               # overrides of the model's foldserve input metadata
        "mean": [0.5], "std": [0.25], "value_range": [0, 1],
        "color_mode": "L", "resize": "bilinear", "ink": "high"
      }
    }
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from foldserve.repository_layout import MODEL_FILE, NAME_RULE, valid_name
from service.errors import BadRequestError, ModelConfigError, describe_validation

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
MAX_VERSION = 2**63 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Latest(_Strict):
    num_versions: int = Field(1, ge=1)


class Specific(_Strict):
    versions: tuple[int, ...] = Field(min_length=1)


class VersionPolicy(_Strict):
    """Triton's version policy: exactly one of latest, all, specific."""

    latest: Latest | None = None
    all: dict[str, object] | None = None
    specific: Specific | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> VersionPolicy:
        chosen = [k for k in ("latest", "all", "specific") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise ValueError(f"give one version policy, not {' and '.join(chosen)}")
        if not chosen:
            return VersionPolicy(latest=Latest())
        return self

    def select(self, available: list[int]) -> list[int]:
        """The versions this policy serves out of those on disk, ascending."""
        if self.all is not None:
            return sorted(available)
        if self.specific is not None:
            return sorted(v for v in available if v in self.specific.versions)
        count = self.latest.num_versions if self.latest else 1
        return sorted(available)[-count:]

    def describe(self) -> dict[str, object]:
        return self.model_dump(exclude_none=True)


class Preprocessing(_Strict):
    """Overrides of the exporter's input metadata, for feeding pictures to the model."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    value_range: tuple[float, float] | None = None
    color_mode: Literal["L", "RGB"] | None = None
    resize: Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"] | None = None
    ink: Literal["high", "low"] | None = None

    @model_validator(mode="after")
    def _positive_std(self) -> Preprocessing:
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self


class ModelConfig(_Strict):
    version_policy: VersionPolicy = VersionPolicy(latest=Latest())
    max_batch_size: int | None = Field(None, ge=0)
    max_queue_delay_us: int | None = Field(None, ge=0)
    dynamic_batching: bool | None = None
    preprocessing: Preprocessing = Preprocessing()


def check_name(name: str) -> str:
    """A model name from a URL or the disk, or `BadRequestError` saying what a name may be."""
    if not valid_name(name):
        raise BadRequestError(f"invalid model name {name[:140]!r}: {NAME_RULE}")
    return name


def parse_version(text: str) -> int:
    """A version from a URL: a positive integer in decimal."""
    if not text.isascii() or not text.isdigit() or len(text) > 19 or int(text) < 1:
        raise BadRequestError(
            f"invalid model version {text[:40]!r}: versions are positive integers"
        )
    value = int(text)
    if value > MAX_VERSION:
        raise BadRequestError(f"invalid model version {text!r}: too large")
    return value


def model_folder(root: Path, name: str) -> Path:
    """`root/name`, refusing a name that resolves outside the repository (a symlink out)."""
    folder = root / check_name(name)
    if folder.exists() and not folder.resolve().is_relative_to(root.resolve()):
        raise BadRequestError(f"model {name!r} lies outside the repository")
    return folder


def _inside(root: Path, path: Path) -> bool:
    """Whether `path`, symlinks followed, lies within the repository; logged (once per path:
    the repository is scanned again and again) when it does not."""
    if path.resolve().is_relative_to(root.resolve()):
        return True
    _warn_outside(str(path))
    return False


@functools.cache
def _warn_outside(path: str) -> None:
    logger.warning("ignoring %s: it resolves outside the repository", path)


def scan(root: Path) -> list[str]:
    """Model names in the repository: folders with a valid name that stay inside it, sorted."""
    return sorted(
        p.name for p in root.iterdir() if p.is_dir() and valid_name(p.name) and _inside(root, p)
    )


def versions_on_disk(root: Path, name: str) -> list[int]:
    """Published versions, ascending: positive integer folders holding model.onnx, neither of
    them a symlink out of the repository."""
    folder = model_folder(root, name)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.isascii() and p.name.isdigit()]
    return sorted(
        int(p.name)
        for p in found
        if int(p.name) > 0 and (p / MODEL_FILE).is_file() and _inside(root, p / MODEL_FILE)
    )


def model_file(root: Path, name: str, version: int) -> Path:
    return model_folder(root, name) / str(version) / MODEL_FILE


def read_config(root: Path, name: str) -> ModelConfig:
    """The model's config.json, or the defaults when it has none."""
    path = model_folder(root, name) / CONFIG_FILE
    if not path.is_file():
        return ModelConfig()
    try:
        return parse_config(path.read_text(encoding="utf-8"))
    except ModelConfigError as exc:
        raise ModelConfigError(f"{path}: {exc}") from None


def parse_config(text: str) -> ModelConfig:
    """Parse and validate one config document (config.json, or a load request's `config`)."""
    try:
        return ModelConfig.model_validate(json.loads(text))
    except json.JSONDecodeError as exc:
        raise ModelConfigError(f"not valid JSON: {exc}") from None
    except ValidationError as exc:
        raise ModelConfigError(
            describe_validation(exc.errors()).replace("invalid request", "invalid config")
        ) from None
