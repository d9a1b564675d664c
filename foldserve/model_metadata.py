"""The schema of a served model's self-description, carried in ONNX `metadata_props`.

This module is the contract between the two halves: the exporter writes these keys, the service
reads them, and neither imports the other. It imports only the standard library (no onnx, no
torch, no numpy), so both sides, and tests, can use it anywhere.

Schema version 1. Every key starts with `foldserve.`; structured values are JSON text.

- `schema_version`: "1".
- `labels`: list of class names; position i names output i.
- `output`: {name, kind: "logits", softmax_applied: false}.
- `input`: {name, layout ("NCHW" or "NC"), shape (no batch axis), mean, std, value_range,
  color_mode ("L", "RGB" or null), resize (a Pillow filter name or null), ink ("high", "low"
  or null)}. The model's input is (raw - mean) / std per channel, with raw in value_range. To
  feed it a picture: convert to color_mode, resize to shape with resize, scale 0..255 onto
  value_range, inverting first when ink is "high" (strokes are large values, as in the digits).
- `model`: {name, architecture, config}.
- `checkpoint_sha256`: hex digest of the checkpoint the model was exported from.
- `training`: {epochs, val_acc, val_loss, recalibration, data_source}.
- `fold`: summary of the fold report: pairs folded, BNs skipped with reasons, counts.
- `verification`: the exported ONNX vs the unfolded PyTorch model on the validation data.
- `export`: {created, foldserve_version, opset, dtype}.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

SCHEMA_VERSION = 1
PREFIX = "foldserve."


class MetadataError(ValueError):
    """Metadata that is missing, from an unknown schema version, or malformed."""


@dataclass(frozen=True)
class InputSpec:
    name: str
    layout: str
    shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    value_range: tuple[float, float]
    color_mode: str | None = None
    resize: str | None = None
    ink: str | None = None


@dataclass(frozen=True)
class OutputSpec:
    name: str
    kind: str = "logits"
    softmax_applied: bool = False


@dataclass(frozen=True)
class ModelMetadata:
    """Everything a server needs to describe and feed a model, and how it was made."""

    labels: tuple[str, ...]
    input: InputSpec
    output: OutputSpec
    model: dict[str, Any] = field(default_factory=dict)
    checkpoint_sha256: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    fold: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)

    def to_props(self) -> dict[str, str]:
        """Key → string, ready for `onnx.helper.set_model_props`."""
        props = {PREFIX + "schema_version": str(SCHEMA_VERSION)}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("input", "output"):
                value = asdict(value)
            props[PREFIX + f.name] = value if isinstance(value, str) else _dumps(value)
        return props

    @classmethod
    def from_props(cls, props: dict[str, str]) -> ModelMetadata:
        """Parse and check; raises `MetadataError` naming the key at fault."""
        version = props.get(PREFIX + "schema_version")
        if version is None:
            raise MetadataError("the model carries no foldserve metadata")
        if version != str(SCHEMA_VERSION):
            raise MetadataError(
                f"metadata schema version {version!r} is not supported (this build reads "
                f"{SCHEMA_VERSION})"
            )
        raw: dict[str, Any] = {}
        for f in fields(cls):
            key = PREFIX + f.name
            if key not in props:
                if f.name in ("labels", "input", "output"):
                    raise MetadataError(f"metadata lacks {key}")
                continue
            raw[f.name] = props[key] if f.name == "checkpoint_sha256" else _loads(key, props[key])
        try:
            return cls(
                labels=tuple(str(label) for label in raw.pop("labels")),
                input=_input_spec(raw.pop("input")),
                output=OutputSpec(**raw.pop("output")),
                **raw,
            )
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise MetadataError(f"malformed foldserve metadata: {exc!r}") from None


def _input_spec(raw: dict[str, Any]) -> InputSpec:
    spec = InputSpec(
        **{
            **raw,
            "shape": tuple(int(d) for d in raw["shape"]),
            "mean": tuple(float(m) for m in raw["mean"]),
            "std": tuple(float(s) for s in raw["std"]),
            "value_range": tuple(float(v) for v in raw["value_range"]),
        }
    )
    if len(spec.mean) != len(spec.std) or any(s <= 0 for s in spec.std):
        raise ValueError("input mean and std must have one positive std per mean")
    return spec


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, allow_nan=False)


def _loads(key: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise MetadataError(f"metadata {key} is not valid JSON: {exc}") from None
