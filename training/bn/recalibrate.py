"""Recalibration: BatchNorm's population statistics recomputed in one pass, weights frozen.

In training mode BN normalises with the mini-batch's own mean and variance; at inference it must
use fixed population statistics. PyTorch keeps those as an exponential moving average (EMA) of the
batch statistics, weighted towards the last few hundred steps. `recalibrate_bn` recomputes them in
one pass over the training set with the weights frozen, as the cumulative (equal-weight) average of
per-batch means and unbiased variances, which is what PyTorch does when `momentum=None`. The
averages themselves are training.bn.population's policies, the ones `--bn-stats` chooses for
training, so recalibration and training cannot disagree on what "the average" means.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from training.bn.layers import tracked_batchnorms
from training.bn.population import Cumulative, PopulationStats


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module, batches: Iterable[torch.Tensor], policy: PopulationStats | None = None
) -> int:
    """Replace every BN's running statistics by their average over `batches`.

    The average is `policy`'s, by default the cumulative one (every batch weighs the same);
    the statistics start from PyTorch's reset values. Only the BatchNorm layers switch to
    training mode (dropout and the rest stay in eval), no gradient is taken and no weight
    changes. The policy is detached afterwards (each BN's momentum restored), so later
    fine-tuning keeps its EMA behaviour. Returns the number of batches seen.
    """
    layers = [m for _, m in tracked_batchnorms(model)]
    if not layers:
        return 0
    was_training = model.training
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.train()
    seen = 0
    try:
        with (policy or Cumulative()).attach(model):
            for batch in batches:
                if batch.shape[0] < 2:
                    continue  # one example has no variance; BN rejects it in training mode
                model(batch)
                seen += 1
    finally:
        model.train(was_training)
    return seen
