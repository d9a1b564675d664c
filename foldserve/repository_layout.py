"""The model repository's layout, the contract between the two halves: `training/` writes
`<root>/<name>/<version>/model.onnx`, `service/` reads it. Each half raises its own error for a
bad name; what a name may be is decided here, once."""

from __future__ import annotations

import re

MODEL_FILE = "model.onnx"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
NAME_RULE = (
    "use letters, digits, '_', '-' and '.', starting with a letter or digit (at most 128 "
    "characters)"
)


def valid_name(name: str) -> bool:
    """A name that is safe as one folder name: no separators, no dot-dot, nothing hidden."""
    return NAME_PATTERN.fullmatch(name) is not None and ".." not in name
