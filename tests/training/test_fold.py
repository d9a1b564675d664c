"""fold_model on whole networks: which BatchNorms fold, which stay and why, and the numbers.

Every generated network has every BatchNorm's statistics and affine parameters randomised per
channel (fresh BNs are identities, which hide layout mistakes), and is judged against a float64
copy of itself: the folded float32 model may at most double the unfolded float32 model's own
error plus 1e-6·(1 + max|y|); a float64 fold must land within 1e-10·(1 + max|y|). Each test also
states which BNs must fold, so a folder that folds nothing cannot pass.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from training import fold_math
from training.errors import (
    FoldVerificationError,
    MissingProbeInputError,
    TrainingModeError,
    UntraceableModelError,
)
from training.fold import FoldReport, fold_model
from training.models import MODELS

BN_CLASS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
CONV_CLASS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T_CLASS = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Stats:
    """How to randomise BN statistics: the regimes the issue names, as hypothesis choices."""

    seed: int
    large_means: bool = False
    tiny_var: bool = False
    tiny_eps: bool = False
    zero_shift: bool = False


stats_strategy = st.builds(
    Stats, st.integers(0, 2**16), st.booleans(), st.booleans(), st.booleans(), st.just(False)
)


class FunctionalBN(nn.Module):
    """A BatchNorm written as an F.batch_norm call on constant buffers (traced, not a leaf)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("var", torch.ones(channels))
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.mean, self.var, self.gamma, self.beta, False, 0.0, self.eps)


def randomise(model: nn.Module, stats: Stats) -> nn.Module:
    """Give every BN per-channel statistics; returns the model in eval mode."""
    g = torch.Generator().manual_seed(stats.seed)
    for module in model.modules():
        names = None
        if isinstance(module, _BatchNorm) and module.running_mean is not None:
            names = ("running_mean", "running_var", "weight", "bias")
        elif isinstance(module, FunctionalBN):
            names = ("mean", "var", "gamma", "beta")
        if names is None:
            continue
        mean, var, gamma, beta = (getattr(module, n) for n in names)
        c = mean.numel()
        with torch.no_grad():
            mean.copy_(torch.randn(c, generator=g) * (300.0 if stats.large_means else 2.0))
            var.copy_(torch.exp(torch.randn(c, generator=g) * 1.5))
            if stats.tiny_var:
                var[torch.rand(c, generator=g) < 0.5] = 1e-7
            if gamma is not None:
                gamma.copy_(torch.randn(c, generator=g) * 1.5)  # negative gamma included
            if beta is not None:
                beta.copy_(torch.randn(c, generator=g) * 2.0)
            if stats.zero_shift:
                mean.zero_()
                if beta is not None:
                    beta.zero_()
        if stats.tiny_eps:
            module.eps = 1e-10
    return model.eval()


