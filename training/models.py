"""The BatchNorm model zoo: small `nn.Module`s with dataclass configs, in one registry.

Every network names its layers `conv/bn/act` (timm's convention) so fold reports read like the
architecture, and takes `batch_norm: bool` so the same design can be trained without BN for the
"why BN" experiment. Tests parametrise over `MODELS`, so a model registered here is tested by
adding it, nothing more.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from training.bn.reference import use_batchnorm_impl
from training.errors import ConfigError, UnknownModelError


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry: how to build a model and what its BatchNorms should look like."""

    name: str
    config_cls: type
    build: Callable[[Any], nn.Module]
    description: str
    expected_bn: Callable[[Any], int]

    def make(self, **overrides: Any) -> nn.Module:
        config = make_config(self, overrides)
        return use_batchnorm_impl(self.build(config), config.bn_impl)


MODELS: dict[str, ModelSpec] = {}


def register(
    name: str, config_cls: type, description: str, expected_bn: Callable[[Any], int]
) -> Callable[[Callable[[Any], nn.Module]], Callable[[Any], nn.Module]]:
    def decorator(build: Callable[[Any], nn.Module]) -> Callable[[Any], nn.Module]:
        MODELS[name] = ModelSpec(name, config_cls, build, description, expected_bn)
        return build

    return decorator


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise UnknownModelError(f"unknown model {name!r}; choose one of: {known}") from None


def make_config(spec: ModelSpec, overrides: dict[str, Any]) -> Any:
    """Build a config, rejecting unknown fields by name instead of with a TypeError."""
    fields = {f.name: f for f in dataclasses.fields(spec.config_cls)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ConfigError(
            f"model {spec.name!r} has no option {', '.join(unknown)}; "
            f"its options are: {', '.join(fields)}"
        )
    # JSON round-trips turn tuples into lists; configs are frozen and hashable, so restore them.
    clean = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return spec.config_cls(**clean)


def build_model(name: str, config: dict[str, Any] | None = None) -> nn.Module:
    """Build a registry model from its name and a (possibly partial) config mapping."""
    return get_spec(name).make(**(config or {}))


def input_shape(model: nn.Module) -> tuple[int, ...]:
    """The per-example input shape (no batch axis) a registry model expects."""
    return tuple(model.input_shape)


def norm2d(channels: int, enabled: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if enabled else nn.Identity()


def norm1d(features: int, enabled: bool) -> nn.Module:
    return nn.BatchNorm1d(features) if enabled else nn.Identity()


# --------------------------------------------------------------------------- MLP


@dataclass(frozen=True)
class MLPConfig:
    in_features: int = 64
    hidden: tuple[int, ...] = (128, 64)
    num_classes: int = 10
    batch_norm: bool = True
    bn_impl: str = "torch"  # "reference": training.bn.reference's hand-written BN


class LinearBlock(nn.Module):
    """Linear → BatchNorm1d → ReLU; the Linear keeps its bias only when there is no BN."""

    def __init__(self, in_features: int, out_features: int, batch_norm: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, out_features, bias=not batch_norm)
        self.bn = norm1d(out_features, batch_norm)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.fc(x)))


class MLP(nn.Module):
    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        self.config = cfg
        self.input_shape = (cfg.in_features,)
        widths = (cfg.in_features, *cfg.hidden)
        self.flatten = nn.Flatten()
        self.blocks = nn.Sequential(
            *(LinearBlock(a, b, cfg.batch_norm) for a, b in itertools.pairwise(widths))
        )
        self.head = nn.Linear(widths[-1], cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.flatten(x)))


@register(
    "mlp",
    MLPConfig,
    "Multilayer perceptron: Linear→BatchNorm1d→ReLU blocks (digits or CSV tables).",
    lambda c: len(c.hidden) if c.batch_norm else 0,
)
def _mlp(cfg: MLPConfig) -> nn.Module:
    return MLP(cfg)


# --------------------------------------------------------------------------- digits CNN


@dataclass(frozen=True)
class CNNConfig:
    in_channels: int = 1
    image_size: int = 8
    widths: tuple[int, ...] = (32, 64)
    num_classes: int = 10
    batch_norm: bool = True
    bn_impl: str = "torch"  # "reference": training.bn.reference's hand-written BN


