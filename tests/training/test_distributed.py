"""Distributed training: two gloo processes on the CPU against one process on the same batches.

Two ranks with a per-rank batch of B and synchronised BN must train exactly as one process with
batch 2B on the same samples in the same order (the sharding cuts each global batch of the
shared (seed, epoch) permutation into per-rank slices; 39 examples make global batches of
8, 8, 8, 8 and 7, so the last splits 4/3 and the loss scaling is exercised too); without SyncBN
they must differ. The ranks run `train()` as torchrun would start it, from RANK/WORLD_SIZE/
MASTER_* in the environment; the kill test goes through `foldserve train --nproc 2`, i.e.
torchrun itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from tests.training.test_train import StopRunError, stop_after
from training import distributed
from training.bn.recalibrate import recalibrate_bn
from training.bn.sync import SyncBatchNorm
from training.checkpoint import load_checkpoint
from training.data import load_source, make_split
from training.distributed import World
from training.errors import ConfigError
from training.export import export_checkpoint
from training.fold import fold_model
from training.models import build_model
from training.train import TrainConfig, load_trained_model, tensors, train, validation_data

REPO = Path(__file__).resolve().parents[2]
PER_RANK = 4
CFG = TrainConfig(
    model="digits_cnn",
    model_options={"widths": (4, 8)},
    image_size=8,
    val_fraction=0.2,
    epochs=2,
    batch_size=PER_RANK,
    optimizer="sgd",  # AdamW divides by √v: float32 noise in tiny gradients would be amplified
    schedule="constant",
    lr=0.05,
)
RUNS = {
    "sync": {},
    "unsync": {"sync_bn": False},
    "unsync_recal": {"sync_bn": False, "bn_recalibrate": True},
}


def image_folder(root: Path, classes: int = 3, per_class: int = 16) -> Path:
    """Noisy 8×8 greyscale images, one brightness per class: 39 to train on, 9 to validate."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 100, (8, 8)) + 70 * c
            Image.fromarray(pixels.astype(np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


def _worker(rank: int, port: int, data: str, out: str) -> None:
    """One rank, started the way torchrun starts it: the world comes from the environment."""
    os.environ |= {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    torch.set_num_threads(1)
    out_dir = Path(out)
    finals = {}
    with distributed.process_group() as world:
        assert (world.size, world.backend) == (2, "gloo")
        for name, changes in RUNS.items():
            result = train(replace(CFG, data=data, **changes), out_dir / name, progress=False)
            finals[name] = result.model.state_dict()
        cfg = replace(CFG, data=data)
        with contextlib.suppress(StopRunError):
            train(cfg, out_dir / "cut", progress=False, on_epoch=stop_after(1))
        train(cfg, out_dir / "cut", resume=True, progress=False)
    torch.save(finals, out_dir / f"rank{rank}.pt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("distributed")
    data = str(image_folder(root / "images"))
    mp.spawn(_worker, args=(free_port(), data, str(root)), nprocs=2, join=True)
    single = train(
        replace(CFG, data=data, batch_size=2 * PER_RANK), root / "single", progress=False
    )
    return {
        "root": root,
        "data": data,
        "ranks": [torch.load(root / f"rank{r}.pt", weights_only=True) for r in range(2)],
        "single": single.model.state_dict(),
    }


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# --------------------------------------------------------------------------- the acceptance


def test_sync_bn_ddp_with_batch_b_equals_one_process_with_batch_2b(runs):
    rank0, rank1 = (r["sync"] for r in runs["ranks"])
    assert max_diff(rank0, rank1) == 0  # parameters and running statistics, on every rank
    for key, tensor in runs["single"].items():
        torch.testing.assert_close(rank0[key], tensor, rtol=0, atol=1e-5, msg=key)
    saved = load_checkpoint(runs["root"] / "sync" / "checkpoint.pt")
    assert max_diff(saved["state_dict"], rank0) == 0
    assert saved["distributed"] == {"world_size": 2, "backend": "gloo", "sync_bn": True}
    assert not any(key.startswith("module.") for key in saved["state_dict"])


def test_without_sync_bn_the_same_run_differs(runs):
    assert max_diff(runs["ranks"][0]["unsync"], runs["single"]) > 1e-3


def test_without_sync_bn_rank_0_statistics_are_saved_and_recalibration_uses_all_data(runs):
    saved = load_checkpoint(runs["root"] / "unsync" / "checkpoint.pt")["state_dict"]
    assert max_diff(saved, runs["ranks"][0]["unsync"]) == 0
    # Recalibration: one pass over the whole training set, the same on every rank.
    rank0, rank1 = (r["unsync_recal"] for r in runs["ranks"])
    assert max_diff(rank0, rank1) == 0
    model, state = load_trained_model(runs["root"] / "unsync" / "checkpoint.pt")
    cfg = TrainConfig.from_dict(state["train_config"])
    split = make_split(load_source(cfg.data, cfg.image_size), cfg.val_fraction, cfg.seed)
    recalibrate_bn(model, tensors(split)[0].split(2 * PER_RANK))
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(rank0[key], tensor, rtol=0, atol=1e-6, msg=key)


def test_a_resumed_two_process_run_ends_where_an_uninterrupted_one_does(runs):
    cut = load_checkpoint(runs["root"] / "cut" / "checkpoint.pt")
    clean = load_checkpoint(runs["root"] / "sync" / "checkpoint.pt")
    assert cut["epoch"] == clean["epoch"] == CFG.epochs
    assert max_diff(cut["state_dict"], clean["state_dict"]) <= 1e-6


def test_a_two_process_checkpoint_folds_exports_and_matches_one_process(runs, tmp_path):
    checkpoint = runs["root"] / "sync" / "checkpoint.pt"
    model, state = load_trained_model(checkpoint)
    val_x, _ = validation_data(state)
    x = torch.from_numpy(val_x)
    _, report = fold_model(model, x[:8])
    assert len(report.folded) == 4 and not report.skipped

    result = export_checkpoint(checkpoint, tmp_path / "models", "digits2p")
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    served = session.run(None, {"input": val_x})[0]
    with torch.no_grad():
        unfolded = model(x).numpy()
        single = build_model(state["model"]["name"], state["model"]["config"])
        single.load_state_dict(runs["single"])
        one_process = single.eval()(x).numpy()
    np.testing.assert_allclose(served, unfolded, rtol=0, atol=1e-4)
    np.testing.assert_allclose(served, one_process, rtol=0, atol=1e-4)


# --------------------------------------------------------------------------- the pieces


def test_rank_shards_of_the_global_batches_are_the_single_process_batches():
    def batches(n: int, per_rank: int, world: World) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(3)
        return distributed.global_batches(n, per_rank, world, generator)

    single = batches(39, 2 * PER_RANK, World())
    worlds = [World(rank=r, size=2) for r in range(2)]
    shards = [[distributed.shard(b, w) for b in batches(39, PER_RANK, w)] for w in worlds]
    for whole, first, second in zip(single, *shards, strict=True):
        assert torch.equal(torch.cat([first, second]), whole)
    assert [len(b) for b in shards[0]] == [4, 4, 4, 4, 4]
    assert [len(b) for b in shards[1]] == [4, 4, 4, 4, 3]
    assert len(batches(35, PER_RANK, worlds[0])) == 4  # a last batch of 3 cannot give 2 each


def test_too_little_data_for_the_processes_is_refused():
    with pytest.raises(ConfigError, match="cannot give each of 4 processes two examples"):
        distributed.global_batches(7, 2, World(size=4), torch.Generator())


def test_sync_bn_converts_back_to_the_original_classes_sharing_tensors():
    model = build_model("digits_cnn", {"widths": (4,), "bn_impl": "reference"})
    before = {n: type(m) for n, m in model.named_modules()}
    weight = model.features[0].bn.weight
    model, originals = distributed.to_sync_batchnorm(model, distributed.SINGLE)
    assert isinstance(model.features[0].bn, SyncBatchNorm)
    _, report = fold_model(model.eval(), torch.randn(2, 1, 8, 8))  # folds as it is, too
    assert len(report.folded) == 2
    model = distributed.to_plain_batchnorm(model, originals)
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert model.features[0].bn.weight is weight


def test_ddp_prefixes_are_stripped():
    state = {"module.a.weight": torch.ones(1), "module.b": torch.zeros(1)}
    assert list(distributed.strip_ddp_prefix(state)) == ["a.weight", "b"]
    assert distributed.strip_ddp_prefix({"a": 1}) == {"a": 1}


def test_nproc_relaunches_the_same_command_under_torchrun_without_itself():
    argv = ["-v", "train", "--nproc", "2", "--epochs", "3", "--nproc=2", "--out", "r"]
    command = distributed.torchrun_command(2, argv)
    assert command[:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node=2", "-m"]  # fmt: skip
    assert command[6:] == ["foldserve", "-v", "train", "--epochs", "3", "--out", "r"]


# --------------------------------------------------------------------------- a rank dies


def processes_with(*env_entries: bytes) -> set[int]:
    """PIDs of this user's live processes whose environment holds every entry (Linux /proc)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            environ = set((entry / "environ").read_bytes().split(b"\0"))
            if entry.name.isdigit() and environ.issuperset(env_entries):
                pids.add(int(entry.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds ranks through /proc")
def test_killing_one_rank_fails_the_job_clearly_and_keeps_the_checkpoint(tmp_path):
    from tests.training.test_train import synthetic_csv

    token = f"FOLDSERVE_TEST_JOB={tmp_path}".encode()
    env = {**os.environ, "PYTHONPATH": str(REPO), "FOLDSERVE_TEST_JOB": str(tmp_path)}
    run_dir = tmp_path / "run"
    args = [
        sys.executable, "-m", "foldserve", "train", "--nproc", "2", "--no-progress",
        "--data", str(synthetic_csv(tmp_path / "b.csv")), "--model", "mlp",
        "--model-option", "hidden=[16]", "--batch-size", "8", "--epochs", "40",
        "--out", str(run_dir),
    ]  # fmt: skip
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    history, victims = run_dir / "history.json", set()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None and not victims:
        if history.exists() and len(json.loads(history.read_text())["epochs"]) >= 2:
            victims = processes_with(token, b"RANK=1")
        time.sleep(0.005)
    assert len(victims) == 1, "the job finished before a rank could be killed"
    os.kill(victims.pop(), signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    message = stderr.decode()
    assert proc.returncode == 1
    assert "distributed training failed" in message and "--resume" in message
    assert "is intact" in message
    state = load_checkpoint(run_dir / "checkpoint.pt")
    assert 2 <= state["epoch"] < 40
    model, _ = load_trained_model(run_dir / "checkpoint.pt")
    assert not model.training
    assert not processes_with(token)  # torchrun stopped the surviving rank


# --------------------------------------------------------------------------- GPUs


def _gpu_worker(rank: int, port: int, out: str) -> None:
    """Both SyncBNs on one NCCL group, uneven batches: outputs, gradients, running variance."""
    torch.cuda.set_device(rank)
    torch.distributed.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    try:
        results = {}
        for name, cls in (("torch", nn.SyncBatchNorm), ("ours", SyncBatchNorm)):
            bn = cls(3).cuda().double()
            g = torch.Generator().manual_seed(rank)
            x = (torch.randn(5 + rank, 3, 4, 4, generator=g, dtype=torch.float64) * 3 + 2).cuda()
            x.requires_grad_()
            y = bn(x)
            y.backward(torch.cos(y.detach()))
            results[name] = [t.detach().cpu() for t in (y, x.grad, bn.weight.grad, bn.running_var)]
        torch.save(results, Path(out) / f"gpu{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (NCCL)")
def test_on_gpus_our_sync_bn_agrees_with_torchs(tmp_path):
    mp.spawn(_gpu_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        results = torch.load(tmp_path / f"gpu{rank}.pt", weights_only=True)
        for theirs, ours in zip(results["torch"], results["ours"], strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)