def probe(shape: tuple[int, ...], seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if len(shape) > 1:
        view = (1, shape[1], *([1] * (len(shape) - 2)))
        x = x * torch.exp(torch.randn(view, generator=g)) + torch.randn(view, generator=g) * 2
    return x


def max_abs(t: Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def assert_equivalent(model: nn.Module, folded: nn.Module, x: Tensor) -> None:
    """The issue's acceptance rule, against a float64 copy of the unfolded model."""
    with torch.no_grad():
        y_ref = copy.deepcopy(model).double()(x.double())
        err_unfolded = max_abs(model(x).double() - y_ref)
        err_folded = max_abs(folded(x).double() - y_ref)
    assert err_folded <= 2 * err_unfolded + 1e-6 * (1 + max_abs(y_ref)), (err_folded, err_unfolded)


def assert_float64_fold_exact(model: nn.Module, x: Tensor) -> None:
    model64 = copy.deepcopy(model).double()
    folded64, _ = fold_model(model64, x.double())
    with torch.no_grad():
        y_ref = model64(x.double())
        assert max_abs(folded64(x.double()) - y_ref) <= 1e-10 * (1 + max_abs(y_ref))


def fold_and_check(model: nn.Module, x: Tensor) -> tuple[nn.Module, FoldReport]:
    """Fold, check both numeric rules and the metamorphic rule, return the float32 result."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded, report = fold_model(model, x)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # not mutated
    assert_equivalent(model, folded, x)
    assert_float64_fold_exact(model, x)
    assert report.foldable_left == 0
    refolded, again = fold_model(folded, x)
    assert again.folded == ()
    assert refolded.state_dict().keys() == folded.state_dict().keys()
    assert all(torch.equal(v, folded.state_dict()[k]) for k, v in refolded.state_dict().items())
    return folded, report


def outcome(report: FoldReport) -> dict[str, str]:
    """bn name -> 'bn-after' / 'bn-before' / the skip kind."""
    result = {p.bn: p.direction for p in report.folded}
    result.update({s.bn: s.kind for s in report.skipped})
    return result


# --------------------------------------------------------------------------- conv strategies


@dataclass(frozen=True)
class ConvSpec:
    dims: int
    transposed: bool
    in_ch: int
    out_ch: int
    groups: int
    kernel: int
    stride: int
    dilation: int
    padding: int | str
    padding_mode: str
    output_padding: int
    bias: bool
    size: int

    def build(self) -> nn.Module:
        if self.transposed:
            return CONV_T_CLASS[self.dims](
                self.in_ch,
                self.out_ch,
                self.kernel,
                self.stride,
                self.padding,
                self.output_padding,
                self.groups,
                self.bias,
                self.dilation,
            )
        return CONV_CLASS[self.dims](
            self.in_ch,
            self.out_ch,
            self.kernel,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.bias,
            self.padding_mode,
        )

    def zero_padded(self) -> bool:
        """Whether a BN in front of this layer would see zeros at the border."""
        if self.transposed or self.padding_mode != "zeros":
            return False
        if self.padding == "same":
            return self.dilation * (self.kernel - 1) > 0
        return self.padding != 0


@st.composite
def conv_specs(draw: st.DrawFn, transposed: bool | None = None) -> ConvSpec:
    dims = draw(st.sampled_from([1, 2, 2, 3]))
    is_t = draw(st.booleans()) if transposed is None else transposed
    kind = draw(st.sampled_from(["plain", "grouped", "depthwise"]))
    groups = {"plain": 1, "grouped": 2, "depthwise": draw(st.integers(2, 3))}[kind]
    in_ch = groups * (1 if kind == "depthwise" else draw(st.integers(1, 2)))
    out_ch = groups * draw(st.integers(1, 2))
    kernel = draw(st.integers(1, 3))
    stride, dilation = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    size = draw(st.integers(2, 3)) + dilation * (kernel - 1) + (0 if dims == 3 else 2)
    if is_t:
        padding: int | str = draw(st.integers(0, (dilation * (kernel - 1)) // 2))
        out_pad = draw(st.integers(0, max(stride, dilation) - 1))
        return ConvSpec(
            dims, True, in_ch, out_ch, groups, kernel, stride, dilation, padding, "zeros",
            out_pad, draw(st.booleans()), size,
        )  # fmt: skip
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    # Reflect, replicate and circular padding must be smaller than the input they copy from.
    fits = [p for p in (0, 1, 2) if mode == "zeros" or p < size]
    same_fits = stride == 1 and (mode == "zeros" or dilation * (kernel - 1) < size)
    padding = draw(st.sampled_from([*fits, "same"] if same_fits else fits))
    return ConvSpec(
        dims, False, in_ch, out_ch, groups, kernel, stride, dilation, padding, mode, 0,
        draw(st.booleans()), size,
    )  # fmt: skip


def bn_for(dims: int, channels: int, draw: st.DrawFn) -> nn.Module:
    affine = draw(st.booleans())
    momentum = draw(st.sampled_from([0.1, None]))
    return BN_CLASS[dims](channels, eps=draw(st.sampled_from([1e-5, 1e-3])), momentum=momentum,
                          affine=affine)  # fmt: skip


# --------------------------------------------------------------------------- properties


EVEN_SAME = "ignore:Using padding='same' with even kernel lengths:UserWarning"


@pytest.mark.filterwarnings(EVEN_SAME)
@settings(max_examples=90)
@given(data=st.data(), spec=conv_specs(), stats=stats_strategy)
def test_conv_then_bn_always_folds(data: st.DataObject, spec: ConvSpec, stats: Stats) -> None:
    model = randomise(nn.Sequential(spec.build(), bn_for(spec.dims, spec.out_ch, data.draw)), stats)
    x = probe((2, spec.in_ch, *[spec.size] * spec.dims), stats.seed)
    folded, report = fold_and_check(model, x)
    assert outcome(report) == {"1": "bn-after"}
    assert report.folded[0].layers == ("0",)
    assert folded.state_dict()["0.weight"].shape == model.state_dict()["0.weight"].shape


@pytest.mark.filterwarnings(EVEN_SAME)
@settings(max_examples=90)
@given(
    data=st.data(),
    spec=conv_specs(),
    stats=stats_strategy,
    zero_shift=st.booleans(),
)
def test_bn_then_conv_folds_exactly_when_exact(
    data: st.DataObject, spec: ConvSpec, stats: Stats, zero_shift: bool
) -> None:
    """BN → conv folds with no zero padding; BN → ConvTranspose only as a scale-only fold."""
    stats = Stats(**{**stats.__dict__, "zero_shift": zero_shift})
    model = randomise(nn.Sequential(bn_for(spec.dims, spec.in_ch, data.draw), spec.build()), stats)
    x = probe((2, spec.in_ch, *[spec.size] * spec.dims), stats.seed)
    _, report = fold_and_check(model, x)
    foldable = zero_shift or not (spec.transposed or spec.zero_padded())
    assert outcome(report) == {"0": "bn-before" if foldable else "inexact"}
    if foldable:
        assert report.folded[0].exactness == ("scale-only" if zero_shift else "exact")


class LinearNet(nn.Module):
    """Linear and BatchNorm1d on 2-D or 3-D inputs, with the BN's axis aligned or not."""

    def __init__(self, case: str, bn_first: bool, n_in: int, n_out: int, bias: bool) -> None:
        super().__init__()
        self.case, self.bn_first = case, bn_first
        self.fc = nn.Linear(n_in, n_out, bias=bias)
        self.bn = nn.BatchNorm1d(n_in if bn_first else n_out)

    def forward(self, x: Tensor) -> Tensor:
        if self.bn_first:  # x: (N, n_in) or (N, n_in, L)
            y = self.bn(x)
            return self.fc(y.transpose(1, 2) if self.case == "3d-aligned" else y)
        y = self.fc(x)  # x: (N, n_in) or (N, L, n_in)
        return self.bn(y.transpose(1, 2) if self.case == "3d-aligned" else y)


@settings(max_examples=70)
@given(
    case=st.sampled_from(["2d", "3d-aligned", "3d-trap"]),
    bn_first=st.booleans(),
    n_in=st.integers(1, 5),
    n_out=st.integers(1, 5),
    length=st.integers(2, 4),
    bias=st.booleans(),
    stats=stats_strategy,
)
def test_linear_and_batchnorm1d_fold_only_on_the_feature_axis(
    case: str, bn_first: bool, n_in: int, n_out: int, length: int, bias: bool, stats: Stats
) -> None:
    """3-D inputs fold only where the BN normalises the Linear's feature axis, not just size."""
    model = randomise(LinearNet(case, bn_first, n_in, n_out, bias), stats)
    if case == "2d":
        shape: tuple[int, ...] = (3, n_in)
    elif bn_first:  # BN1d on (N, n_in, L); the trap feeds the BN's length axis to fc
        shape = (3, n_in, n_in if case == "3d-trap" else length)
    else:  # the trap makes the sequence length equal the feature count the BN expects
        shape = (3, n_out if case == "3d-trap" else length, n_in)
    _, report = fold_and_check(model, probe(shape, stats.seed))
    expected = "axis-mismatch" if case == "3d-trap" else ("bn-before" if bn_first else "bn-after")
    assert outcome(report) == {"bn": expected}


class FlattenNet(nn.Module):
    """BN2d → Flatten → Linear (folds), and Conv → Flatten → BN1d (folds only when 1×1)."""

    def __init__(self, channels: int, size: int, conv_first: bool) -> None:
        super().__init__()
        self.conv_first = conv_first
        features = channels * size * size
        self.conv = nn.Conv2d(channels, channels, 1)
        self.bn = nn.BatchNorm1d(features) if conv_first else nn.BatchNorm2d(channels)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(features, 3)

    def forward(self, x: Tensor) -> Tensor:
        if self.conv_first:
            return self.fc(torch.relu(self.bn(self.flatten(self.conv(x)))))
        return self.fc(self.flatten(self.bn(torch.relu(self.conv(x)))))


@settings(max_examples=30)
@given(
    channels=st.integers(1, 3),
    size=st.integers(1, 3),
    conv_first=st.booleans(),
    stats=stats_strategy,
)
def test_a_flatten_between(channels: int, size: int, conv_first: bool, stats: Stats) -> None:
    model = randomise(FlattenNet(channels, size, conv_first), stats)
    _, report = fold_and_check(model, probe((2, channels, size, size), stats.seed))
    # Conv → Flatten → BN1d scales each (c, h, w) feature on its own: one conv channel, one
    # scale only when the map is 1×1.
    after = "bn-after" if size == 1 else "axis-mismatch"
    expected = after if conv_first else "bn-before"
    assert outcome(report) == {"bn": expected}


# --------------------------------------------------------------------------- random graphs


class Block(nn.Module):
    """One of the graph shapes the folder must tell apart, on (N, C, H, W) tensors."""

    def __init__(self, kind: str, c: int, variant: bool) -> None:
        super().__init__()
        self.kind, self.variant = kind, variant
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=variant)  # zero padding
        self.conv_r = nn.Conv2d(c, c, 3, padding=1, padding_mode="reflect")
        self.conv_1 = nn.Conv2d(c, c, 1)
        self.up = nn.ConvTranspose2d(c, c, 2, stride=2, groups=c if variant else 1)
        self.bn = nn.BatchNorm2d(c)
        self.bn2: nn.Module = FunctionalBN(c) if kind == "functional" else nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:  # noqa: PLR0911 - one branch per graph shape
        k, v = self.kind, self.variant
        if k == "pair":  # conv → BN → ReLU
            return torch.relu(self.bn(self.conv(x)))
        if k == "residual":  # conv → BN, plus the identity shortcut
            return torch.relu(self.bn(self.conv(x)) + x)
        if k == "chain":  # conv → BN → BN: both fold, one after the other
            return torch.relu(self.bn2(self.bn(self.conv(x))))
        if k == "functional":  # conv → F.batch_norm on constant buffers
            return torch.relu(self.bn2(self.conv(x)))
        if k == "shared":  # one conv module at two call sites (pytorch#104593)
            return torch.relu(self.bn(self.conv(x))) + torch.relu(self.bn2(self.conv(x)))
        if k == "tap":  # the conv's raw output is used too, or the BN's output is
            if v:
                y = self.bn(x)
                return torch.relu(self.conv_r(y) + y)
            h = self.conv(x)
            return torch.relu(self.bn(h) + h)
        if k == "fanout":  # BN → two convs; exact unless one pads with zeros
            y = self.bn(x)
            return torch.relu((self.conv_1(y) if v else self.conv(y)) + self.conv_r(y))
        # "deconv": (grouped) transposed conv → BN, then back down with a pool
        return F.avg_pool2d(torch.relu(self.bn(self.up(x))), 2)

    def expected(self, prefix: str, zero_shift: bool) -> dict[str, str]:
        k, bn, bn2 = self.kind, f"{prefix}.bn", f"{prefix}.bn2"
        if k in ("pair", "residual", "deconv"):
            return {bn: "bn-after"}
        if k in ("chain", "functional"):
            return {bn: "bn-after", bn2: "bn-after"} if k == "chain" else {bn2: "bn-after"}
        if k == "shared":
            return {bn: "multi-call-site", bn2: "multi-call-site"}
        if k == "tap":
            return {bn: "no-adjacent-layer" if self.variant else "shared-output"}
        return {bn: "bn-before" if self.variant or zero_shift else "inexact"}


BLOCK_KINDS = ["pair", "residual", "chain", "functional", "shared", "tap", "fanout", "deconv"]


class RandomNet(nn.Module):
    def __init__(self, kinds: list[tuple[str, bool]], c: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, c, 1)
        self.blocks = nn.Sequential(*(Block(k, c, v) for k, v in kinds))
        self.head_bn = nn.BatchNorm1d(c)
        self.fc = nn.Linear(c, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(torch.relu(self.stem(x)))
        return self.fc(self.head_bn(x.mean(dim=(2, 3))))


@settings(max_examples=60)
@given(
    kinds=st.lists(st.tuples(st.sampled_from(BLOCK_KINDS), st.booleans()), min_size=1, max_size=4),
    c=st.integers(1, 3),
    stats=stats_strategy,
    zero_shift=st.booleans(),
)
def test_random_networks_fold_what_is_exact_and_say_why_not(
    kinds: list[tuple[str, bool]], c: int, stats: Stats, zero_shift: bool
) -> None:
    stats = Stats(**{**stats.__dict__, "zero_shift": zero_shift})
    model = randomise(RandomNet(kinds, c), stats)
    _, report = fold_and_check(model, probe((2, 2, 4, 4), stats.seed))
    expected = {"head_bn": "bn-before"}
    for i, block in enumerate(model.blocks):
        expected |= block.expected(f"blocks.{i}", zero_shift)
    assert outcome(report) == expected


# --------------------------------------------------------------------------- issue threads


def per_group_reference(weight: Tensor, scale: Tensor, groups: int) -> Tensor:
    """ConvTranspose weight (in, out/groups, *k) scaled per output channel, with explicit loops."""
    expected = weight.clone().double()
    in_per_group, out_per_group = weight.shape[0] // groups, weight.shape[1]
    for i in range(weight.shape[0]):
        for j in range(out_per_group):
            expected[i, j] *= scale[(i // in_per_group) * out_per_group + j]
    return expected


@pytest.mark.parametrize(
    ("dims", "channels", "groups", "multiplier"),
    [(2, 4, 4, 1), (2, 3, 3, 2), (1, 4, 2, 3), (3, 2, 2, 1)],
)
def test_pytorch_180995_grouped_conv_transpose_scales_per_group(
    dims: int, channels: int, groups: int, multiplier: int
) -> None:
    """torch's fuse_conv_bn_weights(transpose=True) ignores groups; depthwise is the worst case."""
    out = channels // groups * groups * multiplier
    up = CONV_T_CLASS[dims](channels, out, 3, stride=2, padding=1, output_padding=1, groups=groups)
    model = randomise(nn.Sequential(up, BN_CLASS[dims](out)), Stats(seed=dims * 10 + groups))
    folded, report = fold_and_check(model, probe((2, channels, *[5] * dims), 1))
    assert outcome(report) == {"1": "bn-after"}
    bn = model[1]
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    expected = per_group_reference(up.weight.detach(), scale, groups)
    assert torch.allclose(folded.state_dict()["0.weight"].double(), expected, rtol=1e-6, atol=0)


def test_ultralytics_25364_depthwise_deconv_block_folds_exactly() -> None:
    """ultralytics' ConvTranspose + BN fuse shipped torch's group bug: DWConvTranspose2d case."""

    class DWConvTranspose(nn.Module):  # ultralytics' block: deconv(k=2, s=2, groups) → BN → SiLU
        def __init__(self, c1: int, c2: int) -> None:
            super().__init__()
            self.conv_transpose = nn.ConvTranspose2d(c1, c2, 2, 2, 0, groups=c1, bias=False)
            self.bn = nn.BatchNorm2d(c2)
            self.act = nn.SiLU()

        def forward(self, x: Tensor) -> Tensor:
            return self.act(self.bn(self.conv_transpose(x)))

    model = randomise(DWConvTranspose(4, 8), Stats(seed=25364))
    folded, report = fold_and_check(model, probe((2, 4, 3, 3), 2))
    assert outcome(report) == {"bn": "bn-after"}
    assert folded.state_dict()["conv_transpose.weight"].shape == (4, 2, 2, 2)


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_pytorch_122183_affine_false_batchnorm_folds(layer: str) -> None:
    """fuse_linear_bn_eval crashes on a BN without weight and bias; we fold it."""
    if layer == "linear":
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, affine=False))
        x = probe((5, 3), 3)
    else:
        model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, affine=False))
        x = probe((2, 2, 5, 5), 3)
    randomise(model, Stats(seed=122183))
    folded, report = fold_and_check(model, x)
    assert outcome(report) == {"1": "bn-after"}
    bn, fc = model[1], model[0]
    scale = 1 / torch.sqrt(bn.running_var.double() + bn.eps)
    view = (-1, *[1] * (fc.weight.ndim - 1))
    assert torch.allclose(
        folded.state_dict()["0.weight"].double(), fc.weight.double() * scale.reshape(view)
    )


