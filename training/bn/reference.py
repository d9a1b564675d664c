"""BatchNorm from first principles: forward and hand-written backward, no autograd inside.

For an input of shape (N, C) or (N, C, H, W), each channel c is normalised over the m = N·H·W
values it holds in the batch:

    training:   μ = mean(x),  σ² = mean((x − μ)²)  (biased: divide by m),  x̂ = (x − μ)/√(σ² + ε)
    inference:  μ, σ² = the running (population) statistics,               x̂ likewise
    both:       y = γ·x̂ + β

In training the batch statistics are functions of every x in the channel, so the chain rule
through μ and σ² gives, with g = γ·dy,

    dx = (1/√(σ² + ε)) · (g − mean(g) − x̂·mean(g·x̂)),   dγ = Σ dy·x̂,   dβ = Σ dy

and in inference (μ, σ² constants) simply dx = γ·dy/√(σ² + ε). The two reductions Σ dy and
Σ dy·x̂ are all the backward pass needs from the other examples, which is why the synchronised
variant (training.bn.sync) only all-reduces those, and reuses these functions.

The running statistics follow PyTorch to the bit that matters for folding: they average the
*unbiased* batch variance σ²·m/(m − 1), although the forward pass normalises with the biased one.
Modules here subclass `_BatchNorm`, so folding, `require_eval_mode` and state dicts treat them
exactly like `nn.BatchNorm1d/2d`; see docs/batchnorm.md for the derivation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from training.errors import ConfigError

BN_IMPLS = ("torch", "reference")


# --------------------------------------------------------------------------- tensor math


def channel_dims(x: Tensor) -> tuple[int, ...]:
    """Every axis but the channel axis (1): the axes a channel's statistics reduce over."""
    return (0, *range(2, x.ndim))


def per_channel(v: Tensor, x: Tensor) -> Tensor:
    """View a (C,) vector so it broadcasts along x's channel axis."""
    return v.reshape(1, -1, *([1] * (x.ndim - 2)))


def values_per_channel(x: Tensor) -> int:
    return x.numel() // x.shape[1]


def require_batch(count: int, shape: tuple[int, ...] | torch.Size) -> None:
    """One value per channel has no variance; PyTorch refuses it in training, and so do we."""
    if count <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(shape)}"
        )


