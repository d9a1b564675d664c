"""The synchronised BN: two gloo processes equal one process on the concatenated batch.

The two ranks hold batches of different sizes (5 and 3 examples), so a mean of per-rank means
(a classic mistake) would show up. Compared in float64 at 1e-10: outputs, input gradients, the
sum over ranks of γ/β gradients (what DistributedDataParallel's all-reduce adds up), and the
running statistics after two steps, on every rank.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from training.bn.population import parse_bn_stats
from training.bn.reference import ReferenceBatchNorm2d
from training.bn.sync import SyncBatchNorm, SyncBatchNormTrain, convert_sync_batchnorm
from training.fold import fold_model

ROWS = (5, 3)  # examples per rank: uneven on purpose
STEPS = 3
TOL = {"atol": 1e-10, "rtol": 0}


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]  # per example, channel first
    affine: bool
    momentum: float | None
    bn_stats: str = "ema"  # a window needs the global batch's statistics from the sync BN


CASES = (
    Case("2d-affine", (4,), True, 0.1),
    Case("4d-affine", (3, 4, 5), True, 0.1),
    Case("4d-plain-cumulative", (3, 2, 3), False, None),
    Case("4d-window", (2, 3, 3), True, 0.1, "window:2"),
)


def case_data(case: Case, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch and upstream gradient of one step; every process builds the same."""
    g = torch.Generator().manual_seed(1000 * step + len(case.name))
    n = sum(ROWS)
    x = torch.randn((n, *case.shape), generator=g, dtype=torch.float64) * 3 + 5
    dy = torch.randn((n, *case.shape), generator=g, dtype=torch.float64)
    return x, dy


def make_bn(case: Case, cls: type[_BatchNorm]) -> _BatchNorm:
    bn = cls(case.shape[0], momentum=case.momentum, affine=case.affine).double()
    if case.affine:
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            bn.weight.copy_(torch.rand(case.shape[0], generator=g, dtype=torch.float64) + 0.5)
            bn.bias.copy_(torch.randn(case.shape[0], generator=g, dtype=torch.float64))
    return bn


def run_steps(bn: _BatchNorm, case: Case, rows: slice) -> dict[str, list[torch.Tensor]]:
    """Train-mode steps on `rows` of each global batch, recording what the test compares."""
    out: dict[str, list[torch.Tensor]] = {"y": [], "dx": [], "dw": [], "db": []}
    handle = parse_bn_stats(case.bn_stats).attach(bn)
    for step in range(STEPS):
        x, dy = case_data(case, step)
        x = x[rows].clone().requires_grad_()
        bn.zero_grad()
        y = bn(x)
        y.backward(dy[rows])
        out["y"].append(y.detach())
        out["dx"].append(x.grad)
        if case.affine:
            out["dw"].append(bn.weight.grad.clone())
            out["db"].append(bn.bias.grad.clone())
    handle.remove()
    out["running"] = [bn.running_mean.clone(), bn.running_var.clone()]
    return out


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        start = sum(ROWS[:rank])
        rows = slice(start, start + ROWS[rank])
        results = {c.name: run_steps(make_bn(c, SyncBatchNorm), c, rows) for c in CASES}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("sync_bn")
    mp.spawn(_worker, args=(2, free_port(), str(out_dir)), nprocs=2, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_two_gloo_ranks_equal_one_process_on_the_concatenated_batch(two_rank_results, case):
    bn_cls = nn.BatchNorm1d if len(case.shape) == 1 else nn.BatchNorm2d
    want = run_steps(make_bn(case, bn_cls), case, slice(None))
    ranks = [r[case.name] for r in two_rank_results]
    for step in range(STEPS):
        for key in ("y", "dx"):
            got = torch.cat([r[key][step] for r in ranks])
            torch.testing.assert_close(got, want[key][step], **TOL)
        for key in ("dw", "db") if case.affine else ():
            got = sum(r[key][step] for r in ranks)  # what DDP's gradient all-reduce adds up
            torch.testing.assert_close(got, want[key][step], **TOL)
    for r in ranks:  # identical on every rank, and equal to PyTorch's single-process stats
        for got, expected in zip(r["running"], want["running"], strict=True):
            torch.testing.assert_close(got, expected, **TOL)


def test_the_sum_based_statistics_pass_gradcheck_without_a_process_group():
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64, requires_grad=True) + 4
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.rand(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: SyncBatchNormTrain.apply(x, w, b, 1e-5, None)[0], (x, w, b)
    )


def test_float32_statistics_survive_a_large_mean():
    """Σx²/m − μ² in float32 would lose every digit of σ² = 1 when μ = 10⁴."""
    x = (torch.randn(64, 2, dtype=torch.float64) + 1e4).float()
    _, _, var, _ = SyncBatchNormTrain.apply(x, None, None, 1e-5, None)
    torch.testing.assert_close(var, x.double().var(0, correction=0).float(), rtol=1e-6, atol=0)
    naive = (x * x).mean(0) - x.mean(0) ** 2  # the float32 cancellation this avoids
    assert (naive - var).abs().max() > 0.1


def test_convert_shares_parameters_keeps_modes_and_still_folds():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, bias=False),
        ReferenceBatchNorm2d(3),  # any _BatchNorm subclass converts
        nn.Flatten(),
        nn.Linear(48, 4, bias=False),
        nn.BatchNorm1d(4),
    ).eval()
    weight = model[1].weight
    converted = convert_sync_batchnorm(model)
    assert converted is model
    assert [type(m) for m in model][1::3] == [SyncBatchNorm, SyncBatchNorm]
    assert model[1].weight is weight and not model[1].training
    _, report = fold_model(model, torch.randn(2, 1, 6, 6))
    assert len(report.folded) == 2


def test_without_a_process_group_it_is_plain_batchnorm():
    torch.manual_seed(0)
    sync, plain = SyncBatchNorm(3).double(), nn.BatchNorm2d(3).double()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(sync(x), plain(x), **TOL)
    torch.testing.assert_close(sync.running_var, plain.running_var, **TOL)