class ConvBlock(nn.Module):
    """Conv2d → BatchNorm2d → ReLU, the unit the folder turns back into one conv."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        batch_norm: bool,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        act: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_ch,
            out_ch,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=not batch_norm,
        )
        self.bn = norm2d(out_ch, batch_norm)
        self.act = act(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class DigitsCNN(nn.Module):
    """Two Conv-BN-ReLU blocks per stage, 2×2 max-pool between stages, global average head."""

    def __init__(self, cfg: CNNConfig) -> None:
        super().__init__()
        self.config = cfg
        self.input_shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
        layers: list[nn.Module] = []
        in_ch = cfg.in_channels
        for i, width in enumerate(cfg.widths):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            layers += [
                ConvBlock(in_ch, width, cfg.batch_norm),
                ConvBlock(width, width, cfg.batch_norm),
            ]
            in_ch = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(in_ch, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.pool(self.features(x))))


@register(
    "digits_cnn",
    CNNConfig,
    "Small CNN for 8×8 digits: Conv2d→BatchNorm2d→ReLU blocks, max-pool, linear head.",
    lambda c: 2 * len(c.widths) if c.batch_norm else 0,
)
def _digits_cnn(cfg: CNNConfig) -> nn.Module:
    return DigitsCNN(cfg)


# --------------------------------------------------------------------------- ResNet-18 style


@dataclass(frozen=True)
class ResNetConfig:
    in_channels: int = 3
    num_classes: int = 1000
    widths: tuple[int, ...] = (64, 128, 256, 512)
    blocks: tuple[int, ...] = (2, 2, 2, 2)
    # ImageNet stem: 7×7/2 conv + 3×3/2 max-pool. Small inputs (8×8 digits) want a 3×3/1 stem.
    imagenet_stem: bool = True
    image_size: int = 224
    batch_norm: bool = True
    bn_impl: str = "torch"  # "reference": training.bn.reference's hand-written BN


class BasicBlock(nn.Module):
    """ResNet's BasicBlock: two 3×3 Conv-BN pairs and a residual (1×1 Conv-BN if shapes change)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, batch_norm: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=not batch_norm)
        self.bn1 = norm2d(out_ch, batch_norm)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=not batch_norm)
        self.bn2 = norm2d(out_ch, batch_norm)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=not batch_norm), norm2d(out_ch, batch_norm)
            )
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.downsample(x))


class ResNet(nn.Module):
    def __init__(self, cfg: ResNetConfig) -> None:
        super().__init__()
        self.config = cfg
        self.input_shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
        bn = cfg.batch_norm
        if cfg.imagenet_stem:
            self.conv1 = nn.Conv2d(cfg.in_channels, cfg.widths[0], 7, 2, 3, bias=not bn)
            self.maxpool: nn.Module = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(cfg.in_channels, cfg.widths[0], 3, 1, 1, bias=not bn)
            self.maxpool = nn.Identity()
        self.bn1 = norm2d(cfg.widths[0], bn)
        self.act1 = nn.ReLU(inplace=True)
        stages: list[nn.Module] = []
        in_ch = cfg.widths[0]
        for i, (width, count) in enumerate(zip(cfg.widths, cfg.blocks, strict=True)):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(in_ch, width, stride, bn)]
            blocks += [BasicBlock(width, width, 1, bn) for _ in range(count - 1)]
            stages.append(nn.Sequential(*blocks))
            in_ch = width
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_ch, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        return self.fc(self.flatten(self.pool(self.layers(x))))


def _resnet_bn_count(c: ResNetConfig) -> int:
    if not c.batch_norm:
        return 0
    count, in_ch = 1, c.widths[0]
    for i, (width, blocks) in enumerate(zip(c.widths, c.blocks, strict=True)):
        downsample = i > 0 or in_ch != width
        count += 2 * blocks + (1 if downsample else 0)
        in_ch = width
    return count


@register(
    "resnet18",
    ResNetConfig,
    "ResNet-18-style network of BasicBlocks with residuals; any input size, 1000 classes.",
    _resnet_bn_count,
)
def _resnet18(cfg: ResNetConfig) -> nn.Module:
    return ResNet(cfg)


# --------------------------------------------------------------------------- MobileNet style


@dataclass(frozen=True)
class MobileNetConfig:
    in_channels: int = 3
    num_classes: int = 1000
    image_size: int = 224
    stem_width: int = 32
    # (output channels, stride) per depthwise-separable block, as in MobileNet v1.
    blocks: tuple[tuple[int, int], ...] = (
        (64, 1),
        (128, 2),
        (128, 1),
        (256, 2),
        (256, 1),
        (512, 2),
        (512, 1),
        (1024, 2),
    )
    batch_norm: bool = True
    bn_impl: str = "torch"  # "reference": training.bn.reference's hand-written BN