class CalledTwice(nn.Module):
    """One layer module at two call sites, each followed by its own BN (pytorch#104593/#197539)."""

    def __init__(self, layer: str) -> None:
        super().__init__()
        self.layer: nn.Module = nn.Linear(3, 3) if layer == "linear" else nn.Conv2d(3, 3, 1)
        norm = nn.BatchNorm1d if layer == "linear" else nn.BatchNorm2d
        self.bn1, self.bn2 = norm(3), norm(3)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.bn1(self.layer(x))) * torch.relu(self.bn2(self.layer(x)))


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_pytorch_104593_197539_module_called_at_two_sites_is_left_alone(layer: str) -> None:
    """torch.fx's fuse rewrites the shared module for one site and corrupts the other."""
    model = randomise(CalledTwice(layer), Stats(seed=104593))
    x = probe((4, 3) if layer == "linear" else (2, 3, 4, 4), 4)
    folded, report = fold_and_check(model, x)
    assert outcome(report) == {"bn1": "multi-call-site", "bn2": "multi-call-site"}
    assert "called at 2 sites" in report.skipped[0].reason
    assert torch.equal(folded.state_dict()["layer.weight"], model.layer.weight)


# --------------------------------------------------------------------------- skip rules


def bn_with(**buffers: float) -> nn.Module:
    model = randomise(nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)), Stats(seed=7))
    for name, value in buffers.items():
        getattr(model[1], name)[0] = value
    return model


