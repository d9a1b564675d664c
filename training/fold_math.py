"""Pure float64 arithmetic for folding an eval-mode BatchNorm into a convolution or linear layer.

Eval-mode BatchNorm is a per-channel affine map, ``bn(x) = s * x + t`` with
``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s``. Folding it into the layer that
produces its input (*bn-after*) or consumes its output (*bn-before*) is a matter of scaling the
right slices of the weight. The only subtle part is which slice: a convolution's weight is laid
out ``(out, in / groups, *k)`` but a transposed convolution's is ``(in, out / groups, *k)``, so a
per-output-channel scale must be laid out per group there (PyTorch's own
``fuse_conv_bn_weights(transpose=True)`` ignores groups: pytorch/pytorch#180995).

Everything here is a function of tensors alone (no modules, no I/O), computes in float64 and
leaves the single cast to the layer's dtype to :func:`cast_checked`, which refuses values the
target dtype cannot hold rather than silently producing ``inf``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from training.errors import FoldRangeError

# A linear layer is a 1×1 convolution with one group, so these helpers treat
# nn.Linear's (out, in) weight exactly like a kernel-less convolution weight.


def statistics_problem(
    mean: Tensor, var: Tensor, eps: float, weight: Tensor | None, bias: Tensor | None
) -> str | None:
    """Say why these BatchNorm statistics cannot be folded, or return None when they can.

    A fold of NaN/inf statistics or a negative variance would bake garbage into the weights
    where the unfolded model at least fails visibly, so such a BatchNorm is left alone.
    """
    named = {"running_mean": mean, "running_var": var, "weight": weight, "bias": bias}
    for name, tensor in named.items():
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            return f"{name} holds NaN or inf"
    if bool((var < 0).any()):
        return f"running_var is negative (min {float(var.min()):.3g})"
    if bool((_f64(var) + eps <= 0).any()):
        return f"running_var + eps is zero (eps={eps:g}): the scale is infinite"
    return None


def bn_scale_shift(
    mean: Tensor, var: Tensor, eps: float, weight: Tensor | None, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Return (s, t) in float64 with ``bn(x) = s * x + t`` per channel.

    Buffers are upcast before any arithmetic, so float16/bfloat16 statistics lose nothing
    beyond what their storage already lost. ``affine=False`` means gamma = 1 and beta = 0.
    """
    scale = 1.0 / torch.sqrt(_f64(var) + eps)
    if weight is not None:
        scale = scale * _f64(weight)
    shift = -_f64(mean) * scale
    if bias is not None:
        shift = shift + _f64(bias)
    return scale, shift


def fold_into_output(
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor,
    shift: Tensor,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Fold a BatchNorm that follows the layer: ``W' = s ⊙ W`` per output channel, ``b' = s·b + t``.

    ``scale``/``shift`` are indexed by the layer's output channel (or output feature).
    """
    w64 = _f64(weight)
    view = _output_channel_view(scale, w64.shape, transposed, groups)
    b64 = torch.zeros_like(scale) if bias is None else _f64(bias)
    return w64 * view, scale * b64 + shift


def fold_into_input(
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor,
    shift: Tensor,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[Tensor, Tensor | None]:
    """Fold a BatchNorm that precedes the layer: ``W' = W ⊙ s`` per input channel, ``b' = b + W·t``.

    ``scale``/``shift`` are indexed by the layer's input channel (or input feature). The shift
    term ``W·t`` sums over every kernel tap, which equals the original output only where every
    tap sees a BN output: the caller decides exactness (zero padding breaks it at the borders,
    and a transposed convolution breaks it wherever outputs receive different numbers of taps),
    so a transposed layer accepts a zero shift only.
    """
    w64 = _f64(weight)
    b64 = None if bias is None else _f64(bias)
    if transposed:
        if bool((shift != 0).any()):
            raise ValueError("a BatchNorm with a non-zero shift cannot fold into a transposed conv")
        # (in, out/groups, *k): the input channel is axis 0 whatever the groups.
        return w64 * _broadcast_axis0(scale, w64.ndim), b64
    s_view = _input_channel_view(scale, w64.shape, groups)
    if bool((shift == 0).all()):
        return w64 * s_view, b64
    t_view = _input_channel_view(shift, w64.shape, groups)
    bias_shift = (w64 * t_view).flatten(1).sum(dim=1)
    return w64 * s_view, bias_shift if b64 is None else b64 + bias_shift


def cast_checked(values: Tensor, dtype: torch.dtype) -> Tensor:
    """Cast float64 fold results to the layer's dtype once, refusing values it cannot hold."""
    if dtype.is_floating_point:
        limit = torch.finfo(dtype).max
        largest = float(values.detach().abs().max()) if values.numel() else 0.0
        if not largest <= limit:  # also catches NaN
            raise FoldRangeError(
                f"folded value {largest:.3g} exceeds the {dtype} maximum {limit:.3g}"
            )
    return values.detach().to(dtype)


def relative_change(before: Tensor, after: Tensor) -> float:
    """Largest elementwise change relative to the largest original magnitude (0 when equal)."""
    delta = float((_f64(after) - _f64(before)).abs().max())
    base = float(_f64(before).abs().max())
    if delta == 0.0:
        return 0.0
    return delta / base if base > 0 else float("inf")


def _f64(tensor: Tensor) -> Tensor:
    """Upcast without recording autograd history: folding is arithmetic on values."""
    return tensor.detach().to(torch.float64)


def _broadcast_axis0(per_channel: Tensor, ndim: int) -> Tensor:
    return per_channel.reshape(-1, *([1] * (ndim - 1)))


def _output_channel_view(
    per_channel: Tensor, shape: torch.Size, transposed: bool, groups: int
) -> Tensor:
    """Lay a per-output-channel vector out so it broadcasts against the weight."""
    if not transposed:
        return _broadcast_axis0(per_channel, len(shape))
    # Transposed weight (in, out/groups, *k): w[i, j] feeds output channel g*(out/groups) + j,
    # where g = i // (in/groups) is the group of input channel i.
    in_ch, out_per_group = shape[0], shape[1]
    by_group = per_channel.reshape(groups, 1, out_per_group)
    laid_out = by_group.expand(groups, in_ch // groups, out_per_group).reshape(in_ch, out_per_group)
    return laid_out.reshape(in_ch, out_per_group, *([1] * (len(shape) - 2)))


def _input_channel_view(per_channel: Tensor, shape: torch.Size, groups: int) -> Tensor:
    """Lay a per-input-channel vector out against a (out, in/groups, *k) weight."""
    # w[o, i] reads input channel g*(in/groups) + i, where g = o // (out/groups).
    out_ch, in_per_group = shape[0], shape[1]
    by_group = per_channel.reshape(groups, 1, in_per_group)
    laid_out = by_group.expand(groups, out_ch // groups, in_per_group).reshape(out_ch, in_per_group)
    return laid_out.reshape(out_ch, in_per_group, *([1] * (len(shape) - 2)))
