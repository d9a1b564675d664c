"""Benchmark: what BatchNorm folding buys in eager PyTorch, and who folds which pattern.

Not a test. Two tables from one run:

1. Eager CPU latency of the ResNet-18-style and MobileNet-style registry nets, unfolded vs
   folded by `training.fold.fold_model`, at batch 1 and 32: best and median of interleaved runs,
   and the ratio unfolded / folded (> 1 means folding is faster). On a shared machine the best
   of N is the steadier estimate; the median shows how much the load moved it.
2. Coverage: for each pattern the issue names (plus the registry models), how many BatchNorms
   each tool removes and whether the result still matches the original: torch.fx's
   `experimental.optimization.fuse`, `torch.ao.quantization.fuse_modules` (given every
   producer→BN pair by name, as its users must), `torch.onnx.export` with its default
   optimisation (BatchNormalization nodes left in the exported graph), and ours.

    .venv/bin/python bench/fold_speed.py [--repeats N] [--image-size N] [--skip-latency]

Every BN gets random per-channel statistics first; a fresh BN is an identity, which would make
a wrong fold look right.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import io
import logging
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.ao.quantization import fuse_modules
from torch.fx.experimental.optimization import fuse as fx_fuse

from training.bn.layers import randomize_bn_statistics
from training.fold import fold_model
from training.models import MODELS

# --------------------------------------------------------------------------- models


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(self.conv(x), self.mean, self.var, None, None, False, 0.0, 1e-5)


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn1(self.conv(x)) * self.bn2(self.conv(x))


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    pairs: list[list[str]]  # producer→BN module names, for fuse_modules


def seq(*modules: nn.Module) -> Callable[[], nn.Module]:
    return lambda: nn.Sequential(*copy.deepcopy(modules))


CASES = [
    Case("Conv2d→BN", seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), (3, 8, 8), [["0", "1"]]),
    Case("Conv1d→BN", seq(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4)), (3, 8), [["0", "1"]]),
    Case(
        "depthwise Conv2d→BN",
        seq(nn.Conv2d(4, 4, 3, groups=4), nn.BatchNorm2d(4)),
        (4, 8, 8),
        [["0", "1"]],
    ),
    Case(
        "ConvTranspose2d→BN",
        seq(nn.ConvTranspose2d(3, 4, 2, 2), nn.BatchNorm2d(4)),
        (3, 4, 4),
        [["0", "1"]],
    ),
    Case(
        "depthwise ConvTranspose2d→BN",
        seq(nn.ConvTranspose2d(4, 4, 2, 2, groups=4), nn.BatchNorm2d(4)),
        (4, 4, 4),
        [["0", "1"]],
    ),
    Case("Linear→BN1d", seq(nn.Linear(5, 4), nn.BatchNorm1d(4)), (5,), [["0", "1"]]),
    Case(
        "Linear→BN1d(affine=False)",
        seq(nn.Linear(5, 4), nn.BatchNorm1d(4, affine=False)),
        (5,),
        [["0", "1"]],
    ),
    Case("F.batch_norm after conv", Functional, (3, 8, 8), []),
    Case("BN→Linear", seq(nn.BatchNorm1d(5), nn.Linear(5, 3)), (5,), []),
    Case(
        "BN→Conv2d (replicate pad)",
        seq(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1, padding_mode="replicate")),
        (3, 8, 8),
        [],
    ),
    Case(
        "BN→Flatten→Linear", seq(nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(32, 3)), (2, 4, 4), []
    ),
    Case("conv called at 2 sites (no fold)", CalledTwice, (3, 4, 4), [["conv", "bn1"]]),
]

SMALL = {
    "resnet18": {"image_size": 32, "widths": (8, 16, 16, 32), "num_classes": 10},
    "mobilenet": {
        "image_size": 32,
        "stem_width": 8,
        "blocks": ((16, 1), (32, 2)),
        "num_classes": 10,
    },
}


def registry_cases() -> list[Case]:
    """Every registry model, with fuse_modules given the pairs our folder found bn-after."""
    cases = []
    for name, spec in sorted(MODELS.items()):
        config = SMALL.get(name, {})

        def build(spec: object = spec, config: dict = config) -> nn.Module:
            return spec.make(**config)  # type: ignore[attr-defined]

        model = randomize_bn_statistics(build()).eval()
        _, report = fold_model(model, verify=False)
        pairs = [[p.layers[0], p.bn] for p in report.folded if p.direction == "bn-after"]
        cases.append(Case(f"registry: {name}", build, tuple(model.input_shape), pairs))
    return cases


# --------------------------------------------------------------------------- tools


def bn_count(model: nn.Module, x: Tensor) -> int:
    """BatchNorms in the traced graph (modules and F.batch_norm calls), via our tracer."""
    return fold_model(model, x, verify=False)[1].before.batchnorms


def close(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.abs(a - b).max() <= 1e-4 * (1 + np.abs(b).max()))


def run_torch_tool(tool: Callable[[nn.Module], nn.Module], model: nn.Module, x: Tensor) -> str:
    try:
        out = tool(copy.deepcopy(model)).eval()
        with torch.no_grad():
            ok = close(out(x).numpy(), model(x).numpy())
        removed = bn_count(model, x) - bn_count(out, x)
    except Exception as exc:
        return f"error ({type(exc).__name__})"
    return f"{removed}" if ok else f"{removed} WRONG"


def run_onnx_export(model: nn.Module, x: Tensor) -> str:
    """BNs the default exporter removes (its optimisation pass), checked in ONNX Runtime."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
        proto = program.model_proto
    except Exception as exc:
        return f"error ({type(exc).__name__})"
    left = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ok = close(got, model(x).numpy())
    removed = bn_count(model, x) - left
    return f"{removed}" if ok else f"{removed} WRONG"


