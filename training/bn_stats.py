"""Population statistics for BatchNorm, and the guard against evaluating in training mode.

In training mode BN normalises with the mini-batch's own mean and variance; at inference it must
use fixed population statistics. PyTorch keeps those as an exponential moving average (EMA) of the
batch statistics, weighted towards the last few hundred steps. `recalibrate_bn` recomputes them in
one pass over the training set with the weights frozen, as the cumulative (equal-weight) average of
per-batch means and unbiased variances, which is what PyTorch does when `momentum=None`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from training.errors import TrainingModeError


def batchnorms(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """Every BatchNorm, any subclass of PyTorch's `_BatchNorm` included."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


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
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Replace every BN's running statistics by their cumulative average over `batches`.

    Only the BatchNorm layers switch to training mode (dropout and the rest stay in eval), no
    gradient is taken and no weight changes. Each BN's momentum is restored afterwards, so
    later fine-tuning keeps its EMA behaviour. Returns the number of batches seen.
    """
    layers = [m for _, m in batchnorms(model) if m.track_running_stats]
    if not layers:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
        m.train()
    seen = 0
    try:
        for batch in batches:
            if batch.shape[0] < 2:
                continue  # one example has no variance; BN rejects it in training mode
            model(batch)
            seen += 1
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return seen
