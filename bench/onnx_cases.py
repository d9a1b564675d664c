"""Where the third-party ONNX corpus lives: one definition for the tests and the benchmarks.

The corpus (real BatchNorm models from other projects, with provenance in its SOURCES.md) sits
beside the checkout in this workplace, not inside the repository, so a clone elsewhere has none.
``FOLDSERVE_ONNX_CASES`` points at it; the default is ``<repo root>/../shared/onnx-cases``.
Tests that need it skip without it, unless ``FOLDSERVE_REQUIRE_ONNX_CASES=1`` (what CI sets)
turns a missing corpus into a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

ONNX_CASES_VARIABLE = "FOLDSERVE_ONNX_CASES"
REQUIRE_VARIABLE = "FOLDSERVE_REQUIRE_ONNX_CASES"
DEFAULT_ONNX_CASES = Path(__file__).resolve().parents[1].parent / "shared" / "onnx-cases"


def onnx_cases_dir() -> Path:
    """The corpus folder the environment names, or the default beside the checkout."""
    configured = os.environ.get(ONNX_CASES_VARIABLE, "").strip()
    return Path(configured).expanduser() if configured else DEFAULT_ONNX_CASES


def onnx_case_files(root: Path | None = None) -> list[Path]:
    """Every ``<case>/model.onnx`` in the corpus, sorted; empty when the folder is missing."""
    folder = onnx_cases_dir() if root is None else root
    return sorted(folder.glob("*/model.onnx")) if folder.is_dir() else []


def corpus_required() -> bool:
    """True when a missing corpus must fail rather than skip (CI)."""
    return os.environ.get(REQUIRE_VARIABLE, "").strip().lower() in {"1", "true", "yes"}


def missing_reason() -> str:
    """One line saying where the corpus was looked for and how to point at it."""
    return (
        f"no third-party ONNX corpus at {onnx_cases_dir()} "
        f"(set {ONNX_CASES_VARIABLE} to a folder of <case>/model.onnx)"
    )
