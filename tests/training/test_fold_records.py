"""Both folders report in one vocabulary: one network folded in PyTorch and as an ONNX file."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.bn.layers import randomize_bn_statistics
from training.export import export_onnx
from training.fold import fold_model
from training.fold_records import FoldedBN, SkippedBN
from training.onnx_fold import fold_onnx


def test_pytorch_and_onnx_folds_report_the_same_records_in_the_same_words():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.BatchNorm2d(3))
    model = randomize_bn_statistics(model, seed=3).eval()
    x = torch.randn(2, 2, 5, 5)
    _, in_torch = fold_model(model, x)
    _, in_onnx = fold_onnx(export_onnx(model, x, keep_batchnorm=True))
    for report in (in_torch, in_onnx):
        assert [type(item) for item in report.folded] == [FoldedBN]
        assert [type(item) for item in report.skipped] == [SkippedBN]
    (torch_fold,), (onnx_fold,) = in_torch.folded, in_onnx.folded
    assert torch_fold.layer_types == ("Conv2d",) and onnx_fold.layer_types == ("Conv",)
    assert (torch_fold.direction, torch_fold.exactness) == ("bn-after", "exact")
    assert (onnx_fold.direction, onnx_fold.exactness) == ("bn-after", "exact")
    assert onnx_fold.max_rel_weight_change == pytest.approx(torch_fold.max_rel_weight_change)
    assert in_torch.skipped[0].kind == in_onnx.skipped[0].kind == "no-adjacent-layer"
