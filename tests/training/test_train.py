"""The training loop: it learns, resumes bit-for-bit after a kill, and guards its run folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from training.checkpoint import load_checkpoint
from training.errors import CheckpointError, ConfigError, TrainingDivergedError
from training.train import TrainConfig, batch_order, epoch_generator, random_shift, train

REPO = Path(__file__).resolve().parents[2]


def synthetic_csv(path: Path, n: int = 120, seed: int = 0) -> Path:
    """Three Gaussian blobs in 5-D: learnable in a few epochs, no download."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    centres = rng.normal(0, 3, (3, 5))
    x = centres[labels] + rng.normal(0, 1, (n, 5))
    rows = ["f0,f1,f2,f3,f4,label"] + [
        ",".join(f"{v:.5f}" for v in row) + f",c{lab}" for row, lab in zip(x, labels, strict=True)
    ]
    path.write_text("\n".join(rows) + "\n")
    return path


TINY = {"model": "mlp", "model_options": {"hidden": (16,)}, "epochs": 6, "batch_size": 16}


def test_tiny_run_lowers_the_loss_and_writes_its_files(tmp_path):
    cfg = TrainConfig(**TINY, data=str(synthetic_csv(tmp_path / "blobs.csv")))
    result = train(cfg, tmp_path / "run", progress=False)
    losses = [e["train_loss"] for e in result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert result.history[-1]["val_acc"] > 0.8
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == list(range(1, 7))
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["epoch"] == 6
    assert tuple(state["data_info"]["label_names"]) == ("c0", "c1", "c2")
    assert state["model"]["config"]["in_features"] == 5
    assert len(state["data_info"]["normalization"]["mean"]) == 5


def test_image_model_trains_on_an_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "imgs" / f"class{c}").mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 60, (10, 10), dtype=np.uint8) + 150 * c
            Image.fromarray(pixels.astype(np.uint8)).save(
                tmp_path / "imgs" / f"class{c}" / f"{i}.png"
            )
    cfg = TrainConfig(
        model="digits_cnn",
        model_options={"widths": (4, 8)},
        data=str(tmp_path / "imgs"),
        image_size=8,
        epochs=5,
        batch_size=8,
        val_fraction=0.25,
    )
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.history[-1]["val_acc"] == 1.0
    assert result.data_info.input_shape == (1, 8, 8)


def test_bn_recalibration_reports_before_and_after(tmp_path):
    cfg = TrainConfig(**TINY, data=str(synthetic_csv(tmp_path / "b.csv")), bn_recalibrate=True)
    result = train(cfg, tmp_path / "run", progress=False)
    r = result.recalibration
    assert r is not None
    assert r["batches"] >= 1
    assert 0 <= r["val_acc_before"] <= 1
    assert 0 <= r["val_acc_after"] <= 1
    bn = result.model.blocks[0].bn
    assert bn.num_batches_tracked == r["batches"]  # the cumulative pass replaced the EMA
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["recalibration"] == r


def test_an_existing_run_is_not_overwritten(tmp_path):
    cfg = TrainConfig(**(TINY | {"epochs": 1}), data=str(synthetic_csv(tmp_path / "b.csv")))
    train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(CheckpointError, match="already holds a run"):
        train(cfg, tmp_path / "run", progress=False)
    train(cfg, tmp_path / "run", progress=False, overwrite=True)


def test_resume_refuses_a_changed_configuration(tmp_path):
    cfg = TrainConfig(**(TINY | {"epochs": 2}), data=str(synthetic_csv(tmp_path / "b.csv")))
    train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(CheckpointError, match=r"epochs \(checkpoint: 2, now: 3\)"):
        train(replace(cfg, epochs=3), tmp_path / "run", resume=True, progress=False)


def test_divergence_is_reported_not_saved(tmp_path):
    cfg = TrainConfig(
        **(TINY | {"model_options": {"hidden": (16,), "batch_norm": False}}),
        data=str(synthetic_csv(tmp_path / "b.csv")),
        optimizer="sgd",
        schedule="constant",
        lr=1e12,
    )
    with pytest.raises(TrainingDivergedError, match="lower the learning rate"):
        train(cfg, tmp_path / "run", progress=False)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", 0, "epochs must be at least 1"),
        ("lr", -1.0, "learning rate"),
        ("val_fraction", 1.5, "val fraction"),
        ("model", "alexnet", "unknown model"),
        ("optimizer", "lbfgs", "unknown optimizer"),
    ],
)
def test_config_validation(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{field: value})