@pytest.mark.parametrize(
    ("buffers", "reason"),
    [
        ({"running_mean": float("nan")}, "running_mean holds NaN or inf"),
        ({"running_var": float("inf")}, "running_var holds NaN or inf"),
        ({"running_var": -1.0}, "running_var is negative"),
    ],
)
def test_bad_statistics_are_left_alone_with_the_reason(buffers: dict, reason: str) -> None:
    model = bn_with(**buffers)
    x = probe((2, 2, 3, 3), 5)
    _, report = fold_model(model, x, verify=False)
    assert outcome(report) == {"1": "bad-statistics"}
    assert reason in report.skipped[0].reason


def test_a_bn_without_running_statistics_is_left_alone() -> None:
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2, track_running_stats=False)).eval()
    _, report = fold_and_check(model, probe((3, 2, 3, 3), 6))
    assert outcome(report) == {"1": "no-running-stats"}


def test_functional_batch_norm_with_batch_statistics_is_left_alone() -> None:
    class BatchStats(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(self, x: Tensor) -> Tensor:
            return F.batch_norm(self.conv(x), None, None, training=True)

    _, report = fold_and_check(BatchStats().eval(), probe((3, 2, 3, 3), 6))
    assert [s.kind for s in report.skipped] == ["batch-statistics"]


def test_training_mode_raises_and_names_the_classic_mistake() -> None:
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
    with pytest.raises(TrainingModeError, match=r"batch.*model\.eval\(\)") as caught:
        fold_model(model, torch.randn(2, 2, 3, 3))
    assert "1" in str(caught.value)  # names the BN that is training


def standardise(w: Tensor) -> Tensor:
    return (w - w.mean()) / (w.std() + 1e-5)


class Standardise(nn.Module):
    def forward(self, w: Tensor) -> Tensor:
        return standardise(w)


class StandardisedConv(nn.Conv2d):
    """A conv whose forward transforms its weight: traced through, so not a conv node."""

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, standardise(self.weight), self.bias)


