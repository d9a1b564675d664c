"""Shared test set-up: hypothesis profiles and the paths tests read from."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, settings

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_ONNX_CASES = REPO_ROOT.parent / "shared" / "onnx-cases"

# Folding and training tests run real torch code: no per-example deadline (2-core CI machines
# are noisy), and a fixed, derandomised run in CI so a red build reproduces locally.
settings.register_profile(
    "ci", deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))
