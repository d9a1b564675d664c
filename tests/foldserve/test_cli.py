"""The command line: no torch on import, helpful --help, one-line errors, real commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.training.test_train import synthetic_csv

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "foldserve", *args],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=cwd,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize("argv", [[], ["--help"], ["serve", "--help"], ["train", "--help"]])
def test_cli_and_help_do_not_import_torch_or_onnxruntime(argv):
    code = (
        "import sys\nfrom foldserve.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'onnxruntime', 'onnx') if m in sys.modules)\n"
        "print(heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=ENV, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_help_texts_explain_the_commands():
    top = run("--help")
    assert top.returncode == 0
    for command in ("train", "why-bn", "models", "serve"):
        assert command in top.stdout
    train_help = run("train", "--help").stdout
    for option in ("--resume", "--bn-recalibrate", "--data", "--epochs", "--model-option"):
        assert option in train_help


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--data", "missing.csv"], "CSV file 'missing.csv' does not exist"),
        (["train", "--model", "vgg"], "unknown model 'vgg'"),
        (["train", "--epochs", "three"], "argument --epochs: invalid positive integer value"),
        (["train", "--epochs", "0"], "must be a positive integer"),
        (["train", "--lr", "nan"], "must be a positive number"),
        (["train", "--val-fraction", "2"], "must be between 0 and 1"),
        (["train", "--model-option", "depth"], "expected KEY=VALUE"),
        (["train", "--model-option", "depth=3"], "has no option depth"),
        (["train", "--out", "nowhere", "--resume"], "does not exist"),
        (["why-bn", "--lrs", "0.1,x"], "expected numbers separated by commas"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_errors_are_one_clear_line(tmp_path, args, message):
    result = run(*args, cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert lines[0].startswith("foldserve")
    assert "Traceback" not in result.stderr


def test_models_lists_the_registry():
    out = run("models").stdout
    for name in ("mlp", "digits_cnn", "resnet18", "mobilenet", "preact"):
        assert name in out


def test_train_then_resume_a_finished_run(tmp_path):
    data = synthetic_csv(tmp_path / "blobs.csv")
    args = ["train", "--data", str(data), "--model", "mlp", "--epochs", "2", "--out", "run"]
    first = run(*args, "--bn-recalibrate", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "val acc" in first.stdout
    assert "BN recalibrated" in first.stdout
    again = run(*args, cwd=tmp_path)
    assert again.returncode == 1
    assert "already holds a run" in again.stderr
    resumed = run("train", "--out", "run", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "epochs      2" in resumed.stdout


def test_why_bn_writes_plot_table_and_data(tmp_path):
    data = synthetic_csv(tmp_path / "blobs.csv")
    result = run(
        "why-bn", "--data", str(data), "--model", "mlp", "--epochs", "2",
        "--lrs", "0.05,1e9", "--out", "exp", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    runs = json.loads((tmp_path / "exp" / "why_bn.json").read_text())
    assert {(r["lr"], r["batch_norm"]) for r in runs} == {
        (0.05, True), (0.05, False), (1e9, True), (1e9, False)
    }  # fmt: skip
    assert next(r for r in runs if r["lr"] == 1e9 and not r["batch_norm"])["diverged"]
    assert (tmp_path / "exp" / "why_bn.png").read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "exp" / "why_bn.md").read_text()
    assert table.startswith("| learning rate | BN |")
    assert "diverged" in table
    assert "| 0.05 | yes |" in result.stdout


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished two-epoch digits run, trained through the CLI like a user would."""
    root = tmp_path_factory.mktemp("cli")
    result = run(
        "train", "--model-option", "widths=[8,16]", "--epochs", "2", "--out", "runs/digits",
        cwd=root,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return root


def test_fold_prints_the_report(tiny_run):
    result = run("fold", "runs/digits/checkpoint.pt", cwd=tiny_run)
    assert result.returncode == 0, result.stderr
    assert "4 folded, 0 skipped, 0 foldable left" in result.stdout
    as_json = json.loads(run("fold", "runs/digits/checkpoint.pt", "--json", cwd=tiny_run).stdout)
    assert len(as_json["folded"]) == 4 and as_json["verification"]["passed"]


def test_run_exports_once_and_a_second_run_adds_no_version(tiny_run):
    first = run("run", "--no-progress", "--no-serve", cwd=tiny_run)
    assert first.returncode == 0, first.stderr
    assert "models/digits/1/model.onnx" in first.stdout
    assert "argmax agreement 100.00 %" in first.stdout
    second = run("run", "--no-progress", "--no-serve", cwd=tiny_run)
    assert second.returncode == 0, second.stderr
    assert "already holds version(s) 1" in second.stdout
    assert sorted(p.name for p in (tiny_run / "models" / "digits").iterdir()) == ["1"]


def test_export_errors_are_one_line(tiny_run):
    result = run("export", "runs/digits/checkpoint.pt", "--name", "../evil", cwd=tiny_run)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "foldserve export: error: invalid model name '../evil': use letters, digits, '_', '-' "
        "and '.', starting with a letter or digit (at most 128 characters)"
    ]
    missing = run("export", "nope.pt", cwd=tiny_run)
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_fold_onnx_folds_a_file_without_torch(tmp_path):
    shipped = REPO / "models" / "digits" / "1" / "model.onnx"
    code = (
        "import sys\nfrom foldserve.cli import main\n"
        f"rc = main(['fold-onnx', {str(shipped)!r}, '-o', {str(tmp_path / 'out.onnx')!r}])\n"
        "assert 'torch' not in sys.modules, 'fold-onnx imported torch'\nsys.exit(rc)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=ENV, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "nothing to fold" in result.stdout  # the shipped model is already folded
    assert (tmp_path / "out.onnx").is_file()
    bad = run("fold-onnx", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "x.onnx"))
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
