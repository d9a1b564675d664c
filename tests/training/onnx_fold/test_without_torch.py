"""The ONNX folder works where torch cannot even be imported, as with `foldserve[onnx,cpu]`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx

from tests.training.onnx_fold.test_rules import conv_bn_model

REPO = Path(__file__).resolve().parents[3]

# Runs in a fresh interpreter in which `import torch` fails, as it does without torch installed.
NO_TORCH = """
import importlib, json, pkgutil, sys
sys.modules["torch"] = None
import training.onnx_fold as package
for module in pkgutil.iter_modules(package.__path__):
    importlib.import_module(f"training.onnx_fold.{module.name}")
from training.onnx_fold import fold_onnx_file
from foldserve.cli import main
source, target, via_cli = sys.argv[1:]
report = fold_onnx_file(source, target)
assert main(["fold-onnx", source, "-o", via_cli, "--json"]) == 0
print(json.dumps({"folded": len(report.folded), "passed": report.verification.passed}))
"""


def test_fold_onnx_file_and_the_cli_fold_and_verify_without_torch(tmp_path):
    source = tmp_path / "conv_bn.onnx"
    onnx.save(conv_bn_model(np.random.default_rng(0)), source)
    target, via_cli = tmp_path / "folded.onnx", tmp_path / "cli.onnx"
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(source), str(target), str(via_cli)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary == {"folded": 1, "passed": True}
    assert target.is_file() and via_cli.is_file()