def test_bn_subclasses_fold_but_layers_that_transform_their_weight_are_not_folded_into() -> None:
    class MyBN(nn.BatchNorm2d):
        """A user subclass: kept as one BN node, not traced into _BatchNorm's forward."""

    parametrized = nn.Conv2d(2, 2, 1)
    parametrize.register_parametrization(parametrized, "weight", Standardise())
    hooked = nn.Conv2d(2, 2, 1)
    hooked.register_forward_pre_hook(lambda m, args: None)
    layers = [nn.Conv2d(2, 2, 1), StandardisedConv(2, 2, 1), parametrized, hooked]
    model = nn.Sequential(*(m for layer in layers for m in (layer, MyBN(2), nn.ReLU())))
    _, report = fold_and_check(randomise(model, Stats(seed=8)), probe((2, 2, 3, 3), 8))
    assert outcome(report) == {
        "1": "bn-after",
        "4": "no-adjacent-layer",  # its input is an F.conv2d call on a computed weight
        "7": "unsupported-layer",
        "10": "unsupported-layer",
    }


def test_untraceable_model_raises_a_typed_error() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)

        def forward(self, x: Tensor) -> Tensor:
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    with pytest.raises(UntraceableModelError, match="cannot trace Branchy"):
        fold_model(Branchy().eval(), torch.ones(1, 1, 2, 2))


