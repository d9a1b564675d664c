"""The fold arithmetic against an independent oracle: run the layer, then eval-mode BN by hand.

The oracle is the ONNX reference definition of BatchNormalization (``(x - mean) / sqrt(var +
eps) * gamma + beta``, per channel on axis 1) applied to torch's functional convolutions in
float64, so a layout mistake in the fold (per-group scales of transposed convolutions, the input
channel of a grouped weight) shows up as a wrong output, not as a matching wrong formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from training import fold_math
from training.errors import FoldRangeError

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@dataclass(frozen=True)
class Layer:
    """A functional convolution (or linear layer when dims == 0) and its input size."""

    dims: int
    transposed: bool
    in_ch: int
    out_ch: int
    groups: int
    kernel: int
    stride: int
    dilation: int
    padding: int
    output_padding: int
    size: int
    bias: bool

    def weight_shape(self) -> tuple[int, ...]:
        if self.dims == 0:
            return (self.out_ch, self.in_ch)
        lead = (self.in_ch, self.out_ch // self.groups)
        if not self.transposed:
            lead = (self.out_ch, self.in_ch // self.groups)
        return (*lead, *([self.kernel] * self.dims))

    def input_shape(self, batch: int = 3) -> tuple[int, ...]:
        return (batch, self.in_ch, *([self.size] * self.dims))

    def __call__(self, x: Tensor, w: Tensor, b: Tensor | None, pad: int | None = None) -> Tensor:
        if self.dims == 0:
            return F.linear(x, w, b)
        padding = self.padding if pad is None else pad
        if self.transposed:
            fn = CONV_T[self.dims]
            return fn(
                x, w, b, self.stride, padding, self.output_padding, self.groups, self.dilation
            )
        return CONV[self.dims](x, w, b, self.stride, padding, self.dilation, self.groups)


@st.composite
def layers(draw: st.DrawFn, *, transposed: bool | None = None, linear: bool = True) -> Layer:
    dims = draw(st.sampled_from([0, 1, 2, 3] if linear else [1, 2, 3]))
    is_t = dims > 0 and (draw(st.booleans()) if transposed is None else transposed)
    groups = 1 if dims == 0 else draw(st.sampled_from([1, 2, 3]))
    in_ch = groups * draw(st.integers(1, 2))
    out_ch = groups * draw(st.integers(1, 2))
    kernel, stride, dilation = (draw(st.integers(1, 3)) for _ in range(3))
    stride, dilation = min(stride, 2), min(dilation, 2)
    padding = draw(st.integers(0, 2))
    output_padding = draw(st.integers(0, max(stride, dilation) - 1)) if is_t else 0
    low = max(3, 1 + dilation * (kernel - 1))
    size = draw(st.integers(low, max(low, 3 if dims == 3 else 6)))
    if is_t:  # a transposed output must keep at least one element
        span = (size - 1) * stride + dilation * (kernel - 1) + output_padding + 1
        padding = min(padding, (span - 1) // 2)
    bias = draw(st.booleans())
    return Layer(
        dims,
        is_t,
        in_ch,
        out_ch,
        groups,
        kernel,
        stride,
        dilation,
        padding,
        output_padding,
        size,
        bias,
    )


@dataclass(frozen=True)
class BN:
    mean: Tensor
    var: Tensor
    eps: float
    gamma: Tensor | None
    beta: Tensor | None

    def __call__(self, x: Tensor) -> Tensor:
        """ONNX's BatchNormalization, written out: no torch BN code on this path."""
        view = (1, -1, *([1] * (x.ndim - 2)))
        y = (x - self.mean.reshape(view)) / torch.sqrt(self.var.reshape(view) + self.eps)
        if self.gamma is not None:
            y = y * self.gamma.reshape(view)
        return y if self.beta is None else y + self.beta.reshape(view)

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        return fold_math.bn_scale_shift(self.mean, self.var, self.eps, self.gamma, self.beta)


def random_bn(channels: int, seed: int, *, affine: bool = True, zero_shift: bool = False) -> BN:
    """Per-channel statistics spanning near-zero variance, large means and negative gamma."""
    g = torch.Generator().manual_seed(seed)

    def rand(*scale: float) -> Tensor:
        pick = torch.randint(0, len(scale), (channels,), generator=g)
        return torch.randn(channels, generator=g, dtype=torch.float64) * torch.tensor(scale)[pick]

    mean = torch.zeros(channels, dtype=torch.float64) if zero_shift else rand(1.0, 30.0)
    var = torch.exp(rand(1.0, 4.0))
    gamma = rand(1.0, 3.0) if affine else None
    beta = None if not affine or zero_shift else rand(1.0, 5.0)
    return BN(mean, var, 1e-5, gamma, beta)


