"""On a CUDA GPU: folded and unfolded nets agree in PyTorch and in ONNX Runtime's CUDA provider,
and an fp16 export runs there within its tolerance.

Skipped without a GPU (CI has none). On a GPU machine: `pytest -m gpu -rs` (every test must run,
none skip). TF32 is turned off on both sides, so that the comparisons are float32 against
float32; with TF32 on (the default of both) convolutions round to ~1e-3 relative.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from training.bn.layers import randomize_bn_statistics
from training.export import batchnorm_nodes, export_onnx, fold_for_dtype
from training.fold import fold_model
from training.models import build_model

CUDA_TORCH = torch.cuda.is_available()
CUDA_ORT = "CUDAExecutionProvider" in ort.get_available_providers()
needs_torch_cuda = pytest.mark.skipif(not CUDA_TORCH, reason="needs PyTorch with a CUDA GPU")
needs_ort_cuda = pytest.mark.skipif(
    not (CUDA_TORCH and CUDA_ORT), reason="needs a CUDA GPU and onnxruntime-gpu's CUDA provider"
)
pytestmark = pytest.mark.gpu

# (registry name, config): small images keep each case to a second.
NETS = [
    ("digits_cnn", {}),
    ("resnet18", {"image_size": 64, "num_classes": 10}),
    ("mobilenet", {"image_size": 64, "num_classes": 10}),
]
CUDA_NO_TF32 = ("CUDAExecutionProvider", {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"})


@pytest.fixture(autouse=True)
def _float32_matmuls() -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def net(name: str, config: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_bn_statistics(build_model(name, config)).eval()


def batch(model: torch.nn.Module, rows: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((rows, *model.input_shape), generator=generator)


def assert_close(got: np.ndarray, want: np.ndarray, tolerance: float) -> None:
    """Within `tolerance` × (1 + max |want|), the export's own criterion."""
    bound = tolerance * (1 + float(np.abs(want).max()))
    assert float(np.abs(got - want).max()) <= bound


def cuda_session(proto: onnx.ModelProto, optimize: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if not optimize:  # ORT would otherwise fuse Conv+BN itself and hide the unfolded graph
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=[CUDA_NO_TF32, "CPUExecutionProvider"]
    )
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    return session


def run_bound(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    """As the service runs it: IOBinding, inputs from the host, outputs back to it."""
    binding = session.io_binding()
    binding.bind_cpu_input("input", np.ascontiguousarray(x))
    binding.bind_output("logits")
    session.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()[0]


@needs_torch_cuda
@pytest.mark.parametrize(("name", "config"), NETS)
def test_folded_and_unfolded_agree_on_cuda_in_pytorch(name: str, config: dict) -> None:
    model = net(name, config).cuda()
    x = batch(model, 16).cuda()
    folded, report = fold_model(model, x[:4])
    assert report.folded and next(folded.parameters()).is_cuda
    with torch.inference_mode():
        want, got = model(x).cpu().numpy(), folded(x).cpu().numpy()
    assert_close(got, want, 1e-4)


@needs_ort_cuda
@pytest.mark.parametrize(("name", "config"), NETS)
def test_folded_and_unfolded_agree_on_cuda_in_onnxruntime(name: str, config: dict) -> None:
    model = net(name, config)
    x = batch(model, 16)
    unfolded = export_onnx(model, x[:2], keep_batchnorm=True)
    assert batchnorm_nodes(unfolded), "the reference file must still hold its BN nodes"
    folded_model, _ = fold_model(model, x[:4])
    folded = export_onnx(folded_model, x[:2])
    assert not batchnorm_nodes(folded)
    with torch.inference_mode():
        want = model(x).numpy()
    for rows in (1, 7, 16):  # the dynamic batch axis, on the GPU
        part = x[:rows].numpy()
        got_unfolded = run_bound(cuda_session(unfolded, optimize=False), part)
        got_folded = run_bound(cuda_session(folded, optimize=False), part)
        assert_close(got_unfolded, want[:rows], 1e-4)
        assert_close(got_folded, want[:rows], 1e-4)
        assert_close(got_folded, got_unfolded, 1e-4)


@needs_ort_cuda
def test_fp16_export_runs_on_cuda_within_its_tolerance() -> None:
    model = net("resnet18", {"image_size": 64, "num_classes": 10})
    x = batch(model, 32)
    half, _ = fold_for_dtype(model, x[:8], "fp16")
    proto = export_onnx(half, x[:2])
    io_types = {v.type.tensor_type.elem_type for v in [*proto.graph.input, *proto.graph.output]}
    assert io_types == {onnx.TensorProto.FLOAT}  # fp16 inside, float32 for clients
    with torch.inference_mode():
        want = model(x).numpy()
    got = run_bound(cuda_session(proto, optimize=True), x.numpy())
    assert_close(got, want, 1e-2)
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.9
