"""Population statistics: which average of the training batches' statistics inference uses.

Training normalises each batch by its own mean and variance; inference needs fixed per-channel
statistics, an average of the batch ones. Three averages, chosen with `--bn-stats`:

- `ema` / `ema:<momentum>`: the exponential moving average r ← (1 − m)·r + m·batch, PyTorch's
  default (m = 0.1). It weighs recent batches most, so it follows the weights as they change.
- `window:<N>`: the plain average of the last N batches' statistics, a moving average that
  forgets everything older at once.
- `cumulative`: the plain average over every batch of training (PyTorch's `momentum=None`);
  `recalibrate_bn` in training.bn.recalibrate uses it over one pass with the weights frozen.

Every average takes the batch mean and the *unbiased* batch variance, as PyTorch does, so the
folded weights match PyTorch's. EMA and cumulative are PyTorch's own update (a momentum
setting); the window is a forward hook on each BatchNorm that rewrites its running statistics
after every training-mode forward. `attach` returns a handle that undoes the change and, for the
window, holds the state a resumed run needs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

from training.bn.layers import tracked_batchnorms
from training.bn.reference import channel_dims
from training.errors import ConfigError

DEFAULT_MOMENTUM = 0.1  # PyTorch's
CHOICES = "ema, ema:<momentum in (0, 1]>, window:<N ≥ 1> or cumulative"


# --------------------------------------------------------------------------- the handle


@dataclass
class StatsHandle:
    """What `attach` changed: `remove()` undoes it; `state_dict()` is what a resume needs."""

    momenta: dict[_BatchNorm, float | None] = field(default_factory=dict)
    hooks: list[RemovableHandle] = field(default_factory=list)
    windows: dict[str, _Window] = field(default_factory=dict)

    def remove(self) -> None:
        """Restore each BN's momentum and take the hooks off; the running statistics stay."""
        for bn, momentum in self.momenta.items():
            bn.momentum = momentum
        for hook in self.hooks:
            hook.remove()
        self.momenta, self.hooks = {}, []

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and lists only, so a `weights_only` checkpoint load restores it."""
        return {name: window.state_dict() for name, window in self.windows.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, window in self.windows.items():
            window.load_state_dict(state.get(name, {"means": [], "vars": []}))

    def __enter__(self) -> StatsHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()


def _set_momentum(model: nn.Module, momentum: float | None) -> StatsHandle:
    handle = StatsHandle()
    for _, bn in tracked_batchnorms(model):
        handle.momenta[bn] = bn.momentum
        bn.momentum = momentum
    return handle


# --------------------------------------------------------------------------- the policies


@dataclass(frozen=True)
class EMA:
    """Exponential moving average with PyTorch's update rule and the given momentum."""

    momentum: float = DEFAULT_MOMENTUM

    def __str__(self) -> str:
        return "ema" if self.momentum == DEFAULT_MOMENTUM else f"ema:{self.momentum:g}"

    def attach(self, model: nn.Module) -> StatsHandle:
        return _set_momentum(model, self.momentum)


@dataclass(frozen=True)
class Cumulative:
    """Equal weight for every batch since the last reset: PyTorch's `momentum=None`."""

    def __str__(self) -> str:
        return "cumulative"

    def attach(self, model: nn.Module) -> StatsHandle:
        return _set_momentum(model, None)


@dataclass(frozen=True)
class Window:
    """Plain average of the last `size` batches' means and unbiased variances."""

    size: int

    def __str__(self) -> str:
        return f"window:{self.size}"

    def attach(self, model: nn.Module) -> StatsHandle:
        handle = StatsHandle()
        for name, bn in tracked_batchnorms(model):
            window = _Window(self.size)
            handle.windows[name] = window
            handle.hooks.append(bn.register_forward_hook(window.after_forward))
        return handle


PopulationStats = EMA | Cumulative | Window


def parse_bn_stats(spec: str) -> PopulationStats:
    """`ema`, `ema:<momentum>`, `window:<N>` or `cumulative` → its policy; ConfigError otherwise."""
    kind, _, arg = spec.strip().partition(":")
    if kind == "ema":
        return EMA(_momentum(arg, spec)) if arg else EMA()
    if kind == "window" and arg:
        return Window(_window_size(arg, spec))
    if kind == "cumulative" and not arg:
        return Cumulative()
    raise ConfigError(f"unknown BN statistics {spec!r}; choose {CHOICES}")


def _momentum(arg: str, spec: str) -> float:
    try:
        momentum = float(arg)
    except ValueError:
        momentum = float("nan")
    if not 0 < momentum <= 1:  # also false for NaN
        raise ConfigError(f"BN statistics {spec!r}: the EMA momentum must be in (0, 1]")
    return momentum


def _window_size(arg: str, spec: str) -> int:
    if not arg.isdigit() or int(arg) < 1:
        raise ConfigError(f"BN statistics {spec!r}: the window must be a whole number ≥ 1")
    return int(arg)


# --------------------------------------------------------------------------- the window


def batch_statistics(bn: _BatchNorm, x: Tensor) -> tuple[Tensor, Tensor]:
    """The mean and unbiased variance `bn` just normalised `x` with.

    A BN that normalises over more than `x` (the synchronised one, over every process) reports
    its own in `last_batch_stats`; otherwise they are recomputed from its input.
    """
    reported = getattr(bn, "last_batch_stats", None)
    if reported is not None:
        return reported
    var, mean = torch.var_mean(x.detach(), dim=channel_dims(x), correction=1)
    return mean, var


class _Window:
    """One BN's last N batch statistics, and the hook that makes their average its running one."""

    def __init__(self, size: int) -> None:
        self.means: deque[Tensor] = deque(maxlen=size)
        self.vars: deque[Tensor] = deque(maxlen=size)

    @torch.no_grad()
    def after_forward(self, bn: nn.Module, inputs: tuple[Tensor, ...], _output: Tensor) -> None:
        if not (bn.training and isinstance(bn, _BatchNorm) and bn.running_mean is not None):
            return  # inference, or nothing to update
        mean, var = batch_statistics(bn, inputs[0])
        self.means.append(mean.to(bn.running_mean.dtype))
        self.vars.append(var.to(bn.running_var.dtype))
        # Through `.data`: PyTorch's batch_norm saves the running buffers for its backward (which
        # reads them only in inference), so an in-place write would trip autograd's version
        # check although it cannot change any gradient.
        bn.running_mean.data.copy_(torch.stack(tuple(self.means)).mean(0))
        bn.running_var.data.copy_(torch.stack(tuple(self.vars)).mean(0))

    def state_dict(self) -> dict[str, list[Tensor]]:
        return {"means": [t.clone() for t in self.means], "vars": [t.clone() for t in self.vars]}

    def load_state_dict(self, state: dict[str, list[Tensor]]) -> None:
        self.means.clear()
        self.vars.clear()
        self.means.extend(state["means"])
        self.vars.extend(state["vars"])
