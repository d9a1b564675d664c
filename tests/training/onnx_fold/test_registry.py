"""fold_onnx on the registry models' *unfolded* ONNX exports, with random per-channel BN stats.

torch 2.13's exporter folds Conv/Gemm→BN itself unless `optimize=False`, so each export is
checked to still hold every BatchNormalization the model has; otherwise these tests would
compare folded with folded. Statistics and affine are randomised per channel (a fresh net's
identity statistics would hide a wrong channel order or a missing shift).

The BNs that must remain are derived by hand from each architecture, not from the folder:
* mlp, digits_cnn, resnet18, mobilenet: every BN directly follows a Conv or Linear whose output
  nothing else reads, so none remains;
* preact: input_bn → edge Pad (replicate padding) → stem Conv folds through the Pad, bn2
  follows conv1, head_bn feeds the Linear head; what remains is one bn1 per block (block 0's
  follows the stem conv whose output the identity shortcut also reads, later ones follow the
  previous block's residual Add; each feeds a ReLU) and the final bn (after an Add, before a
  ReLU): len(widths) + 1.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from training.models import MODELS
from training.onnx_fold import fold_onnx, verify_onnx_fold

SMALL_CONFIGS: dict[str, dict] = {
    "mlp": {"in_features": 16, "hidden": (12, 8)},
    "digits_cnn": {"widths": (4, 8)},
    "resnet18": {"image_size": 32, "widths": (4, 8), "blocks": (1, 1), "num_classes": 5},
    "mobilenet": {
        "image_size": 32,
        "stem_width": 4,
        "blocks": ((8, 1), (8, 2), (16, 1)),
        "num_classes": 5,
    },
    "preact": {"widths": (4, 8)},
}
# The op feeding each BN that must remain (see the module docstring).
BNS_LEFT: dict[str, dict[str, int]] = {
    "mlp": {},
    "digits_cnn": {},
    "resnet18": {},
    "mobilenet": {},
    "preact": {"Conv": 1, "Add": len(SMALL_CONFIGS["preact"]["widths"])},
}


def test_every_registry_model_has_a_pinned_case():
    assert set(MODELS) == set(SMALL_CONFIGS) == set(BNS_LEFT), (
        "pin a small config and the hand-derived number of BNs left for each new model"
    )


def randomise_batch_norms(model: nn.Module, seed: int) -> None:
    """Per-channel statistics and affine, bounded so no BN is a mean subtraction."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features

            def uniform(low: float, high: float, n: int = n) -> torch.Tensor:
                return torch.rand(n, generator=generator) * (high - low) + low

            sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
            module.running_mean.copy_(uniform(-1.0, 1.0))
            module.running_var.copy_(uniform(0.5, 2.0))
            module.weight.data.copy_(uniform(0.5, 1.5) * sign)
            module.bias.data.copy_(uniform(-1.0, 1.0))


def export_unfolded(model: nn.Module, path: Path) -> onnx.ModelProto:
    example = torch.randn(2, *model.input_shape)
    with warnings.catch_warnings():
        # torch 2.13's own export code trips its pytree deprecation; not ours to fix.
        warnings.filterwarnings("ignore", r".*LeafSpec.*deprecated", FutureWarning)
        torch.onnx.export(
            model.eval(),
            (example,),
            path,
            dynamo=True,
            optimize=False,  # with optimize=True the exporter folds the BNs itself
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            input_names=["input"],
            output_names=["logits"],
        )
    return onnx.load(path)


@pytest.fixture(scope="module", params=sorted(SMALL_CONFIGS))
def exported(request, tmp_path_factory) -> tuple[str, nn.Module, onnx.ModelProto]:
    name = request.param
    spec = MODELS[name]
    model = spec.make(**SMALL_CONFIGS[name])
    randomise_batch_norms(model, seed=len(name))
    proto = export_unfolded(model, tmp_path_factory.mktemp(name) / "model.onnx")
    config = spec.config_cls(**SMALL_CONFIGS[name])
    bns = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
    assert bns == spec.expected_bn(config) > 0, "the exporter folded BNs: compare would be moot"
    return name, model, proto


def test_registry_export_folds_to_the_pinned_count_and_matches(exported):
    name, _, proto = exported
    folded, report = fold_onnx(proto)
    producer = {out: node.op_type for node in folded.graph.node for out in node.output}
    left = [n for n in folded.graph.node if n.op_type == "BatchNormalization"]
    assert Counter(producer[bn.input[0]] for bn in left) == Counter(BNS_LEFT[name]), str(report)
    assert report.bn_after == len(left)
    assert all("its output feeds Relu" in s.reason for s in report.skipped), str(report)
    for batch in (2, 7):
        result = verify_onnx_fold(proto, folded, intermediates=True, dynamic_dim=batch)
        assert result.passed, result.summary()


def test_folded_registry_export_matches_torch(exported):
    """The folded file against the unfolded PyTorch model itself, not only its export."""
    _, model, proto = exported
    folded, _ = fold_onnx(proto)
    x = np.random.default_rng(0).standard_normal((5, *model.input_shape)).astype(np.float32)
    session = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": x})
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_preact_input_bn_folds_through_the_replicate_pad_and_head_bn_into_the_head(tmp_path):
    model = MODELS["preact"].make(**SMALL_CONFIGS["preact"])
    randomise_batch_norms(model, seed=7)
    _, report = fold_onnx(export_unfolded(model, tmp_path / "model.onnx"))
    before = sorted((f.layer_types, f.via) for f in report.folded if f.direction == "bn-before")
    assert before == [(("Conv",), "Pad(mode=edge)"), (("Gemm",), "")]
