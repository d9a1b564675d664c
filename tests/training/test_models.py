"""Every registry model builds, runs in both modes, and carries BN where its design says."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from training import models
from training.bn.layers import randomize_bn_statistics
from training.errors import ConfigError, UnknownModelError

# Small configurations keep ResNet-18 and MobileNet fast; the defaults are checked separately.
SMALL = {
    "mlp": {},
    "digits_cnn": {},
    "resnet18": {"image_size": 32, "widths": (8, 16, 16, 32), "imagenet_stem": False},
    "mobilenet": {"image_size": 32, "stem_width": 8, "blocks": ((16, 1), (24, 2), (32, 2))},
    "preact": {},
}


def bn_layers(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def test_registry_has_the_designed_networks():
    assert set(models.MODELS) >= set(SMALL)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_builds_and_runs_in_train_and_eval(name):
    model = models.build_model(name, SMALL[name])
    x = torch.randn(4, *model.input_shape)
    model.train()
    y_train = model(x)
    model.eval()
    y_eval = model(x)
    assert y_train.shape == y_eval.shape == (4, model.config.num_classes)
    assert torch.isfinite(y_eval).all()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_bn_count_matches_design(name):
    spec = models.get_spec(name)
    model = spec.make(**SMALL[name])
    assert len(bn_layers(model)) == spec.expected_bn(model.config) > 0
    without = spec.make(**SMALL[name], batch_norm=False)
    assert bn_layers(without) == []


@pytest.mark.parametrize("name", sorted(SMALL))
def test_eval_output_of_a_row_does_not_depend_on_its_batch(name):
    torch.manual_seed(0)
    model = randomize_bn_statistics(models.build_model(name, SMALL[name])).eval()
    x = torch.randn(6, *model.input_shape) * 3 + 1
    with torch.no_grad():
        batched = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
    tol = 1e-5 * (1 + batched.abs())
    assert ((batched - alone).abs() <= tol).all()


def test_train_mode_output_does_depend_on_its_batch():
    """The contrast that makes the eval test meaningful: batch statistics couple the rows."""
    model = models.build_model("digits_cnn").train()
    x = torch.randn(6, *model.input_shape)
    with torch.no_grad():
        assert not torch.allclose(model(x)[:3], model(x[:3]), atol=1e-4)


def test_default_resnet18_is_imagenet_shaped():
    model = models.build_model("resnet18")
    assert model.fc.out_features == 1000
    assert isinstance(model.conv1, nn.Conv2d)
    assert model.conv1.kernel_size == (7, 7)
    blocks = [m for m in model.modules() if isinstance(m, models.BasicBlock)]
    assert len(blocks) == 8
    assert 11_000_000 < sum(p.numel() for p in model.parameters()) < 12_000_000


@pytest.mark.parametrize("size", [17, 64])
def test_resnet18_takes_any_input_size(size):
    model = models.build_model("resnet18", {"image_size": size, "widths": (8, 8, 8, 8)}).eval()
    assert model(torch.randn(2, 3, size, size)).shape == (2, 1000)


def test_mobilenet_uses_depthwise_convs():
    model = models.build_model("mobilenet", SMALL["mobilenet"])
    depthwise = [
        m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1
    ]
    assert len(depthwise) == len(SMALL["mobilenet"]["blocks"])


def test_preact_places_bn_before_conv_and_linear():
    model = models.build_model("preact")
    assert isinstance(model.input_bn, nn.BatchNorm2d)
    assert model.stem.padding_mode == "replicate"  # so input_bn → stem folds exactly
    assert isinstance(model.head_bn, nn.BatchNorm1d)
    assert model.head_bn.num_features == model.fc.in_features
    block = model.blocks[0]
    assert isinstance(block.bn1, nn.BatchNorm2d)
    assert block.bn1.num_features == block.conv1.in_channels


def test_layer_names_follow_conv_bn_act():
    names = {n.rsplit(".", 1)[-1] for n, _ in models.build_model("digits_cnn").named_modules()}
    assert {"conv", "bn", "act"} <= names


def test_unknown_model_and_option_are_named():
    with pytest.raises(UnknownModelError, match="choose one of"):
        models.build_model("vgg")
    with pytest.raises(ConfigError, match="no option depth"):
        models.build_model("mlp", {"depth": 3})


def test_config_accepts_json_lists():
    model = models.build_model("digits_cnn", {"widths": [8, 16]})
    assert model.config.widths == (8, 16)