def test_without_example_input_the_probe_comes_from_input_shape() -> None:
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)).eval()
    with pytest.raises(MissingProbeInputError, match="example_input"):
        fold_model(model)
    model.input_shape = (2, 4, 4)  # type: ignore[assignment]
    folded, report = fold_model(model)
    assert report.verification is not None
    assert report.verification.probe == "generated"
    assert report.verification.probe_shape == (4, 2, 4, 4)
    assert folded.input_shape == (2, 4, 4)  # plain attributes are carried over


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_fold_in_float64_and_cast_once(dtype: torch.dtype) -> None:
    model = randomise(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), Stats(seed=9))
    model = model.to(dtype)
    folded, report = fold_model(model, probe((2, 3, 5, 5), 9).to(dtype))
    assert outcome(report) == {"1": "bn-after"}
    assert folded.state_dict()["0.weight"].dtype == dtype
    conv, bn = model[0], model[1]
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    expected = (conv.weight.double() * scale.reshape(-1, 1, 1, 1)).to(dtype)
    assert torch.equal(folded.state_dict()["0.weight"], expected)  # one rounding, not several


def test_a_fold_that_overflows_float16_is_left_alone() -> None:
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2, eps=1e-12)).eval()
    with torch.no_grad():
        model[0].weight.fill_(100.0)
        model[1].running_var.fill_(1e-7)  # scale ~ 3000: folded weights ~ 3e5 > 65504
    _, report = fold_model(model.half(), torch.ones(1, 2, 2, 2, dtype=torch.float16), verify=False)
    assert outcome(report) == {"1": "dtype-range"}
    assert "float16" in report.skipped[0].reason


