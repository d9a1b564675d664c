"""bench/gpu.py on the CPU, tiny: every section runs, and its figures are sane."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT


@pytest.mark.slow
def test_gpu_bench_smoke_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    command = [sys.executable, "bench/gpu.py", "--device", "cpu", "--size", "32"]
    command += ["--batches", "1,2", "--seconds", "0.2", "--repeat", "1", "--warmup", "1"]
    command += ["--http-concurrency", "2", "--json", str(out)]
    done = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())

    assert {"date", "device", "versions", "torch", "onnxruntime", "http"} <= results.keys()
    assert results["device"]["kind"] == "cpu"
    for section in ("torch", "onnxruntime"):
        variants = results[section]["variants"]
        assert variants
        for key, variant in variants.items():
            assert set(variant["batches"]) == {"1", "2"}, key
            assert all(b["images_per_s"] > 0 for b in variant["batches"].values()), key
        assert all(r > 0 for per in results[section]["ratios"].values() for r in per.values())

    torch_acc = results["torch"]["accuracy"]
    ort_acc = results["onnxruntime"]["accuracy"]
    assert torch_acc["torch_fp32_unfolded"]["max_abs_diff"] == 0  # it is the reference
    for acc in (torch_acc["torch_fp32_folded"], ort_acc["ort_fp32_folded_noopt"]):
        assert acc["max_rel_diff"] < 1e-3
    assert ort_acc["ort_fp32_folded_opt"]["max_rel_diff"] < 1e-3
    assert ort_acc["ort_fp32_unfolded_opt"]["max_rel_diff"] < 1e-3
    assert 0 < ort_acc["ort_fp16_folded_opt"]["max_rel_diff"] < 5e-2
    assert results["onnxruntime"]["batchnorm_nodes"]["fp32_unfolded"] > 0
    assert results["onnxruntime"]["batchnorm_nodes"]["fp32_folded"] == 0
    # ORT fuses the unfolded file's Conv+BN itself at load, as it would any ordinary file
    assert results["onnxruntime"]["batchnorm_nodes_left_by_ort"]["fp32_unfolded"] == 0

    http = results["http"]
    assert http["providers"][0] == "CPUExecutionProvider"
    assert http["batch"] in (1, 2)
    assert http["ratio"] > 0
    assert http["service_images_per_s"] > 0
    assert http["max_abs_diff_vs_in_process"] < 1e-4