def batch_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and *biased* variance (divide by m), two-pass for accuracy."""
    var, mean = torch.var_mean(x, dim=channel_dims(x), correction=0)
    return mean, var


def normalize(
    x: Tensor, mean: Tensor, inv_std: Tensor, weight: Tensor | None, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """x̂ = (x − μ)·(1/√(σ² + ε)) and y = γ·x̂ + β; returns (y, x̂), x̂ being what backward needs."""
    x_hat = (x - per_channel(mean, x)) * per_channel(inv_std, x)
    y = x_hat if weight is None else x_hat * per_channel(weight, x)
    if bias is not None:
        y = y + per_channel(bias, x)
    return y, x_hat


def gradient_sums(dy: Tensor, x_hat: Tensor) -> tuple[Tensor, Tensor]:
    """The per-channel Σ dy and Σ dy·x̂: β's and γ's gradients, and all dx needs of the batch."""
    dims = channel_dims(dy)
    return dy.sum(dims), (dy * x_hat).sum(dims)


def input_grad_train(
    dy: Tensor,
    x_hat: Tensor,
    inv_std: Tensor,
    weight: Tensor | None,
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    count: float,
) -> Tensor:
    """dx = γ/√(σ² + ε) · (dy − Σdy/m − x̂·Σ(dy·x̂)/m), the chain rule through μ and σ².

    The sums and `count` are over the whole batch, which for the synchronised variant spans
    every process; dy and x̂ are this process's share.
    """
    scale = inv_std if weight is None else inv_std * weight
    centred = dy - per_channel(sum_dy / count, dy) - x_hat * per_channel(sum_dy_xhat / count, dy)
    return centred * per_channel(scale, dy)


def input_grad_eval(dy: Tensor, inv_std: Tensor, weight: Tensor | None) -> Tensor:
    """With fixed statistics BN is a per-channel affine map: dx = γ·dy/√(σ² + ε)."""
    scale = inv_std if weight is None else inv_std * weight
    return dy * per_channel(scale, dy)


@torch.no_grad()
def update_running_stats(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: int,
    factor: float,
) -> None:
    """r ← (1 − f)·r + f·batch, in place, storing the *unbiased* variance as PyTorch does.

    Folded weights are computed from these buffers, so a different variance convention here
    would make every folded model disagree with PyTorch's by a factor m/(m − 1) in σ².
    """
    if running_mean is not None:
        running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
    if running_var is not None:
        unbiased = var * (count / (count - 1))
        running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)


# --------------------------------------------------------------------------- autograd


class BatchNormTrain(torch.autograd.Function):
    """Training-mode BN with batch statistics; returns (y, μ, σ² biased), μ and σ² as constants."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        require_batch(values_per_channel(x), x.shape)
        mean, var = batch_moments(x)
        inv_std = torch.rsqrt(var + eps)
        y, x_hat = normalize(x, mean, inv_std, weight, bias)
        ctx.save_for_backward(x_hat, inv_std, weight)
        ctx.count = values_per_channel(x)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, dy: Tensor, _dmean: Tensor | None, _dvar: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        x_hat, inv_std, weight = ctx.saved_tensors
        sum_dy, sum_dy_xhat = gradient_sums(dy, x_hat)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = input_grad_train(dy, x_hat, inv_std, weight, sum_dy, sum_dy_xhat, ctx.count)
        dweight = sum_dy_xhat if ctx.needs_input_grad[1] else None
        dbias = sum_dy if ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None


class BatchNormInference(torch.autograd.Function):
    """Inference-mode BN with given (population) statistics, which receive no gradient."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        mean: Tensor,
        var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
    ) -> Tensor:
        inv_std = torch.rsqrt(var + eps)
        y, x_hat = normalize(x, mean, inv_std, weight, bias)
        ctx.save_for_backward(x_hat, inv_std, weight)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x_hat, inv_std, weight = ctx.saved_tensors
        sum_dy, sum_dy_xhat = gradient_sums(dy, x_hat)
        dx = input_grad_eval(dy, inv_std, weight) if ctx.needs_input_grad[0] else None
        dweight = sum_dy_xhat if ctx.needs_input_grad[3] else None
        dbias = sum_dy if ctx.needs_input_grad[4] else None
        return dx, None, None, dweight, dbias, None


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """`F.batch_norm`'s contract, computed by the functions above.

    In training the batch statistics normalise and, when running buffers are given, update them
    in place with factor `momentum` (unbiased variance); otherwise the running statistics
    normalise. Raises ValueError when training on one value per channel, as PyTorch does.
    """
    if training:
        y, mean, var = BatchNormTrain.apply(x, weight, bias, eps)
        count = values_per_channel(x)
        update_running_stats(running_mean, running_var, mean, var, count, momentum)
        return y
    if running_mean is None or running_var is None:
        raise ValueError("inference-mode batch norm needs running_mean and running_var")
    return BatchNormInference.apply(x, running_mean, running_var, weight, bias, eps)


# --------------------------------------------------------------------------- modules


def running_update_factor(bn: _BatchNorm) -> float:
    """Count this training step and return its running-average factor, as `_BatchNorm` does.

    `momentum=None` means the cumulative average: step k weighs 1/k, so after K steps every
    batch has weighed 1/K.
    """
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return factor


def uses_batch_stats(bn: _BatchNorm) -> bool:
    """Training, or no running statistics to use: PyTorch's rule for normalising by the batch."""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def running_buffers(bn: _BatchNorm) -> tuple[Tensor | None, Tensor | None]:
    """The buffers to read or update; none while training without tracking (PyTorch's rule)."""
    if not bn.training or bn.track_running_stats:
        return bn.running_mean, bn.running_var
    return None, None