def coverage_table() -> list[str]:
    tools: dict[str, Callable[[Case, nn.Module, Tensor], str]] = {
        "fx fuse": lambda c, m, x: run_torch_tool(fx_fuse, m, x),
        "fuse_modules": lambda c, m, x: (
            run_torch_tool(lambda mm: fuse_modules(mm, c.pairs), m, x) if c.pairs else "n/a"
        ),
        "onnx.export": lambda c, m, x: run_onnx_export(m, x),
        "ours": lambda c, m, x: run_torch_tool(lambda mm: fold_model(mm, x)[0], m, x),
    }
    header = f"| pattern | BNs | {' | '.join(tools)} |"
    lines = [header, "|" + "---|" * (len(tools) + 2)]
    for case in [*CASES, *registry_cases()]:
        model = randomize_bn_statistics(case.build()).eval()
        x = torch.randn(2, *case.input_shape) * 2 + 1
        cells = [tool(case, model, x) for tool in tools.values()]
        lines.append(f"| {case.name} | {bn_count(model, x)} | {' | '.join(cells)} |")
    return lines


# --------------------------------------------------------------------------- latency


def median_ms(model: nn.Module, x: Tensor, repeats: int) -> float:
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def latency_table(image_size: int, repeats: int) -> list[str]:
    lines = [
        "| model | batch | unfolded ms (best) | folded ms (best) | ratio of bests | of medians |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("resnet18", "mobilenet"):
        model = randomize_bn_statistics(MODELS[name].make(image_size=image_size)).eval()
        folded, _ = fold_model(model)
        for batch in (1, 32):
            x = torch.randn(batch, *model.input_shape)
            for m in (model, folded):  # warm up both
                median_ms(m, x, 2)
            # Interleave so drift (thermal, other processes) hits both alike.
            unfolded_ms, folded_ms = [], []
            for _ in range(repeats):
                unfolded_ms.append(median_ms(model, x, 1))
                folded_ms.append(median_ms(folded, x, 1))
            u, f = min(unfolded_ms), min(folded_ms)
            ratio = statistics.median(unfolded_ms) / statistics.median(folded_ms)
            lines.append(f"| {name} | {batch} | {u:.2f} | {f:.2f} | {u / f:.2f}× | {ratio:.2f}× |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the ONNX exporter is chatty
    print(f"# fold_speed, {datetime.date.today().isoformat()}")
    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {cpu}, ", end="")
    print(f"{torch.get_num_threads()} threads")
    if not args.skip_latency:
        size, n = args.image_size, args.repeats
        print(f"\n## Eager latency, {size}×{size}, {n} interleaved runs each (unfolded / folded)\n")
        print("\n".join(latency_table(args.image_size, args.repeats)))
    print("\n## BatchNorms removed (WRONG: output changed; n/a: the tool cannot express it)\n")
    print("\n".join(coverage_table()))


if __name__ == "__main__":
    main()
