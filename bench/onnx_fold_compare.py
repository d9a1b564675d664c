"""Benchmark: `fold-onnx` against the ONNX optimisers a user would reach for instead.

Not a test. For every registry model's *unfolded* export (BatchNormalization nodes kept, random
per-channel statistics) and every file of the third-party ONNX corpus (``FOLDSERVE_ONNX_CASES``,
default ../shared/onnx-cases; see bench/onnx_cases.py), run:

- ours: `training.onnx_fold.fold_onnx`
- onnxscript: `onnxscript.optimizer.optimize` + `onnxscript.rewriter.rewrite` (what
  `torch.onnx.export` runs by default)
- onnxoptimizer: `fuse_bn_into_conv`
- onnxslim: `onnxslim.slim`
- onnxsim: `onnxsim.simplify`

and print BN nodes left / total nodes after each, and whether the result still matches the
original (ONNX Runtime, all graph optimisations off, random inputs, rtol = atol = 1e-4; 1e-2 for
fp16 models). Then ONNX Runtime latency of the registry models, unfolded vs folded file, with
graph optimisations off and on, at batch 1 and 32, as ratios measured side by side in one run.

    .venv/bin/pip install -c constraints.txt -e '.[bench]'
    .venv/bin/python bench/onnx_fold_compare.py [--repeats N]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import time
import warnings
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx_cases import missing_reason, onnx_case_files  # bench/ is first on sys.path

from training import models
from training.bn.layers import randomize_bn_statistics
from training.export import batchnorm_nodes, export_onnx
from training.onnx_fold import fold_onnx, verify_onnx_fold

BENCH_CONFIGS = {
    "mlp": {},
    "digits_cnn": {},
    "preact": {},
    "resnet18": {"image_size": 64},
    "mobilenet": {"image_size": 64},
}


def registry_cases() -> dict[str, tuple[onnx.ModelProto, tuple[int, ...]]]:
    cases = {}
    for name, options in BENCH_CONFIGS.items():
        model = randomize_bn_statistics(models.build_model(name, options)).eval()
        proto = export_onnx(model, torch.randn(2, *model.input_shape), keep_batchnorm=True)
        cases[f"registry/{name}"] = (proto, tuple(model.input_shape))
    return cases


def file_cases() -> dict[str, onnx.ModelProto]:
    files = onnx_case_files()
    if not files:
        print(f"note: {missing_reason()}; measuring the registry models only")
    return {f"onnx-cases/{p.parent.name}": onnx.load(p) for p in files}


# --------------------------------------------------------------------------- the tools


def ours(model: onnx.ModelProto) -> onnx.ModelProto:
    return fold_onnx(model)[0]


def onnxscript_default(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxscript.optimizer
    import onnxscript.rewriter

    optimized = onnxscript.optimizer.optimize(model)
    return onnxscript.rewriter.rewrite(optimized)


def onnxoptimizer_fuse(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxoptimizer

    return onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])


def onnxslim_slim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    return onnxslim.slim(model)


def onnxsim_simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxsim

    simplified, _ = onnxsim.simplify(model)
    return simplified


TOOLS: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {
    "ours": ours,
    "onnxscript": onnxscript_default,
    "onnxoptimizer": onnxoptimizer_fuse,
    "onnxslim": onnxslim_slim,
    "onnxsim": onnxsim_simplify,
}


def count_nodes(model: onnx.ModelProto) -> tuple[int, int]:
    return len(batchnorm_nodes(model)), len(model.graph.node)


def run_tool(tool: Callable, model: onnx.ModelProto) -> str:
    """'BN left/nodes ✓' or '✗' for a mismatch, or the error's type."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = tool(onnx.ModelProto.FromString(model.SerializeToString()))
            matches = verify_onnx_fold(model, result).passed
    except Exception as exc:  # a benchmark reports every tool's failure, whatever it is
        return f"error ({type(exc).__name__})"
    bn, nodes = count_nodes(result)
    return f"{bn}/{nodes} {'ok' if matches else 'MISMATCH'}"


def coverage_table(cases: dict[str, onnx.ModelProto]) -> None:
    header = ["model", "original BN/nodes", *TOOLS]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, model in cases.items():
        bn, nodes = count_nodes(model)
        row = [name, f"{bn}/{nodes}", *(run_tool(tool, model) for tool in TOOLS.values())]
        print("| " + " | ".join(row) + " |")


# --------------------------------------------------------------------------- latency


def session(model: onnx.ModelProto, optimise: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimise
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.intra_op_num_threads = 1  # one core for the runtime, as a pinned server would
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def median_ms(sess: ort.InferenceSession, x: np.ndarray, repeats: int) -> float:
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(5):
        sess.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def latency_table(cases: dict[str, tuple[onnx.ModelProto, tuple[int, ...]]], repeats: int) -> None:
    print("| model | ORT graph opts | batch | unfolded ms | folded ms | unfolded / folded |")
    print("|---|---|---|---|---|---|")
    for name, (unfolded, shape) in cases.items():
        folded = ours(unfolded)
        for optimise in (False, True):
            for batch in (1, 32):
                x = np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32)
                a = median_ms(session(unfolded, optimise), x, repeats)
                b = median_ms(session(folded, optimise), x, repeats)
                opts = "on" if optimise else "off"
                print(f"| {name} | {opts} | {batch} | {a:.3f} | {b:.3f} | {a / b:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per measurement")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    print(f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, torch {torch.__version__}")
    registry = registry_cases()
    print("\nBN nodes left / total nodes after each tool (ok = still matches the original)\n")
    coverage_table({k: v[0] for k, v in registry.items()} | file_cases())
    print("\nONNX Runtime latency, median of runs, intra-op threads = 1\n")
    latency_table(registry, args.repeats)


if __name__ == "__main__":
    main()
