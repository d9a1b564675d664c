"""The arithmetic of folding an eval-mode BatchNormalization into a neighbouring linear op.

Pure numpy and nothing else, so the maths can be tested without a graph. Every function takes
and returns float64 arrays: the caller casts the inputs up once and the results back once, so a
float16 model does not lose precision in intermediate products.

An eval-mode BN is the per-channel affine map `y = s * x + t` with

    s = scale / sqrt(var + epsilon)        t = bias - mean * s

Folding it *after* an op scales that op's output channels by `s` and adds `t` to its bias.
Folding it *before* an op scales the op's input channels by `s` and pushes `t` through the op's
weights into its bias, which is exact only where every output sees the same shift (no zero
padding, no per-row scaling); the graph layer decides that, this module only computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Array = np.ndarray


@dataclass(frozen=True)
class Affine:
    """A BatchNormalization in eval mode as `y = scale * x + shift`, one entry per channel."""

    scale: Array
    shift: Array


def bn_affine(scale: Array, bias: Array, mean: Array, var: Array, epsilon: float) -> Affine:
    """The affine map of an eval-mode BN; shapes broadcast as the parameters do (spatial=0 too)."""
    s = np.asarray(scale, np.float64) / np.sqrt(np.asarray(var, np.float64) + float(epsilon))
    t = np.asarray(bias, np.float64) - np.asarray(mean, np.float64) * s
    return Affine(s, t)


def input_growth(scale: Array, bias: Array, mean: Array, var: Array, epsilon: float) -> float:
    """How many times larger an op's input becomes when the BN before it is folded into it.

    Unfolded, the op reads the BN's output, about `|s|*std + |bias|` in size if the BN's input
    follows its running statistics. Folded, it reads the input itself scaled by s, about
    `|s|*(|mean| + std)`, and cancels the difference in its bias afterwards. The ratio is the
    precision lost, in float32 or float16, by folding: 118 for a mean-subtraction BN on pixel
    data (mean 117, var 1), about 1 for a BN inside a network. Largest over channels.
    """
    std = np.sqrt(np.asarray(var, np.float64) + float(epsilon))
    s = np.abs(np.asarray(scale, np.float64)) / std
    folded = s * (np.abs(np.asarray(mean, np.float64)) + std)
    unfolded = s * std + np.abs(np.asarray(bias, np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(folded == 0, 0.0, folded / unfolded)
    return float(np.max(ratio, initial=0.0))


def per_channel(affine: Affine) -> Affine | None:
    """Reduce `[C, D1, ...]` statistics (BN-7 `spatial=0`) to `[C]`, or None if they vary.

    A per-element BN folds into a per-channel weight only when its map is in fact the same at
    every position of a channel; anything else has no exact per-channel equivalent.
    """
    s, t = np.broadcast_arrays(affine.scale, affine.shift)
    if s.ndim == 0:
        return None
    flat_s, flat_t = s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)
    if np.array_equal(flat_s, flat_s[:, :1].repeat(flat_s.shape[1], 1)) and np.array_equal(
        flat_t, flat_t[:, :1].repeat(flat_t.shape[1], 1)
    ):
        return Affine(flat_s[:, 0].copy(), flat_t[:, 0].copy())
    return None


def relative_change(before: Array, after: Array) -> float:
    """Largest elementwise change relative to the largest original magnitude (0 when equal)."""
    delta, base = np.max(np.abs(after - before), initial=0.0), np.max(np.abs(before), initial=0.0)
    return 0.0 if delta == 0 else float(delta / base) if base > 0 else float("inf")


def _along(vector: Array, axis: int, ndim: int) -> Array:
    """Reshape a 1-D vector so it broadcasts along `axis` of an `ndim`-D array."""
    shape = [1] * ndim
    shape[axis] = vector.shape[0]
    return vector.reshape(shape)


# --------------------------------------------------------------------------- BN after the op


def after_conv(weight: Array, bias: Array | None, bn: Affine) -> tuple[Array, Array]:
    """Conv weight `(M, C/group, k...)`: output channel m is row m, whatever the group count."""
    new_bias = bn.shift if bias is None else bias * bn.scale + bn.shift
    return weight * _along(bn.scale, 0, weight.ndim), new_bias


def after_conv_transpose(
    weight: Array, bias: Array | None, bn: Affine, group: int
) -> tuple[Array, Array]:
    """ConvTranspose weight `(C, M/group, k...)`: output channel `g*M/group + j` is column j of
    the rows of group g, so the scale is laid out per group rather than along one axis."""
    c_in, m_per_group = weight.shape[0], weight.shape[1]
    grouped = weight.reshape(group, c_in // group, m_per_group, *weight.shape[2:])
    scale = bn.scale.reshape(group, 1, m_per_group, *([1] * (weight.ndim - 2)))
    new_bias = bn.shift if bias is None else bias * bn.scale + bn.shift
    return (grouped * scale).reshape(weight.shape), new_bias


def after_gemm(
    b: Array, c: Array | None, bn: Affine, alpha: float, beta: float, trans_b: bool
) -> tuple[Array, Array]:
    """Gemm `alpha*A'B' + beta*C`: scale B's output columns; the new C is for `beta = 1`.

    `alpha` stays on the node and needs no change; `beta` is absorbed into the new C.
    """
    del alpha  # scaling B' already scales alpha*A'B'
    new_b = b * (bn.scale[:, None] if trans_b else bn.scale[None, :])
    new_c = bn.shift if c is None else beta * c * bn.scale + bn.shift
    return new_b, new_c


def after_matmul(weight: Array, bias: Array | None, bn: Affine) -> tuple[Array, Array]:
    """`x @ W (+ bias)` with a rank-2 W `(K, N)` and a rank-2 result, so channel = last axis."""
    new_bias = bn.shift if bias is None else bias * bn.scale + bn.shift
    return weight * bn.scale[None, :], new_bias


# --------------------------------------------------------------------------- BN before the op


def before_conv(weight: Array, bias: Array | None, bn: Affine, group: int) -> tuple[Array, Array]:
    """Conv(s*x + t) with no padding: input channel `g*C/group + j` meets weight column j of
    the rows of group g; the shift, summed over the kernel, becomes a constant per output."""
    m, c_per_group = weight.shape[0], weight.shape[1]
    rows_per_group = m // group
    grouped = weight.reshape(group, rows_per_group, c_per_group, -1)
    s = bn.scale.reshape(group, 1, c_per_group, 1)
    t = bn.shift.reshape(group, 1, c_per_group, 1)
    new_weight = (grouped * s).reshape(weight.shape)
    shift_out = (grouped * t).sum(axis=(2, 3)).reshape(m)
    return new_weight, shift_out if bias is None else bias + shift_out


def before_gemm(
    b: Array, c: Array | None, bn: Affine, alpha: float, beta: float, trans_b: bool
) -> tuple[Array, Array]:
    """Gemm with `transA = 0` fed by `s*A + t`: scale B's input rows (K); `alpha * t @ B'` is a
    constant row that joins C. The new C is for `beta = 1`."""
    b_mat = b.T if trans_b else b
    new_b = b * (bn.scale[None, :] if trans_b else bn.scale[:, None])
    row = alpha * (bn.shift @ b_mat)
    new_c = row if c is None else beta * c + row
    return new_b, new_c
