"""Recalibration is the cumulative average of batch statistics, with weights and modes untouched."""

from __future__ import annotations

import torch
from torch import nn

from training.bn.recalibrate import recalibrate_bn


def test_recalibration_is_the_cumulative_average_of_batch_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    batches = [torch.randn(8, 3) * (i + 1) + i for i in range(5)]
    with torch.no_grad():
        features = [model[0](b) for b in batches]
    weights_before = [p.clone() for p in model.parameters()]

    assert recalibrate_bn(model, batches) == 5

    bn = model[1]
    expected_mean = torch.stack([f.mean(0) for f in features]).mean(0)
    expected_var = torch.stack([f.var(0, unbiased=True) for f in features]).mean(0)
    torch.testing.assert_close(bn.running_mean, expected_mean)
    torch.testing.assert_close(bn.running_var, expected_var)
    assert bn.momentum == 0.1  # restored, so later fine-tuning keeps its EMA
    assert bn.num_batches_tracked == 5
    assert all(torch.equal(a, b) for a, b in zip(weights_before, model.parameters(), strict=True))
    assert model.training  # the caller's mode is restored


def test_recalibration_leaves_dropout_in_eval_mode():
    """If dropout ran, the features BN saw would be noisy and the averages wrong."""
    model = nn.Sequential(nn.Dropout(0.9), nn.BatchNorm1d(4)).eval()
    batch = torch.ones(16, 4)
    recalibrate_bn(model, [batch])
    torch.testing.assert_close(model[1].running_mean, torch.ones(4))
    torch.testing.assert_close(model[1].running_var, torch.zeros(4))
    assert not model.training


def test_batches_of_one_are_skipped():
    model = nn.Sequential(nn.BatchNorm1d(2))
    assert recalibrate_bn(model, [torch.randn(1, 2), torch.randn(4, 2)]) == 1