# --------------------------------------------------------------------------- verification, report


def test_a_wrong_fold_fails_verification_and_names_the_layer(monkeypatch: Any) -> None:
    real = fold_math.fold_into_output

    def off_by_a_bit(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        weight, bias = real(*args, **kwargs)
        return weight * 1.01, bias

    monkeypatch.setattr(fold_math, "fold_into_output", off_by_a_bit)
    model = randomise(nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)), Stats(seed=10))
    with pytest.raises(FoldVerificationError, match="worst folded layer: 0") as caught:
        fold_model(model, probe((2, 2, 3, 3), 10))
    assert caught.value.max_abs_diff > 0
    assert caught.value.worst_layer is not None
    assert caught.value.worst_layer.startswith("0 (folded with 1)")
    _, report = fold_model(model, probe((2, 2, 3, 3), 10), verify=False)
    assert report.verification is None


def test_report_is_json_and_readable() -> None:
    spec = MODELS["preact"]
    model = randomise(spec.make(widths=(4, 8)), Stats(seed=11))
    _, report = fold_model(model)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["foldable_left"] == 0
    assert data["verification"]["passed"] is True
    assert {f["direction"] for f in data["folded"]} == {"bn-after", "bn-before"}
    assert data["before"]["batchnorms"] == 7
    assert data["after"]["batchnorms"] == 3
    assert data["after"]["parameters"] < data["before"]["parameters"]
    lines = [line.split() for line in str(report).splitlines()]
    assert ["input_bn", "bn-before", "exact", "into", "stem", "(Conv2d)"] in lines
    assert ["head_bn", "bn-before", "exact", "into", "fc", "(Linear)"] in lines
    assert "blocks.0.bn1 [shared-output]: as bn-after, stem's output also feeds add" in str(report)
    assert "verification (generated probe 4x1x8x8, float32): passed" in str(report)