class DepthwiseSeparable(nn.Module):
    """3×3 depthwise Conv-BN-ReLU6, then 1×1 pointwise Conv-BN-ReLU6."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, batch_norm: bool) -> None:
        super().__init__()
        self.dw = ConvBlock(in_ch, in_ch, batch_norm, 3, stride, groups=in_ch, act=nn.ReLU6)
        self.pw = ConvBlock(in_ch, out_ch, batch_norm, 1, act=nn.ReLU6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


class MobileNet(nn.Module):
    def __init__(self, cfg: MobileNetConfig) -> None:
        super().__init__()
        self.config = cfg
        self.input_shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
        stride = 2 if cfg.image_size >= 32 else 1
        self.stem = ConvBlock(
            cfg.in_channels, cfg.stem_width, cfg.batch_norm, 3, stride, act=nn.ReLU6
        )
        blocks, in_ch = [], cfg.stem_width
        for out_ch, s in cfg.blocks:
            blocks.append(DepthwiseSeparable(in_ch, out_ch, s, cfg.batch_norm))
            in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_ch, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.blocks(self.stem(x)))))


@register(
    "mobilenet",
    MobileNetConfig,
    "MobileNet-style network of depthwise-separable convs (depthwise 3×3 + pointwise 1×1).",
    lambda c: (1 + 2 * len(c.blocks)) if c.batch_norm else 0,
)
def _mobilenet(cfg: MobileNetConfig) -> nn.Module:
    return MobileNet(cfg)


# --------------------------------------------------------------------------- pre-activation


@dataclass(frozen=True)
class PreActConfig:
    in_channels: int = 1
    image_size: int = 8
    widths: tuple[int, ...] = (32, 64)
    num_classes: int = 10
    batch_norm: bool = True
    bn_impl: str = "torch"  # "reference": training.bn.reference's hand-written BN


class PreActBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016): BN→ReLU→Conv, twice, plus a shortcut.

    conv1 is followed directly by bn2 (a conv→BN pair); bn1 sits before conv1 with a ReLU
    between, which no exact fold can cross.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, batch_norm: bool) -> None:
        super().__init__()
        self.bn1 = norm2d(in_ch, batch_norm)
        self.act1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=not batch_norm)
        self.bn2 = norm2d(out_ch, batch_norm)
        self.act2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(x))
        shortcut = self.shortcut(out) if not isinstance(self.shortcut, nn.Identity) else x
        out = self.conv1(out)
        out = self.conv2(self.act2(self.bn2(out)))
        return out + shortcut


class PreActNet(nn.Module):
    """BN placed *before* the weights it can fold into.

    - `input_bn` normalises the raw input and feeds the stem conv directly; the stem pads by
      replication, which commutes with a per-channel affine map, so BN→Conv folds exactly.
    - `head_bn` (BatchNorm1d) sits directly before the Linear head: BN→Linear always folds.
    """

    def __init__(self, cfg: PreActConfig) -> None:
        super().__init__()
        self.config = cfg
        self.input_shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
        bn = cfg.batch_norm
        self.input_bn = norm2d(cfg.in_channels, bn)
        self.stem = nn.Conv2d(cfg.in_channels, cfg.widths[0], 3, 1, 1, padding_mode="replicate")
        blocks, in_ch = [], cfg.widths[0]
        for i, width in enumerate(cfg.widths):
            blocks.append(PreActBlock(in_ch, width, 1 if i == 0 else 2, bn))
            in_ch = width
        self.blocks = nn.Sequential(*blocks)
        self.bn = norm2d(in_ch, bn)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head_bn = norm1d(in_ch, bn)
        self.fc = nn.Linear(in_ch, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(self.input_bn(x)))
        x = self.flatten(self.pool(self.act(self.bn(x))))
        return self.fc(self.head_bn(x))


@register(
    "preact",
    PreActConfig,
    "Pre-activation network: BN→ReLU→Conv blocks, a BN on the input before the stem conv, "
    "and a BatchNorm1d directly before the Linear head.",
    lambda c: (3 + 2 * len(c.widths)) if c.batch_norm else 0,
)
def _preact(cfg: PreActConfig) -> nn.Module:
    return PreActNet(cfg)