def is_tracing(x: Tensor | Any) -> bool:
    """Export, jit and fx tracing should see one standard batch_norm op, not our elementwise ops.

    The exported ONNX then holds a BatchNormalization node, as with nn.BatchNorm2d.
    """
    return isinstance(x, torch.fx.Proxy) or torch.compiler.is_exporting() or torch.jit.is_tracing()


def reference_forward(bn: _BatchNorm, x: Tensor, factor: float) -> Tensor:
    """`_BatchNorm.forward` after its bookkeeping, computed by this module's functions.

    While tracing for export, inference calls `F.batch_norm` instead (the same equation) so the
    exported graph holds one standard BatchNormalization node.
    """
    training = uses_batch_stats(bn)
    running_mean, running_var = running_buffers(bn)
    if not training and is_tracing(x):
        return F.batch_norm(x, running_mean, running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return batch_norm(x, running_mean, running_var, bn.weight, bn.bias, training, factor, bn.eps)


class _ReferenceBatchNorm(_BatchNorm):
    """`_BatchNorm` with its forward and backward computed by this module's functions.

    Parameters, buffers, state-dict keys and the running-average rules are `_BatchNorm`'s, so a
    state dict moves freely between this and `nn.BatchNorm1d/2d`.
    """

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        return reference_forward(self, input, running_update_factor(self))


class ReferenceBatchNorm1d(_ReferenceBatchNorm):
    """The reference BN for (N, C) or (N, C, L) inputs; a drop-in for nn.BatchNorm1d."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class ReferenceBatchNorm2d(_ReferenceBatchNorm):
    """The reference BN for (N, C, H, W) inputs; a drop-in for nn.BatchNorm2d."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


# --------------------------------------------------------------------------- conversion


def rebuild_batchnorm(bn: _BatchNorm, cls: type[_BatchNorm], **kwargs: Any) -> _BatchNorm:
    """A `cls` BN that shares `bn`'s parameters and buffers (so an optimizer built later, or a
    state dict loaded later, sees one set of tensors) and keeps its training mode."""
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, **kwargs)
    if bn.affine:
        new.weight, new.bias = bn.weight, bn.bias
    new.running_mean, new.running_var = bn.running_mean, bn.running_var
    new.num_batches_tracked = bn.num_batches_tracked
    new.train(bn.training)
    return new


def replace_batchnorms(
    module: nn.Module, replace: Callable[[_BatchNorm], nn.Module | None]
) -> nn.Module:
    """Swap every BN for which `replace` returns a module, in place, as PyTorch's
    `convert_sync_batchnorm` does; returns the (possibly new) root."""
    if isinstance(module, _BatchNorm):
        return replace(module) or module
    for name, child in module.named_children():
        new = replace_batchnorms(child, replace)
        if new is not child:
            setattr(module, name, new)
    return module


def _reference_for(bn: _BatchNorm) -> nn.Module | None:
    if type(bn) is nn.BatchNorm1d:
        return rebuild_batchnorm(bn, ReferenceBatchNorm1d)
    if type(bn) is nn.BatchNorm2d:
        return rebuild_batchnorm(bn, ReferenceBatchNorm2d)
    return None


def use_batchnorm_impl(model: nn.Module, impl: str) -> nn.Module:
    """Make a model's nn.BatchNorm1d/2d layers the `impl` implementation ('torch' keeps them).

    The swap reuses parameters and buffers, so a model built with a seed and then converted
    starts from the same weights as the unconverted one.
    """
    if impl not in BN_IMPLS:
        raise ConfigError(f"unknown BatchNorm implementation {impl!r}; choose one of {BN_IMPLS}")
    return model if impl == "torch" else replace_batchnorms(model, _reference_for)
