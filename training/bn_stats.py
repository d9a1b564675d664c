"""Population statistics for BatchNorm, and the guard against evaluating in training mode.

In training mode BN normalises with the mini-batch's own mean and variance; at inference it must
use fixed population statistics. PyTorch keeps those as an exponential moving average (EMA) of the
batch statistics, weighted towards the last few hundred steps. `recalibrate_bn` recomputes them in
one pass over the training set with the weights frozen, as the cumulative (equal-weight) average of
per-batch means and unbiased variances, which is what PyTorch does when `momentum=None`. The
averages themselves are training.population_stats' policies, the ones `--bn-stats` chooses for
training, so recalibration and training cannot disagree on what "the average" means.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from training.errors import TrainingModeError
from training.population_stats import (
    Cumulative,
    PopulationStats,
    batchnorms,
    tracked_batchnorms,
)


def require_eval_mode(model: nn.Module, purpose: str) -> None:
    """Refuse, loudly, the classic BN bug: inference in training mode uses batch statistics."""
    training = [name or "<root>" for name, m in batchnorms(model) if m.training]
    if training:
        raise TrainingModeError(
            f"cannot {purpose}: BatchNorm layers {', '.join(training[:5])}"
            f"{' …' if len(training) > 5 else ''} are in training mode and would normalise with "
            "each batch's own statistics instead of the running ones; call model.eval() first"
        )


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


@torch.no_grad()
def randomize_bn_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN its own per-channel statistics and affine parameters, reproducibly.

    A freshly built BN is an identity map (mean 0, variance 1, gamma 1, beta 0), which hides
    per-channel and per-group layout mistakes in a fold; tests and benchmarks randomise first.
    The model's mode is left as it was.
    """
    generator = torch.Generator().manual_seed(seed)
    for _, bn in batchnorms(model):
        n = bn.num_features
        if bn.running_mean is not None:
            bn.running_mean.copy_(torch.randn(n, generator=generator))
            bn.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
        if bn.affine:
            bn.weight.copy_(torch.randn(n, generator=generator))
            bn.bias.copy_(torch.randn(n, generator=generator))
    return model
