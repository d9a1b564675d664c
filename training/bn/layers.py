"""A model's BatchNorm layers: finding them, refusing them in training mode, randomising them.

Every BatchNorm here is any subclass of PyTorch's `_BatchNorm` (the reference and synchronised
ones included), so one list serves folding, statistics policies, recalibration and the guard.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from training.errors import TrainingModeError

SHOWN = 5  # names listed in the guard's message before "…"


def batchnorms(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """Every BatchNorm, any subclass of PyTorch's `_BatchNorm` included."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def tracked_batchnorms(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """The BatchNorms that keep running statistics: the only ones a policy can steer."""
    return [(name, m) for name, m in batchnorms(model) if m.track_running_stats]


def require_eval_mode(model: nn.Module, purpose: str) -> None:
    """Refuse, loudly, the classic BN bug: inference in training mode uses batch statistics.

    Any module left in training mode is refused, not only BatchNorms (a training-mode dropout
    makes every output random); the message names the BatchNorms first, as the likely mistake.
    """
    training = [name or "<root>" for name, m in model.named_modules() if m.training]
    if not training:
        return
    bns = [name or "<root>" for name, m in batchnorms(model) if m.training]
    named = bns or training
    listed = ", ".join(named[:SHOWN]) + (" …" if len(named) > SHOWN else "")
    what = (
        f"BatchNorm layers {listed} are in training mode and would normalise with each "
        "batch's own statistics instead of the running ones"
        if bns
        else f"modules {listed} are in training mode (dropout, for one, would act at random)"
    )
    raise TrainingModeError(f"cannot {purpose}: {what}; call model.eval() first")


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