def test_shuffle_and_augmentation_are_pure_functions_of_seed_and_epoch():
    a = batch_order(100, 16, epoch_generator(7, 3))
    b = batch_order(100, 16, epoch_generator(7, 3))
    c = batch_order(100, 16, epoch_generator(7, 4))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(torch.cat(a), torch.cat(c))
    assert sorted(torch.cat(a).tolist()) == list(range(100))
    assert [len(x) for x in batch_order(33, 16, epoch_generator(0, 1))] == [16, 16]  # no batch of 1


def test_random_shift_moves_images_by_at_most_one_pixel():
    x = torch.zeros(64, 1, 8, 8)
    x[:, 0, 4, 4] = 1.0
    shifted = random_shift(x, torch.Generator().manual_seed(0))
    positions = {tuple(t.nonzero()[0, 1:].tolist()) for t in shifted}
    assert positions <= {(r, c) for r in (3, 4, 5) for c in (3, 4, 5)}
    assert len(positions) > 1
    assert shifted.sum() == 64


# --------------------------------------------------------------------------- kill and resume


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "foldserve", "train", "--no-progress", *args]


def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL mid-run, resume from the checkpoint: same weights and history as one clean run."""
    args = ["--model", "digits_cnn", "--model-option", "widths=[8,16]", "--epochs", "10"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"

    proc = subprocess.Popen(
        cli(*args, "--out", str(killed_dir)), env=env, stderr=subprocess.DEVNULL
    )
    history = killed_dir / "history.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if history.exists() and len(json.loads(history.read_text())["epochs"]) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the run finished before it could be killed"
    interrupted_at = load_checkpoint(killed_dir / "checkpoint.pt")["epoch"]
    assert 3 <= interrupted_at < 10

    subprocess.run(cli(*args, "--out", str(killed_dir), "--resume"), env=env, check=True)
    subprocess.run(cli(*args, "--out", str(clean_dir)), env=env, check=True)

    resumed = load_checkpoint(killed_dir / "checkpoint.pt")
    clean = load_checkpoint(clean_dir / "checkpoint.pt")
    assert resumed["epoch"] == clean["epoch"] == 10
    for key, tensor in clean["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], tensor, rtol=0, atol=1e-6)
    resumed_history = json.loads((killed_dir / "history.json").read_text())["epochs"]
    clean_history = json.loads((clean_dir / "history.json").read_text())["epochs"]
    assert [e["epoch"] for e in resumed_history] == list(range(1, 11))
    for r, c in zip(resumed_history, clean_history, strict=True):
        assert r["train_loss"] == pytest.approx(c["train_loss"], rel=1e-6)
        assert r["val_acc"] == c["val_acc"]


# --------------------------------------------------------------------------- --bn-stats


class StopRunError(Exception):
    pass


def stop_after(epoch: int):
    def on_epoch(record: dict) -> None:
        if record["epoch"] == epoch:
            raise StopRunError

    return on_epoch


@pytest.mark.parametrize("bn_stats", ["ema:0.2", "window:8", "cumulative"])
def test_an_interrupted_run_resumes_to_the_same_running_statistics(tmp_path, bn_stats):
    """6 batches per epoch; stopped after 3 of 4, a window of 8 needs 2 batches from before."""
    cfg = TrainConfig(
        **(TINY | {"epochs": 4}), data=str(synthetic_csv(tmp_path / "b.csv")), bn_stats=bn_stats
    )
    train(cfg, tmp_path / "clean", progress=False)
    with pytest.raises(StopRunError):
        train(cfg, tmp_path / "cut", progress=False, on_epoch=stop_after(3))
    train(cfg, tmp_path / "cut", resume=True, progress=False)
    clean = load_checkpoint(tmp_path / "clean" / "checkpoint.pt")["state_dict"]
    resumed = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["state_dict"]
    for key, tensor in clean.items():
        torch.testing.assert_close(resumed[key], tensor, rtol=0, atol=1e-6, msg=key)


def test_window_then_recalibration_and_a_plain_model_back(tmp_path):
    cfg = TrainConfig(
        **(TINY | {"epochs": 2}),
        data=str(synthetic_csv(tmp_path / "b.csv")),
        bn_stats="window:3",
        bn_recalibrate=True,
    )
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.recalibration["batches"] > 0
    assert all(not m._forward_hooks for m in result.model.modules())


def test_bad_bn_stats_fail_before_any_work():
    with pytest.raises(ConfigError, match="unknown BN statistics"):
        TrainConfig(bn_stats="median")


def test_reference_bn_is_a_model_option(tmp_path):
    from training.bn.reference import ReferenceBatchNorm1d

    cfg = TrainConfig(
        **(TINY | {"epochs": 2, "model_options": {"hidden": (16,), "bn_impl": "reference"}}),
        data=str(synthetic_csv(tmp_path / "b.csv")),
    )
    result = train(cfg, tmp_path / "run", progress=False)
    assert any(isinstance(m, ReferenceBatchNorm1d) for m in result.model.modules())
