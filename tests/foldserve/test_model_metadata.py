"""The metadata schema shared by exporter and service: round trip and clear refusals."""

from __future__ import annotations

import pytest

from foldserve.model_metadata import (
    PREFIX,
    InputSpec,
    MetadataError,
    ModelMetadata,
    OutputSpec,
)

META = ModelMetadata(
    labels=("0", "1", "2"),
    input=InputSpec(
        name="input",
        layout="NCHW",
        shape=(1, 8, 8),
        mean=(4.9,),
        std=(6.0,),
        value_range=(0.0, 16.0),
        color_mode="L",
        resize="bilinear",
        ink="high",
    ),
    output=OutputSpec(name="logits"),
    model={"name": "digits", "architecture": "digits_cnn", "config": {"widths": [32, 64]}},
    checkpoint_sha256="ab" * 32,
    training={"epochs": 20, "val_acc": 0.99},
    fold={"folded": [{"bn": "bn", "layers": ["conv"]}], "skipped": []},
    verification={"max_abs_diff": 1e-6, "passed": True},
    export={"opset": 18},
)


def test_round_trip_is_exact():
    props = META.to_props()
    assert all(isinstance(v, str) for v in props.values())
    assert all(k.startswith(PREFIX) for k in props)
    assert props[PREFIX + "schema_version"] == "1"
    assert ModelMetadata.from_props(props) == META


def test_unknown_version_missing_keys_and_bad_json_are_refused():
    props = META.to_props()
    with pytest.raises(MetadataError, match="no foldserve metadata"):
        ModelMetadata.from_props({})
    with pytest.raises(MetadataError, match="version '2' is not supported"):
        ModelMetadata.from_props(props | {PREFIX + "schema_version": "2"})
    with pytest.raises(MetadataError, match=r"lacks foldserve\.labels"):
        ModelMetadata.from_props({k: v for k, v in props.items() if not k.endswith("labels")})
    with pytest.raises(MetadataError, match=r"foldserve\.input is not valid JSON"):
        ModelMetadata.from_props(props | {PREFIX + "input": "{"})
    with pytest.raises(MetadataError, match="malformed"):
        ModelMetadata.from_props(props | {PREFIX + "input": '{"name": "x"}'})