def tensors(layer: Layer, seed: int) -> tuple[Tensor, Tensor | None, Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(layer.weight_shape(), generator=g, dtype=torch.float64)
    b = torch.randn(layer.out_ch, generator=g, dtype=torch.float64) if layer.bias else None
    x = torch.randn(layer.input_shape(), generator=g, dtype=torch.float64) * 2 + 1
    return w, b, x


def assert_close(actual: Tensor, expected: Tensor, tol: float = 1e-10) -> None:
    bound = tol * (1 + float(expected.abs().max()))
    assert float((actual - expected).abs().max()) <= bound


@settings(max_examples=120)
@given(layer=layers(), seed=st.integers(0, 2**16), affine=st.booleans())
def test_fold_into_output_matches_layer_then_bn(layer: Layer, seed: int, affine: bool) -> None:
    w, b, x = tensors(layer, seed)
    bn = random_bn(layer.out_ch, seed + 1, affine=affine)
    s, t = bn.scale_shift()
    w2, b2 = fold_math.fold_into_output(
        w, b, s, t, transposed=layer.transposed, groups=layer.groups
    )
    assert w2.shape == w.shape
    assert_close(layer(x, w2, b2), bn(layer(x, w, b)))


def copy_pad(x: Tensor, pad: int, mode: str) -> Tensor:
    return F.pad(x, [pad] * (2 * (x.ndim - 2)), mode=mode)


@settings(max_examples=100)
@given(
    layer=layers(transposed=False, linear=True),
    seed=st.integers(0, 2**16),
    mode=st.sampled_from(["replicate", "reflect", "circular"]),
)
def test_fold_into_input_is_exact_with_copying_padding(layer: Layer, seed: int, mode: str) -> None:
    """BN → conv: a padding that copies values commutes with a per-channel affine map."""
    w, b, x = tensors(layer, seed)
    bn = random_bn(layer.in_ch, seed + 1)
    s, t = bn.scale_shift()
    w2, b2 = fold_math.fold_into_input(w, b, s, t, groups=layer.groups)
    pad = min(layer.padding, layer.size - 1) if layer.dims else 0
    expected = layer(copy_pad(bn(x), pad, mode) if pad else bn(x), w, b, pad=0)
    actual = layer(copy_pad(x, pad, mode) if pad else x, w2, b2, pad=0)
    assert_close(actual, expected)


@settings(max_examples=60)
@given(layer=layers(linear=False), seed=st.integers(0, 2**16), affine=st.booleans())
def test_zero_shift_folds_into_input_across_zero_padding(
    layer: Layer, seed: int, affine: bool
) -> None:
    """A scale-only BN commutes with zero padding and with transposed convolutions."""
    w, b, x = tensors(layer, seed)
    bn = random_bn(layer.in_ch, seed + 1, affine=affine, zero_shift=True)
    s, t = bn.scale_shift()
    w2, b2 = fold_math.fold_into_input(w, b, s, t, transposed=layer.transposed, groups=layer.groups)
    assert_close(layer(x, w2, b2), layer(bn(x), w, b))


def test_shifted_bn_into_transposed_input_is_refused() -> None:
    w = torch.randn(2, 3, 3, dtype=torch.float64)
    s, t = torch.ones(2, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="transposed"):
        fold_math.fold_into_input(w, None, s, t, transposed=True)


def test_zero_padding_makes_a_shifted_bn_inexact() -> None:
    """Why the folder refuses BN → zero-padded conv: the border outputs differ."""
    layer = Layer(2, False, 1, 1, 1, 3, 1, 1, 1, 0, 4, False)
    w, b, x = tensors(layer, 0)
    bn = BN(*(torch.tensor([v], dtype=torch.float64) for v in (0.5, 1.0)), 0.0, None, None)
    s, t = bn.scale_shift()
    w2, b2 = fold_math.fold_into_input(w, b, s, t)
    diff = (layer(x, w2, b2) - layer(bn(x), w, b)).abs()
    assert float(diff[..., 1:-1, 1:-1].max()) < 1e-12  # interior: exact
    assert float(diff.max()) > 1e-3  # border: not


# ----------------------------------------------------------------- torch.nn.utils.fusion


@settings(max_examples=60)
@given(layer=layers(), seed=st.integers(0, 2**16), affine=st.booleans())
def test_weights_equal_torch_fusion_where_it_is_correct(
    layer: Layer, seed: int, affine: bool
) -> None:
    """torch's helpers agree with us wherever they are right (not grouped transposed convs)."""
    if layer.transposed and layer.groups > 1:
        layer = Layer(**{**layer.__dict__, "groups": 1})
    if layer.dims == 0 and not affine:
        affine = True  # fuse_linear_bn_weights crashes on affine=False (pytorch#122183)
    w, b, _ = tensors(layer, seed)
    bn = random_bn(layer.out_ch, seed + 1, affine=affine)
    s, t = bn.scale_shift()
    ours = fold_math.fold_into_output(w, b, s, t, transposed=layer.transposed, groups=layer.groups)
    f32 = [None if v is None else v.float() for v in (w, b, bn.mean, bn.var, bn.gamma, bn.beta)]
    w32, b32, mean, var, gamma, beta = f32
    if layer.dims == 0:
        theirs = fuse_linear_bn_weights(w32, b32, mean, var, bn.eps, gamma, beta)
    else:
        theirs = fuse_conv_bn_weights(w32, b32, mean, var, bn.eps, gamma, beta, layer.transposed)
    (w_ours, b_ours), (w_theirs, b_theirs) = ours, theirs
    assert w_ours.shape == w_theirs.shape
    assert relative_diff(w_ours, w_theirs) <= 1e-6
    # b' = s*b + beta - s*mean cancels; judge it against the size of its terms.
    s, t = bn.scale_shift()
    terms = (s * (b if b is not None else 0)).abs() + (s * bn.mean).abs() + (t + s * bn.mean).abs()
    assert float((b_ours - b_theirs.double()).abs().max()) <= 1e-6 * float(terms.max())


def relative_diff(mine: Tensor, theirs: Tensor) -> float:
    return float((mine - theirs.double()).abs().max()) / float(mine.abs().max())


# ----------------------------------------------------------------- statistics and dtypes


@pytest.mark.parametrize(
    ("var", "mean", "match"),
    [
        ([1.0, -0.5], [0.0, 0.0], "negative"),
        ([1.0, math.nan], [0.0, 0.0], "running_var holds NaN"),
        ([1.0, 1.0], [math.inf, 0.0], "running_mean holds NaN or inf"),
    ],
)
def test_statistics_problem_names_the_bad_buffer(var: list, mean: list, match: str) -> None:
    problem = fold_math.statistics_problem(torch.tensor(mean), torch.tensor(var), 1e-5, None, None)
    assert problem is not None
    assert match in problem


def test_statistics_problem_rejects_an_infinite_scale_and_accepts_good_stats() -> None:
    zero = torch.zeros(2)
    assert "infinite" in str(fold_math.statistics_problem(zero, zero, 0.0, None, None))
    assert fold_math.statistics_problem(zero, torch.ones(2), 1e-5, torch.ones(2), zero) is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cast_checked_refuses_what_the_dtype_cannot_hold(dtype: torch.dtype) -> None:
    big = torch.tensor([1.0, torch.finfo(dtype).max * 4.0], dtype=torch.float64)
    with pytest.raises(FoldRangeError, match="exceeds"):
        fold_math.cast_checked(big, dtype)
    ok = fold_math.cast_checked(torch.tensor([1.5, -2.0], dtype=torch.float64), dtype)
    assert ok.dtype == dtype
    assert ok.tolist() == [1.5, -2.0]


def test_half_precision_buffers_are_upcast_before_arithmetic() -> None:
    """In float16, var + eps rounds eps away; the fold must add it in float64."""
    var = torch.tensor([1e-4], dtype=torch.float16)
    scale, _ = fold_math.bn_scale_shift(torch.zeros(1, dtype=torch.float16), var, 1e-5, None, None)
    assert scale.dtype == torch.float64
    expected = 1 / math.sqrt(float(var.double()) + 1e-5)
    assert abs(float(scale) - expected) <= 1e-12 * expected


def test_relative_change() -> None:
    before = torch.tensor([1.0, -2.0])
    assert fold_math.relative_change(before, before) == 0.0
    assert fold_math.relative_change(before, torch.tensor([1.0, -1.0])) == pytest.approx(0.5)
    assert fold_math.relative_change(torch.zeros(2), torch.ones(2)) == math.inf
