"""The reference BatchNorm: gradcheck, equality with PyTorch's at 1e-10 in float64, and a module
that trains, folds and exports like nn.BatchNorm2d."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from training import models
from training.bn.layers import randomize_bn_statistics
from training.bn.reference import (
    BatchNormInference,
    BatchNormTrain,
    ReferenceBatchNorm1d,
    ReferenceBatchNorm2d,
    batch_norm,
    use_batchnorm_impl,
)
from training.errors import ConfigError
from training.export import batchnorm_nodes, export_onnx
from training.fold import fold_model

TOL = {"atol": 1e-10, "rtol": 0}
SHAPES = {"2d": (6, 3), "4d": (4, 3, 3, 2)}
PAIRS = {  # input shape → (PyTorch's module, ours)
    (6, 3): (nn.BatchNorm1d, ReferenceBatchNorm1d),
    (5, 3, 4): (nn.BatchNorm1d, ReferenceBatchNorm1d),
    (4, 3, 3, 2): (nn.BatchNorm2d, ReferenceBatchNorm2d),
}


def inputs(shape: tuple[int, ...], affine: bool, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Float64 input with a non-zero mean and uneven scale, and γ, β (None without affine)."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2.5 + 1.5
    if not affine:
        return x.requires_grad_(), None, None
    w = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(c, generator=g, dtype=torch.float64)
    return x.requires_grad_(), w.requires_grad_(), b.requires_grad_()


# --------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("rank", SHAPES)
def test_training_backward_passes_gradcheck(rank, affine):
    x, w, b = inputs(SHAPES[rank], affine)
    args = tuple(t for t in (x, w, b) if t is not None)

    def f(*a: torch.Tensor) -> torch.Tensor:
        weight, bias = (a[1], a[2]) if affine else (None, None)
        return BatchNormTrain.apply(a[0], weight, bias, 1e-5)[0]

    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("rank", SHAPES)
def test_inference_backward_passes_gradcheck(rank, affine):
    x, w, b = inputs(SHAPES[rank], affine)
    mean, var = torch.randn(x.shape[1], dtype=torch.float64), torch.rand(x.shape[1]).double() + 0.1
    args = tuple(t for t in (x, w, b) if t is not None)

    def f(*a: torch.Tensor) -> torch.Tensor:
        weight, bias = (a[1], a[2]) if affine else (None, None)
        return BatchNormInference.apply(a[0], mean, var, weight, bias, 1e-5)

    assert torch.autograd.gradcheck(f, args)


# --------------------------------------------------------------------------- equal to PyTorch


def pair(shape: tuple[int, ...], affine: bool, momentum: float | None, track: bool = True):
    torch_cls, ours_cls = PAIRS[shape]
    theirs = torch_cls(shape[1], momentum=momentum, affine=affine, track_running_stats=track)
    ours = ours_cls(shape[1], momentum=momentum, affine=affine, track_running_stats=track)
    theirs, ours = theirs.double(), ours.double()
    if affine:
        _, w, b = inputs(shape, affine=True, seed=99)
        theirs.weight.data.copy_(w.detach())
        theirs.bias.data.copy_(b.detach())
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def step_both(theirs: nn.Module, ours: nn.Module, shape: tuple[int, ...], seed: int) -> None:
    """One forward and backward of each on the same data, asserting everything agrees."""
    x, _, _ = inputs(shape, affine=False, seed=seed)
    x_ours = x.detach().clone().requires_grad_()
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=x.dtype)
    theirs.zero_grad()
    ours.zero_grad()
    y_theirs, y_ours = theirs(x), ours(x_ours)
    y_theirs.backward(dy)
    y_ours.backward(dy)
    torch.testing.assert_close(y_ours, y_theirs, **TOL)
    torch.testing.assert_close(x_ours.grad, x.grad, **TOL)
    for p_ours, p_theirs in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p_ours.grad, p_theirs.grad, **TOL)
    for b_ours, b_theirs in zip(ours.buffers(), theirs.buffers(), strict=True):
        torch.testing.assert_close(b_ours, b_theirs, **TOL)


@pytest.mark.parametrize("momentum", [0.1, 0.3, None], ids=["ema", "ema0.3", "cumulative"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("shape", PAIRS, ids=["NC", "NCL", "NCHW"])
def test_equals_pytorch_in_training_then_in_eval(shape, affine, momentum):
    theirs, ours = pair(shape, affine, momentum)
    for seed in range(3):  # three training steps: outputs, gradients and running statistics
        step_both(theirs, ours, shape, seed)
    theirs.eval()
    ours.eval()
    step_both(theirs, ours, shape, seed=10)  # inference with the running statistics


@pytest.mark.parametrize("shape", PAIRS, ids=["NC", "NCL", "NCHW"])
def test_without_running_statistics_both_modes_use_the_batch(shape):
    theirs, ours = pair(shape, affine=True, momentum=0.1, track=False)
    step_both(theirs, ours, shape, seed=0)
    theirs.eval()
    ours.eval()
    step_both(theirs, ours, shape, seed=1)


@settings(max_examples=30)
@given(
    n=st.integers(2, 6),
    c=st.integers(1, 4),
    hw=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    offset=st.floats(-100, 100),
    scale=st.floats(1e-3, 1e3),
)
def test_any_shape_and_scale_equals_pytorch(n, c, hw, offset, scale):
    g = torch.Generator().manual_seed(n * 100 + c)
    x = torch.randn((n, c, *hw), generator=g, dtype=torch.float64) * scale + offset
    w, b = torch.rand(c, dtype=torch.float64) + 0.5, torch.randn(c, dtype=torch.float64)
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    rm2, rv2 = rm.clone(), rv.clone()
    want = torch.nn.functional.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
    got = batch_norm(x, rm2, rv2, w, b, True, 0.1, 1e-5)
    torch.testing.assert_close(got, want, atol=1e-10 * (1 + scale), rtol=0)
    torch.testing.assert_close(rm2, rm, atol=1e-10 * (1 + abs(offset)), rtol=1e-12)
    torch.testing.assert_close(rv2, rv, atol=0, rtol=1e-10)


def test_one_value_per_channel_is_refused_as_pytorch_does():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ReferenceBatchNorm2d(3)(torch.randn(1, 3, 1, 1))
    ReferenceBatchNorm2d(3).eval()(torch.randn(1, 3, 1, 1))  # inference needs no batch


def test_wrong_rank_is_refused():
    with pytest.raises(ValueError, match="expected 4D input"):
        ReferenceBatchNorm2d(3)(torch.randn(4, 3))


# --------------------------------------------------------------------------- in a model


def reference_cnn(seed: int = 0, **options) -> nn.Module:
    torch.manual_seed(seed)
    return use_batchnorm_impl(models.build_model("digits_cnn", options), "reference")


def test_converting_a_model_keeps_its_weights_and_state_dict_keys():
    torch.manual_seed(0)
    plain = models.build_model("digits_cnn")
    ours = reference_cnn(seed=0)
    kinds = {type(m) for m in ours.modules()}
    assert ReferenceBatchNorm2d in kinds and nn.BatchNorm2d not in kinds
    assert plain.state_dict().keys() == ours.state_dict().keys()
    for a, b in zip(plain.state_dict().values(), ours.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # same seed, same initial weights
    with pytest.raises(ConfigError, match="unknown BatchNorm implementation 'cudnn'"):
        use_batchnorm_impl(plain, "cudnn")


def test_a_model_trains_identically_with_either_batchnorm():
    """Five SGD steps in float64: same weights, same running statistics, to 1e-10."""
    torch.manual_seed(0)
    theirs = models.build_model("digits_cnn", {"widths": (8, 16)}).double()
    ours = use_batchnorm_impl(models.build_model("digits_cnn", {"widths": (8, 16)}), "reference")
    ours.double().load_state_dict(theirs.state_dict())
    g = torch.Generator().manual_seed(1)
    for model in (theirs, ours):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        g.manual_seed(1)
        for _ in range(5):
            x = torch.randn(16, 1, 8, 8, generator=g, dtype=torch.float64)
            y = torch.randint(0, 10, (16,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for (name, a), b in zip(theirs.state_dict().items(), ours.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, **TOL, msg=name)


def test_a_reference_model_folds_and_exports_like_any_other():
    model = randomize_bn_statistics(reference_cnn(widths=(8, 16))).eval()
    folded, report = fold_model(model)
    assert len(report.folded) == 4 and not report.skipped
    x = torch.randn(5, 1, 8, 8)

    unfolded = export_onnx(model, x, keep_batchnorm=True)
    plain = models.build_model("digits_cnn", {"widths": (8, 16)})
    plain.load_state_dict(model.state_dict())
    same_graph = export_onnx(plain.eval(), x, keep_batchnorm=True)
    assert len(batchnorm_nodes(unfolded)) == 4  # a standard BatchNormalization per layer
    assert [n.op_type for n in unfolded.graph.node] == [n.op_type for n in same_graph.graph.node]

    proto = export_onnx(folded, x)
    assert batchnorm_nodes(proto) == []
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4 * (1 + np.abs(want).max()), rtol=0)
