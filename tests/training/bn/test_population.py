"""Population statistics: after real training epochs, each policy's running statistics equal an
average computed here, independently (numpy), from the batch statistics each BN recorded."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from training import models
from training.bn.population import EMA, Cumulative, Window, parse_bn_stats
from training.bn.recalibrate import recalibrate_bn
from training.bn.reference import use_batchnorm_impl
from training.errors import ConfigError
from training.train import TrainConfig, evaluate, make_optimizer, train_epoch

Stats = list[tuple[np.ndarray, np.ndarray]]  # per training forward: (mean, unbiased variance)


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("spec", "policy"),
    [
        ("ema", EMA(0.1)),
        ("ema:0.1", EMA(0.1)),
        ("ema:0.01", EMA(0.01)),
        ("ema:1", EMA(1.0)),
        ("window:20", Window(20)),
        ("cumulative", Cumulative()),
    ],
)
def test_specs_parse_and_print_back(spec, policy):
    assert parse_bn_stats(spec) == policy
    assert parse_bn_stats(str(policy)) == policy


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("ema:0", r"momentum must be in \(0, 1\]"),
        ("ema:1.5", r"momentum must be in \(0, 1\]"),
        ("ema:nan", r"momentum must be in \(0, 1\]"),
        ("ema:fast", r"momentum must be in \(0, 1\]"),
        ("window:0", "whole number ≥ 1"),
        ("window:2.5", "whole number ≥ 1"),
        ("window", "choose ema, ema:<momentum"),
        ("cumulative:3", "choose ema"),
        ("average", "unknown BN statistics 'average'"),
    ],
)
def test_bad_specs_say_what_to_write(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_bn_stats(spec)


# --------------------------------------------------------------------------- the averages


def record_batch_stats(model: nn.Module) -> tuple[dict[str, Stats], list]:
    """Each BN's input statistics at every training-mode forward, computed with numpy."""
    history: dict[str, Stats] = {}

    def hook(name: str):
        def record(bn: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            if bn.training:
                x = inputs[0].detach().numpy()
                axes = (0, *range(2, x.ndim))
                history[name].append((x.mean(axes), x.var(axes, ddof=1)))

        return record

    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm):
            history[name] = []
            hooks.append(m.register_forward_pre_hook(hook(name)))
    return history, hooks


def independent_average(policy: object, stats: Stats) -> tuple[np.ndarray, np.ndarray]:
    """The policy's definition, written out: no torch, no shared code with the library."""
    means, variances = np.stack([m for m, _ in stats]), np.stack([v for _, v in stats])
    if isinstance(policy, EMA):
        mean, var = np.zeros_like(means[0]), np.ones_like(variances[0])  # PyTorch's reset
        for m, v in zip(means, variances, strict=True):
            mean = (1 - policy.momentum) * mean + policy.momentum * m
            var = (1 - policy.momentum) * var + policy.momentum * v
        return mean, var
    if isinstance(policy, Window):
        return means[-policy.size :].mean(0), variances[-policy.size :].mean(0)
    return means.mean(0), variances.mean(0)


def small_model(impl: str) -> nn.Module:
    torch.manual_seed(0)
    model = models.build_model("digits_cnn", {"widths": (4, 8)})
    return use_batchnorm_impl(model, impl).double()


def fake_digits(n: int = 150) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64) * 2 + 1
    return x, torch.randint(0, 10, (n,), generator=g)


def train_epochs(model: nn.Module, epochs: int) -> None:
    """The project's own training epoch (shuffle, augmentation, AdamW) and eval in between."""
    x, y = fake_digits()
    cfg = TrainConfig(epochs=epochs, batch_size=32)
    optimizer, scheduler = make_optimizer(model, cfg, steps_per_epoch=5)
    for epoch in range(1, epochs + 1):
        train_epoch(model, optimizer, scheduler, x, y, cfg, epoch, progress=False)
        evaluate(model, x, y)  # inference forwards must leave the statistics alone


@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("spec", ["ema", "ema:0.3", "window:4", "window:100", "cumulative"])
def test_running_stats_after_training_equal_the_policys_average(spec, impl):
    model = small_model(impl)
    policy = parse_bn_stats(spec)
    history, recorders = record_batch_stats(model)
    with policy.attach(model):
        train_epochs(model, epochs=2)
    for hook in recorders:
        hook.remove()
    for name, bn in model.named_modules():
        if isinstance(bn, _BatchNorm):
            assert len(history[name]) == 10  # 2 epochs of 150 examples in batches of 32
            mean, var = independent_average(policy, history[name])
            np.testing.assert_allclose(bn.running_mean.numpy(), mean, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(bn.running_var.numpy(), var, rtol=1e-10, atol=1e-12)


def test_detaching_restores_momentum_and_stops_the_window():
    bn = nn.BatchNorm1d(3).double()
    first, second = (torch.randn(8, 3, dtype=torch.float64) + i for i in range(2))
    with Cumulative().attach(bn):
        assert bn.momentum is None
    assert bn.momentum == 0.1
    with Window(1).attach(bn):
        bn(first)
        torch.testing.assert_close(bn.running_var, first.var(0))  # the last batch, alone
    bn(second)  # detached: PyTorch's EMA again
    torch.testing.assert_close(bn.running_var, 0.9 * first.var(0) + 0.1 * second.var(0))


def test_a_resumed_window_equals_an_uninterrupted_one():
    """The window's last N batches are state: a resumed run must get them from its checkpoint."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(6, 3, generator=g, dtype=torch.float64) * (i + 1) for i in range(9)]
    straight = nn.BatchNorm1d(3).double()
    with Window(5).attach(straight):
        for batch in batches:
            straight(batch)

    first = nn.BatchNorm1d(3).double()
    with Window(5).attach(first) as handle:
        for batch in batches[:6]:
            first(batch)
        buffer = io.BytesIO()
        torch.save({"model": first.state_dict(), "bn_stats": handle.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # plain tensors and lists only
    resumed = nn.BatchNorm1d(3).double()
    resumed.load_state_dict(state["model"])
    with Window(5).attach(resumed) as handle:
        handle.load_state_dict(state["bn_stats"])
        for batch in batches[6:]:
            resumed(batch)
    torch.testing.assert_close(resumed.running_mean, straight.running_mean)
    torch.testing.assert_close(resumed.running_var, straight.running_var)


def test_recalibration_takes_any_policy():
    model = nn.Sequential(nn.BatchNorm1d(3)).double()
    batches = [torch.randn(8, 3, dtype=torch.float64) * (i + 1) + i for i in range(5)]
    assert recalibrate_bn(model, batches, Window(2)) == 5
    expected_mean = torch.stack([b.mean(0) for b in batches[-2:]]).mean(0)
    expected_var = torch.stack([b.var(0) for b in batches[-2:]]).mean(0)
    torch.testing.assert_close(model[0].running_mean, expected_mean)
    torch.testing.assert_close(model[0].running_var, expected_var)
    model(batches[0])  # the window's hook is gone: PyTorch's EMA updates again
    assert not torch.allclose(model[0].running_mean, expected_mean)
