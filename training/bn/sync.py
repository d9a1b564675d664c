"""BatchNorm whose batch is the union of every process's batch, on gloo (CPU) as well as NCCL.

PyTorch's `nn.SyncBatchNorm` refuses CPU tensors, so data-parallel training on CPUs could not
normalise over the global batch. The maths of training.bn.reference needs only per-channel sums
from the other processes, so this module all-reduces exactly those:

- forward: one all-reduce of [Σx, Σx², m] per channel (m the value count, so ranks may hold
  batches of different sizes), from which μ = Σx/m and the biased σ² = Σx²/m − μ²;
- backward: one all-reduce of [Σdy, Σdy·x̂], from which every rank's dx follows.

The sums are accumulated and reduced in float64: Σx²/m − μ² cancels catastrophically in float32
when |μ| ≫ σ. γ's and β's gradients are returned as *this rank's* sums, as nn.SyncBatchNorm
does, because DistributedDataParallel all-reduces parameter gradients itself.

Without an initialised process group (or with one process) it is plain BatchNorm, so the same
model runs single-process unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from training.bn.reference import (
    channel_dims,
    gradient_sums,
    input_grad_train,
    normalize,
    rebuild_batchnorm,
    reference_forward,
    replace_batchnorms,
    require_batch,
    running_buffers,
    running_update_factor,
    update_running_stats,
    values_per_channel,
)

ProcessGroup = Any  # dist.ProcessGroup, or None for the default (WORLD) group


def is_distributed(group: ProcessGroup = None) -> bool:
    """True when there is more than one process to synchronise with."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_reduce_sum(t: Tensor, group: ProcessGroup) -> Tensor:
    """Sum `t` over the group's processes (in place), or leave it when running alone."""
    if is_distributed(group):
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def global_moments(x: Tensor, group: ProcessGroup) -> tuple[Tensor, Tensor, int]:
    """Per-channel mean, biased variance and value count over every process's batch."""
    dims = channel_dims(x)
    wide = x.to(torch.float64)
    count = torch.full((1,), float(values_per_channel(x)), dtype=torch.float64, device=x.device)
    sums = torch.cat([wide.sum(dims), (wide * wide).sum(dims), count])
    all_reduce_sum(sums, group)
    channels = x.shape[1]
    total = int(sums[-1].item())
    require_batch(total, x.shape)
    mean = sums[:channels] / total
    var = (sums[channels : 2 * channels] / total - mean * mean).clamp_min(0)
    return mean.to(x.dtype), var.to(x.dtype), total


class SyncBatchNormTrain(torch.autograd.Function):
    """Training-mode BN over the group's global batch; returns (y, μ, σ² biased, m)."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        group: ProcessGroup,
    ) -> tuple[Tensor, Tensor, Tensor, int]:
        mean, var, count = global_moments(x, group)
        inv_std = torch.rsqrt(var + eps)
        y, x_hat = normalize(x, mean, inv_std, weight, bias)
        ctx.save_for_backward(x_hat, inv_std, weight)
        ctx.count, ctx.group = count, group
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var, count

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor, *_constants: Any) -> tuple[Tensor | None, ...]:
        x_hat, inv_std, weight = ctx.saved_tensors
        sum_dy, sum_dy_xhat = gradient_sums(dy, x_hat)
        dx = None
        if ctx.needs_input_grad[0]:
            # Every rank must join this all-reduce, whether or not it wants dx.
            wide = torch.cat([sum_dy, sum_dy_xhat]).to(torch.float64)
            total_dy, total_dy_xhat = all_reduce_sum(wide, ctx.group).to(dy.dtype).chunk(2)
            dx = input_grad_train(dy, x_hat, inv_std, weight, total_dy, total_dy_xhat, ctx.count)
        dweight = sum_dy_xhat if ctx.needs_input_grad[1] else None
        dbias = sum_dy if ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None, None


class SyncBatchNorm(_BatchNorm):
    """BatchNorm for any input rank ≥ 2 that normalises over the group's global batch in training.

    In inference, and when running alone, it is the reference BN and communicates nothing (as
    nn.SyncBatchNorm). The running statistics are updated from the global batch, so they stay
    identical on every rank.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: ProcessGroup = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group
        # The global batch's mean and unbiased variance after a synchronised forward: a
        # population-statistics policy cannot recompute them from this rank's input alone.
        self.last_batch_stats: tuple[Tensor, Tensor] | None = None

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        factor = running_update_factor(self)
        self.last_batch_stats = None
        if not (self.training and is_distributed(self.process_group)):
            return reference_forward(self, input, factor)  # nothing to synchronise
        running_mean, running_var = running_buffers(self)
        y, mean, var, count = SyncBatchNormTrain.apply(
            input, self.weight, self.bias, self.eps, self.process_group
        )
        update_running_stats(running_mean, running_var, mean, var, count, factor)
        self.last_batch_stats = (mean, var * (count / (count - 1)))
        return y


def convert_sync_batchnorm(module: nn.Module, process_group: ProcessGroup = None) -> nn.Module:
    """Replace every BatchNorm of `module` by a SyncBatchNorm sharing its parameters and buffers.

    In place, like `nn.SyncBatchNorm.convert_sync_batchnorm`: convert before building the
    optimizer and wrapping in DistributedDataParallel. Returns the (possibly new) root module.
    """

    def to_sync(bn: _BatchNorm) -> nn.Module | None:
        if isinstance(bn, SyncBatchNorm):
            return None
        return rebuild_batchnorm(bn, SyncBatchNorm, process_group=process_group)

    return replace_batchnorms(module, to_sync)