# --------------------------------------------------------------------------- the registry

SMALL_CONFIGS: dict[str, dict[str, Any]] = {
    "resnet18": {"image_size": 32, "widths": (4, 8, 8, 16), "num_classes": 5},
    "mobilenet": {"image_size": 32, "stem_width": 4, "blocks": ((8, 1), (16, 2)), "num_classes": 5},
    "digits_cnn": {"widths": (4, 8)},
    "mlp": {"hidden": (16, 8)},
    "preact": {"widths": (4, 8)},
}


def expected_registry_outcome(name: str, model: nn.Module) -> dict[str, str] | None:
    """preact's BN → ReLU pairs stay; every other registry BN folds into its conv/linear."""
    if name != "preact":
        return None
    expected = {"input_bn": "bn-before", "head_bn": "bn-before", "bn": "no-adjacent-layer"}
    for i in range(len(model.blocks)):
        expected[f"blocks.{i}.bn2"] = "bn-after"
        # block 0's shortcut reuses the stem output, so stem → bn1 is blocked by that other use
        expected[f"blocks.{i}.bn1"] = "shared-output" if i == 0 else "no-adjacent-layer"
    return expected


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registry_model_folds_with_nothing_foldable_left(name: str) -> None:
    spec = MODELS[name]
    model = randomise(spec.make(**SMALL_CONFIGS.get(name, {})), Stats(seed=12))
    folded, report = fold_model(model)  # the probe comes from model.input_shape
    assert report.foldable_left == 0
    assert report.verification is not None
    assert report.verification.passed
    expected = expected_registry_outcome(name, model)
    if expected is None:
        expected = {bn: "bn-after" for bn, m in model.named_modules() if isinstance(m, _BatchNorm)}
    assert outcome(report) == expected
    assert len(expected) == spec.expected_bn(model.config)
    refolded, again = fold_model(folded)
    assert again.folded == ()
    assert again.foldable_left == 0
    assert all(torch.equal(v, folded.state_dict()[k]) for k, v in refolded.state_dict().items())


# --------------------------------------------------------------------------- torch.nn.utils.fusion


@pytest.mark.filterwarnings(EVEN_SAME)
@settings(max_examples=40)
@given(spec=conv_specs(transposed=False), stats=stats_strategy)
def test_conv_weights_equal_torch_fuse_conv_bn_eval(spec: ConvSpec, stats: Stats) -> None:
    bn = BN_CLASS[spec.dims](spec.out_ch, affine=True)
    model = randomise(nn.Sequential(spec.build(), bn), stats)
    x = probe((2, spec.in_ch, *[spec.size] * spec.dims), stats.seed)
    folded, _ = fold_model(model, x, verify=False)
    theirs = fuse_conv_bn_eval(model[0], model[1])
    assert_weights_match(folded.get_submodule("0"), theirs)


@settings(max_examples=20)
@given(n_in=st.integers(1, 5), n_out=st.integers(1, 5), stats=stats_strategy)
def test_linear_weights_equal_torch_fuse_linear_bn_eval(
    n_in: int, n_out: int, stats: Stats
) -> None:
    model = randomise(nn.Sequential(nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out)), stats)
    folded, _ = fold_model(model, probe((3, n_in), stats.seed), verify=False)
    assert_weights_match(folded.get_submodule("0"), fuse_linear_bn_eval(model[0], model[1]))


def assert_weights_match(ours: nn.Module, theirs: nn.Module) -> None:
    """Weights within 1e-6 relative; the bias against the size of its cancelling terms."""
    w_ours, w_theirs = ours.weight.detach().double(), theirs.weight.detach().double()
    assert max_abs(w_ours - w_theirs) <= 1e-6 * max_abs(w_theirs)
    b_ours, b_theirs = ours.bias.detach().double(), theirs.bias.detach().double()
    # b' = s*b + beta - s*mean: with means up to ~1e3 and scales up to ~3e3 (var 1e-7), float32
    # rounding of the cancelling terms, not the fold, sets the bias error.
    assert max_abs(b_ours - b_theirs) <= 1e-6 * (1 + max_abs(b_theirs) + 1e3 * 3e3)
