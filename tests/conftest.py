"""Shared test set-up: hypothesis profiles and the paths tests read from."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from bench.onnx_cases import corpus_required, missing_reason, onnx_case_files, onnx_cases_dir

REPO_ROOT = Path(__file__).resolve().parent.parent

# Folding and training tests run real torch code: no per-example deadline (2-core CI machines
# are noisy), and a fixed, derandomised run in CI so a red build reproduces locally.
settings.register_profile(
    "ci", deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(scope="session")
def onnx_cases() -> Path:
    """The third-party ONNX corpus (bench/onnx_cases.py): skipped without it, failed in CI."""
    if not onnx_case_files():
        if corpus_required():
            pytest.fail(missing_reason())
        pytest.skip(missing_reason())
    return onnx_cases_dir()
