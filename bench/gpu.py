"""GPU benchmark: folded vs unfolded ResNet-18 in PyTorch and ONNX Runtime, and the service's share.

On a machine with an NVIDIA GPU (onnxruntime-gpu installed in place of onnxruntime, and a CUDA
build of torch), from the repository root:

    .venv/bin/python bench/gpu.py --json bench/gpu-h100.json            # about 10 minutes
    .venv/bin/python bench/gpu.py --batches 1,64,256 --repeat 1 --seconds 1   # a quick look
    .venv/bin/python bench/gpu.py --device cpu --size 32 --batches 1,4 --seconds 0.3  # smoke

`--device cuda` is the default when torch sees a GPU and ONNX Runtime offers
CUDAExecutionProvider; every session is checked to really run on it (ONNX Runtime silently
falls back to the CPU when the CUDA libraries are missing). The net is the registry's
ResNet-18-style model (`training.models`) at 3×`--size`×`--size`, random weights, every BN given
random statistics (a fresh BN is an identity, and folding an identity proves nothing).

1. PyTorch eager, `inference_mode`: fp32 unfolded vs folded (`training.fold.fold_model`, float64
   arithmetic cast back), and on CUDA fp16 unfolded (`model.half()`) vs folded
   (`fold_for_dtype(..., "fp16")`: folded in float64, cast once), both behind fp32 casts. The
   input already lives on the device; each call ends with `torch.cuda.synchronize()`.
2. ONNX Runtime (CUDA EP on cuda, CPU EP on cpu), timed as the service runs it: a new IOBinding
   per call, `bind_cpu_input`, output bound to the CPU, `run_with_iobinding`,
   `copy_outputs_to_cpu`, so the host↔device copies are in every figure (unlike section 1).
   Files from `training.export.export_onnx`: fp32 folded, fp32 unfolded (`keep_batchnorm=True`,
   checked to still hold BatchNormalization nodes) and fp16 folded (FP32 in and out, fp16
   inside). "opts off" sessions disable every graph optimisation (ORT_DISABLE_ALL), so the
   fold's own effect shows; "opts on" use ONNX Runtime's default level, as the service does
   (it runs "fp32 folded, opts on"). ORT's optimiser fuses Conv+BN by itself at load, so
   "folded/unfolded, opts on" should be ~1; the bench counts the BNs ORT leaves in the unfolded
   file and says so under the table if any are left. Sessions take the service's own provider
   options (`service.runtime.RuntimeOptions`: cuDNN search HEURISTIC); on CUDA one more variant
   runs the folded file with ORT's default EXHAUSTIVE search (microsoft/onnxruntime#19838).
3. The HTTP service: a real `python -m service.main` on 127.0.0.1 serving the fp32 folded file
   on the same device, driven by bench/loadgen.py (closed loop, `--http-concurrency`
   connections) with binary-tensor requests of B rows each, B being the batch size at which
   section 2's "fp32 folded, opts on" is fastest. The service's batch limit is set to B, so
   each request is one ONNX Runtime call of B rows, exactly what the in-process figure times;
   the two are measured alternately, and the ratio service/in-process (images/s) is the
   issue's target (≥ 0.90 on an H100). The service's providers are read back from
   /v2/models/<name>/config (`runtime.providers`), and one response is checked against the
   in-process output before the load starts. On `--device cpu` the load generator takes CPU
   from the service, so the ratio there is a smoke check, not a result.

Every figure is the median over `--repeat` repeats; within a repeat every variant is measured
at every batch size in turn (the order rotating between repeats), each for `--seconds` after
`--warmup` uncounted calls, so drift hits all of them alike. Ratios are medians of the
per-repeat ratios. Latency is per call (one batch): median and p99. Accuracy is the max
|difference| of each variant's logits from PyTorch fp32 unfolded *on the CPU* on one input
(on CUDA, TF32 convolutions show up there where they are on: torch's cuDNN default, and
ONNX Runtime's `use_tf32`, recorded with each session's provider options in the JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from overload import free_port, running_service  # bench/ is first on sys.path
from torch import nn

from service.runtime import RuntimeOptions
from training.bn.layers import randomize_bn_statistics
from training.export import (
    INPUT_NAME,
    OUTPUT_NAME,
    ReducedPrecision,
    batchnorm_nodes,
    check_onnx,
    export_onnx,
    fold_for_dtype,
)
from training.fold import fold_model
from training.models import build_model

ROOT = Path(__file__).resolve().parent.parent
LOADGEN = ROOT / "bench" / "loadgen.py"
MODEL = "resnet18"
DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
REFERENCE_ROWS = 4  # rows of the accuracy check's input
MIN_CALLS = 3  # timed calls per measurement, however long one takes
CUDA_EP, CPU_EP = "CUDAExecutionProvider", "CPUExecutionProvider"

# (label, numerator, denominator) per section; a ratio whose variants did not run is left out.
RATIOS = {
    "torch": (
        ("folded/unfolded, fp32", "torch_fp32_folded", "torch_fp32_unfolded"),
        ("folded/unfolded, fp16", "torch_fp16_folded", "torch_fp16_unfolded"),
        ("fp16/fp32, folded", "torch_fp16_folded", "torch_fp32_folded"),
    ),
    "onnxruntime": (
        ("folded/unfolded, opts off", "ort_fp32_folded_noopt", "ort_fp32_unfolded_noopt"),
        ("folded/unfolded, opts on", "ort_fp32_folded_opt", "ort_fp32_unfolded_opt"),
        ("opts on/off, unfolded", "ort_fp32_unfolded_opt", "ort_fp32_unfolded_noopt"),
        ("fp16/fp32, folded, opts on", "ort_fp16_folded_opt", "ort_fp32_folded_opt"),
        (
            "EXHAUSTIVE/HEURISTIC, folded",
            "ort_fp32_folded_opt_exhaustive",
            "ort_fp32_folded_opt",
        ),
    ),
}
SERVED = "ort_fp32_folded_opt"  # what the service runs: the in-process limit of section 3


# --------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """One way of running the net. `prepare(batch)` returns a call on `batch` rows of the
    benchmark input, already where the variant wants it; `infer` maps a host array to logits."""

    key: str
    label: str
    section: str  # "torch" or "onnxruntime"
    prepare: Callable[[int], Callable[[], object]]
    infer: Callable[[np.ndarray], np.ndarray]
    providers: tuple[str, ...] = ()
    provider_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Nets:
    """The net in every form, on the CPU; `reference` is the unfolded fp32 output on `x_ref`."""

    unfolded: nn.Module
    folded: nn.Module
    folded16: nn.Module
    fold: dict[str, int]
    x_ref: np.ndarray
    reference: np.ndarray


def build_nets(size: int, seed: int) -> Nets:
    torch.manual_seed(seed)
    model = randomize_bn_statistics(build_model(MODEL, {"image_size": size}).eval(), seed)
    rng = np.random.default_rng(seed)
    calibration = torch.from_numpy(rng.normal(size=(8, 3, size, size)).astype(np.float32))
    folded, report = fold_model(model, calibration)  # verified against a float64 copy
    folded16, _ = fold_for_dtype(model, calibration, "fp16")
    x_ref = rng.normal(size=(REFERENCE_ROWS, 3, size, size)).astype(np.float32)
    with torch.inference_mode():
        reference = model(torch.from_numpy(x_ref)).numpy()
    fold = {"bn_before": report.before.batchnorms, "bn_after": report.after.batchnorms}
    return Nets(model, folded.eval(), folded16, fold, x_ref, reference)


def torch_variants(nets: Nets, x: np.ndarray, device: str) -> list[Variant]:
    """fp32 unfolded and folded; on CUDA fp16 too (the CPU has no fast fp16 convolutions)."""
    forms = [
        ("fp32_unfolded", "fp32 unfolded", nets.unfolded),
        ("fp32_folded", "fp32 folded", nets.folded),
    ]
    if device == "cuda":
        half = ReducedPrecision(copy.deepcopy(nets.unfolded).half(), torch.float16).eval()
        forms += [
            ("fp16_unfolded", "fp16 unfolded", half),
            ("fp16_folded", "fp16 folded", nets.folded16),
        ]
    on_device = torch.from_numpy(x).to(device)
    return [_torch_variant(key, label, net, on_device, device) for key, label, net in forms]


def _torch_variant(key: str, label: str, net: nn.Module, x: torch.Tensor, device: str) -> Variant:
    net = copy.deepcopy(net).to(device).eval()
    # CUDA runs asynchronously: a call is over when the device says so, not when it returns.
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None

    def prepare(batch: int) -> Callable[[], object]:
        rows = x[:batch]

        def call() -> None:
            net(rows)
            sync()

        return call

    def infer(host: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return net(torch.from_numpy(host).to(device)).float().cpu().numpy()

    return Variant(f"torch_{key}", f"torch {label}", "torch", prepare, infer)


@dataclass(frozen=True)
class Files:
    fp32_folded: Path
    fp32_unfolded: Path
    fp16_folded: Path
    batchnorm_nodes: dict[str, int]


def export_files(nets: Nets, folder: Path) -> Files:
    """The three ONNX files, each checked; the unfolded one must still hold its BNs."""
    example = torch.from_numpy(nets.x_ref[:2])
    protos = {
        "fp32_folded": export_onnx(nets.folded, example),
        "fp32_unfolded": export_onnx(nets.unfolded, example, keep_batchnorm=True),
        "fp16_folded": export_onnx(nets.folded16, example),
    }
    counts = {name: len(batchnorm_nodes(proto)) for name, proto in protos.items()}
    if counts["fp32_unfolded"] == 0:
        raise RuntimeError("the unfolded export holds no BatchNormalization: it was folded anyway")
    if counts["fp32_folded"] or counts["fp16_folded"]:
        raise RuntimeError(f"a folded export still holds BatchNormalization nodes: {counts}")
    paths = {}
    for name, proto in protos.items():
        check_onnx(proto, name[:4])
        paths[name] = folder / f"{MODEL}-{name}.onnx"
        onnx.save(proto, str(paths[name]))
    return Files(**paths, batchnorm_nodes=counts)


def batchnorm_left_by_ort(path: Path, folder: Path) -> int:
    """BatchNormalization nodes ONNX Runtime's own optimiser leaves in `path` (CPU EP, extended
    level; Conv+BN fusion is a basic-level rewrite). Not 0 means "opts on" is no fair stand-in
    for ORT's fusion (ORT fuses a BN only into a Conv whose bias is a constant)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(folder / f"{path.stem}-ort-optimised.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=[CPU_EP])
    return len(batchnorm_nodes(onnx.load(options.optimized_model_filepath)))


def ort_providers(device: str, algo_search: str = "HEURISTIC") -> list[Any]:
    """Exactly as the service asks for them (its defaults, but for the cuDNN search)."""
    providers = (CUDA_EP, CPU_EP) if device == "cuda" else (CPU_EP,)
    return list(RuntimeOptions(providers, cuda_conv_algo_search=algo_search).provider_list())


def ort_session(
    path: Path, device: str, optimise: bool, threads: int, algo_search: str = "HEURISTIC"
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if not optimise:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    providers = ort_providers(device, algo_search)
    session = ort.InferenceSession(str(path), options, providers=providers)
    expected = CUDA_EP if device == "cuda" else CPU_EP
    if session.get_providers()[0] != expected:
        raise RuntimeError(
            f"ONNX Runtime runs {path.name} on {session.get_providers()}, not {expected}: "
            "are onnxruntime-gpu and its CUDA/cuDNN libraries installed?"
        )
    return session


def ort_call(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    """One inference the way service.runtime.ModelVersion.run does it; synchronous, since the
    output is bound to host memory."""
    binding = session.io_binding()
    binding.bind_cpu_input(INPUT_NAME, np.ascontiguousarray(x))
    binding.bind_output(OUTPUT_NAME)
    session.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()[0]


def ort_variants(files: Files, x: np.ndarray, device: str, threads: int) -> list[Variant]:
    forms = [
        ("fp32_unfolded_noopt", "fp32 unfolded, opts off", files.fp32_unfolded, False),
        ("fp32_folded_noopt", "fp32 folded, opts off", files.fp32_folded, False),
        ("fp32_unfolded_opt", "fp32 unfolded, opts on", files.fp32_unfolded, True),
        ("fp32_folded_opt", "fp32 folded, opts on", files.fp32_folded, True),
        ("fp16_folded_opt", "fp16 folded, opts on", files.fp16_folded, True),
    ]
    variants = [
        _ort_variant(key, label, ort_session(path, device, optimise, threads), x)
        for key, label, path, optimise in forms
    ]
    if device == "cuda":  # the service's HEURISTIC default against ORT's own EXHAUSTIVE
        exhaustive = ort_session(files.fp32_folded, device, True, threads, "EXHAUSTIVE")
        label = "fp32 folded, opts on, EXHAUSTIVE"
        variants.append(_ort_variant("fp32_folded_opt_exhaustive", label, exhaustive, x))
    return variants


def _ort_variant(key: str, label: str, session: ort.InferenceSession, x: np.ndarray) -> Variant:
    def prepare(batch: int) -> Callable[[], object]:
        rows = x[:batch]
        return lambda: ort_call(session, rows)

    def infer(host: np.ndarray) -> np.ndarray:
        return ort_call(session, host)

    providers, options = tuple(session.get_providers()), dict(session.get_provider_options())
    return Variant(f"ort_{key}", f"ORT {label}", "onnxruntime", prepare, infer, providers, options)


# --------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Sample:
    """One measurement: per-call latencies (s) of `batch` rows over `elapsed` seconds."""

    batch: int
    latencies: list[float]
    elapsed: float

    @property
    def images_per_s(self) -> float:
        return len(self.latencies) * self.batch / self.elapsed

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1e3


def time_calls(call: Callable[[], object], batch: int, args: argparse.Namespace) -> Sample:
    """`--warmup` calls, then calls until `--seconds` have passed (each call returns only once
    its work is done: see the variants)."""
    for _ in range(args.warmup):
        call()
    latencies: list[float] = []
    start = now = time.perf_counter()
    while now - start < args.seconds or len(latencies) < MIN_CALLS:
        began = time.perf_counter()
        call()
        now = time.perf_counter()
        latencies.append(now - began)
    return Sample(batch, latencies, now - start)


Samples = dict[str, dict[int, list[Sample]]]  # variant key → batch → one per repeat


def measure(variants: list[Variant], args: argparse.Namespace) -> Samples:
    samples: Samples = {v.key: {b: [] for b in args.batches} for v in variants}
    with torch.inference_mode():
        for repeat in range(args.repeat):
            shift = repeat % len(variants)  # rotate, so no variant always runs first
            for batch in args.batches:
                for v in variants[shift:] + variants[:shift]:
                    sample = time_calls(v.prepare(batch), batch, args)
                    samples[v.key][batch].append(sample)
                    print(
                        f"[{repeat + 1}/{args.repeat}] batch {batch:<4} {v.label:30} "
                        f"{sample.images_per_s:>10,.1f} images/s",
                        flush=True,
                    )
    return samples


def summarise(samples: list[Sample]) -> dict[str, Any]:
    rates = [s.images_per_s for s in samples]
    return {
        "images_per_s": statistics.median(rates),
        "p50_ms": statistics.median(s.percentile_ms(50) for s in samples),
        "p99_ms": statistics.median(s.percentile_ms(99) for s in samples),
        "calls": sum(len(s.latencies) for s in samples),
        "repeats_images_per_s": rates,
    }


def ratios(samples: Samples, section: str, batches: list[int]) -> dict[str, dict[int, float]]:
    """Median over repeats of numerator/denominator images/s, measured in the same repeat."""
    out = {}
    for label, top, bottom in RATIOS[section]:
        if top in samples and bottom in samples:
            out[label] = {
                b: statistics.median(
                    t.images_per_s / d.images_per_s
                    for t, d in zip(samples[top][b], samples[bottom][b], strict=True)
                )
                for b in batches
            }
    return out


def accuracy(variant: Variant, nets: Nets) -> dict[str, float]:
    got = variant.infer(nets.x_ref)
    scale = float(np.max(np.abs(nets.reference)))
    diff = float(np.max(np.abs(got.astype(np.float64) - nets.reference)))
    return {"max_abs_diff": diff, "max_rel_diff": diff / scale, "output_scale": scale}


def section_report(
    section: str, variants: list[Variant], samples: Samples, nets: Nets, batches: list[int]
) -> dict[str, Any]:
    chosen = [v for v in variants if v.section == section]
    return {
        "variants": {
            v.key: {
                "label": v.label,
                "providers": list(v.providers),
                "provider_options": v.provider_options,
                "batches": {str(b): summarise(samples[v.key][b]) for b in batches},
            }
            for v in chosen
        },
        "accuracy": {v.key: accuracy(v, nets) for v in chosen},
        "ratios": {
            k: {str(b): r for b, r in per.items()}
            for k, per in ratios(samples, section, batches).items()
        },
    }


# --------------------------------------------------------------------------- the HTTP service


@dataclass(frozen=True)
class Body:
    """A binary-tensor infer request of `rows` rows, in a file for the load generator."""

    path: Path
    header_length: int
    rows: int


def write_body(x: np.ndarray, folder: Path) -> Body:
    """As bench/serve.py's make_workload, binary only (a JSON body of B images is gigabytes)."""
    tensor = {"name": INPUT_NAME, "shape": list(x.shape), "datatype": "FP32"}
    head = json.dumps(
        {
            "inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}],
            "outputs": [{"name": OUTPUT_NAME, "parameters": {"binary_data": True}}],
        }
    ).encode()
    path = folder / f"body-{len(x)}.bin"
    path.write_bytes(head + np.ascontiguousarray(x).tobytes())
    return Body(path, len(head), len(x))


def service_env(
    repo: Path, port: int, body: Body, x: np.ndarray, args: argparse.Namespace
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOLDSERVE_")}
    env.update(
        FOLDSERVE_REPOSITORY=str(repo),
        FOLDSERVE_MODELS=MODEL,
        FOLDSERVE_PORT=str(port),
        FOLDSERVE_PROVIDERS="auto" if args.device == "cuda" else "cpu",
        FOLDSERVE_INTRA_OP_THREADS=str(args.threads),  # as the in-process sessions
        FOLDSERVE_MAX_BODY_BYTES=str(max(64 << 20, body.path.stat().st_size + (1 << 20))),
        FOLDSERVE_MAX_TENSOR_ELEMENTS=str(max(1 << 26, x.size)),
        FOLDSERVE_MAX_REQUEST_BATCH_SIZE=str(max(8192, body.rows)),
        # One request of B rows fills a batch: each is one call of B rows, as in-process.
        FOLDSERVE_MAX_BATCH_SIZE=str(body.rows),
        FOLDSERVE_ACCESS_LOG="false",
        FOLDSERVE_LOG_LEVEL="warning",
        FOLDSERVE_SHUTDOWN_GRACE_S="0",
    )
    return env


@contextlib.contextmanager
def service(env: dict[str, str], log: Path) -> Iterator[int]:
    """`python -m service.main` with `env`, ready; yields its port; stopped afterwards."""
    with running_service(env, log):
        yield int(env["FOLDSERVE_PORT"])


def service_providers(port: int) -> list[str]:
    url = f"http://127.0.0.1:{port}/v2/models/{MODEL}/config"
    with urllib.request.urlopen(url, timeout=30) as response:
        return list(json.loads(response.read())["runtime"]["providers"])


def service_infer(port: int, body: Body) -> np.ndarray:
    """One request through the service: its logits, decoded from the binary reply."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer",
        data=body.path.read_bytes(),
        headers={"Inference-Header-Content-Length": str(body.header_length)},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        length = int(response.headers["Inference-Header-Content-Length"])
        raw = response.read()
    output = json.loads(raw[:length])["outputs"][0]
    data = np.frombuffer(raw[length:], dtype=np.float32)
    return data[: math.prod(output["shape"])].reshape(output["shape"])


def run_loadgen(port: int, body: Body, expected_per_s: float, args: argparse.Namespace) -> dict:
    """A closed loop of `--http-concurrency` connections for 2 × `--seconds`, bounded in count
    by three times what the in-process rate would allow."""
    c, seconds = args.http_concurrency, 2 * args.seconds
    count = max(4 * c, math.ceil(3 * seconds * expected_per_s / body.rows))
    command = [sys.executable, str(LOADGEN), "--port", str(port)]
    command += ["--path", f"/v2/models/{MODEL}/infer", "--body", str(body.path)]
    command += ["--header", f"Inference-Header-Content-Length: {body.header_length}"]
    command += ["-c", str(c), "-n", str(count), "-t", str(seconds), "-w", str(2 * c)]
    done = subprocess.run(
        command, capture_output=True, text=True, check=True, timeout=seconds + 300
    )
    result = json.loads(done.stdout)
    if result["errors"] or not result["ok"]:
        raise RuntimeError(f"the service answered errors under load: {result}")
    return result


def best_batch(report: dict[str, Any]) -> int:
    batches = report["variants"][SERVED]["batches"]
    return int(max(batches, key=lambda b: batches[b]["images_per_s"]))


def check_providers(providers: list[str], device: str) -> None:
    expected = CUDA_EP if device == "cuda" else CPU_EP
    if not providers or providers[0] != expected:
        raise RuntimeError(f"the service runs on {providers}, not {expected}")


def http_section(
    served: Variant, files: Files, x: np.ndarray, batch: int, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    repo = work / "repo"
    (repo / MODEL / "1").mkdir(parents=True)
    shutil.copyfile(files.fp32_folded, repo / MODEL / "1" / "model.onnx")
    rows = x[:batch]
    body = write_body(rows, work)
    env = service_env(repo, free_port(), body, rows, args)
    with service(env, work / "service.log") as port:
        providers = service_providers(port)
        print(f"service providers: {providers}", flush=True)
        check_providers(providers, args.device)
        # Also the service's warm-up at B rows (cuDNN's algorithm search), before the clock.
        diff = float(np.max(np.abs(service_infer(port, body) - served.infer(rows))))
        inside, loads = [], []
        with torch.inference_mode():
            for repeat in range(args.repeat):
                inside.append(time_calls(served.prepare(batch), batch, args))
                loads.append(run_loadgen(port, body, inside[-1].images_per_s, args))
                print(
                    f"[{repeat + 1}/{args.repeat}] batch {batch} in-process "
                    f"{inside[-1].images_per_s:,.1f} images/s, service "
                    f"{loads[-1]['rps'] * batch:,.1f} images/s",
                    flush=True,
                )
    return http_summary(batch, providers, diff, inside, loads, args)


def http_summary(
    batch: int,
    providers: list[str],
    diff: float,
    inside: list[Sample],
    loads: list[dict],
    args: argparse.Namespace,
) -> dict[str, Any]:
    served = [load["rps"] * batch for load in loads]
    return {
        "batch": batch,
        "concurrency": args.http_concurrency,
        "providers": providers,
        "max_abs_diff_vs_in_process": diff,
        "service_images_per_s": statistics.median(served),
        "in_process_images_per_s": statistics.median(s.images_per_s for s in inside),
        "ratio": statistics.median(s / i.images_per_s for s, i in zip(served, inside, strict=True)),
        "service_p50_ms": statistics.median(load["p50_ms"] for load in loads),
        "service_p99_ms": statistics.median(load["p99_ms"] for load in loads),
        "in_process_p50_ms": statistics.median(s.percentile_ms(50) for s in inside),
        "loadgen": loads,
    }


# --------------------------------------------------------------------------- reporting


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "kind": device,
        "cpu": cpu_model(),
        "cpu_cores": len(os.sched_getaffinity(0)),
    }
    if device == "cuda":
        info["name"] = torch.cuda.get_device_name()
        info["driver"] = nvidia_driver()
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["torch_cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        info["torch_cudnn_benchmark"] = torch.backends.cudnn.benchmark
    else:
        info["name"] = info["cpu"]
    return info


def nvidia_driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        return done.stdout.strip().splitlines()[0]
    return None


def print_section(title: str, report: dict[str, Any], batches: list[int]) -> None:
    head = "| " + " | ".join(str(b) for b in batches) + " |"
    rule = "|---" * (len(batches) + 1) + "|"
    print(f"\n## {title}\n\nimages/s by batch size\n\n| variant {head}\n{rule}")
    for v in report["variants"].values():
        cells = " | ".join(f"{v['batches'][str(b)]['images_per_s']:,.1f}" for b in batches)
        print(f"| {v['label']} | {cells} |")
    print(f"\nlatency per call, p50 / p99 ms\n\n| variant {head}\n{rule}")
    for v in report["variants"].values():
        per = [v["batches"][str(b)] for b in batches]
        print(
            f"| {v['label']} | "
            + " | ".join(f"{s['p50_ms']:.3f} / {s['p99_ms']:.3f}" for s in per)
            + " |"
        )
    print(f"\nratios of images/s (median of per-repeat ratios)\n\n| ratio {head}\n{rule}")
    for label, per in report["ratios"].items():
        print(f"| {label} | " + " | ".join(f"{per[str(b)]:.3f}" for b in batches) + " |")
    print(
        "\nvs PyTorch fp32 unfolded on the CPU\n\n| variant | max abs diff | relative to max|y| |"
    )
    print("|---|---|---|")
    for key, acc in report["accuracy"].items():
        label = report["variants"][key]["label"]
        print(f"| {label} | {acc['max_abs_diff']:.3g} | {acc['max_rel_diff']:.3g} |")


def print_batchnorm_nodes(report: dict[str, Any]) -> None:
    counts, left = report["batchnorm_nodes"], report["batchnorm_nodes_left_by_ort"]["fp32_unfolded"]
    print(f"\nBatchNormalization nodes per file: {counts}")
    print(f"left in the unfolded file by ONNX Runtime's own optimiser: {left}")
    if left:
        print(
            "  so 'folded/unfolded, opts on' is NOT folding vs ORT's Conv+BN fusion: ORT fuses\n"
            "  a BN only into a Conv with a constant bias"
        )


def print_http(http: dict[str, Any]) -> None:
    print("\n## 3. HTTP service (binary tensors) vs in-process ORT fp32 folded, opts on\n")
    if http.get("skipped"):
        print("skipped (--skip-http)")
        return
    print(
        f"batch {http['batch']} per request, {http['concurrency']} connections, providers "
        f"{', '.join(http['providers'])}\n"
        f"service     {http['service_images_per_s']:>12,.1f} images/s "
        f"(p50 {http['service_p50_ms']:.2f} ms, p99 {http['service_p99_ms']:.2f} ms per request)\n"
        f"in-process  {http['in_process_images_per_s']:>12,.1f} images/s "
        f"(p50 {http['in_process_p50_ms']:.2f} ms per call)\n"
        f"service/in-process {http['ratio']:.3f} (target ≥ 0.90 on an H100); "
        f"max |service − in-process| {http['max_abs_diff_vs_in_process']:.3g}"
    )


# --------------------------------------------------------------------------- the run


def default_device() -> str:
    gpu = torch.cuda.is_available() and CUDA_EP in ort.get_available_providers()
    return "cuda" if gpu else "cpu"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default=None, help="default: cuda if usable"
    )
    parser.add_argument("--size", type=int, default=224, help="input is 3×SIZE×SIZE")
    parser.add_argument(
        "--batches", default=",".join(map(str, DEFAULT_BATCHES)), help="comma-separated"
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement, after warm-up")
    parser.add_argument("--warmup", type=int, default=3, help="uncounted calls per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved repeats (median)")
    parser.add_argument(
        "--threads", type=int, default=0, help="ORT intra-op and torch threads (0: theirs)"
    )
    parser.add_argument(
        "--http-concurrency", type=int, default=4, help="load generator connections"
    )
    parser.add_argument("--skip-http", action="store_true", help="skip section 3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args(argv)
    validate(parser, args)
    return args


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--batches must be comma-separated integers, not {args.batches!r}")
    if not batches or min(batches) < 1:
        parser.error(f"--batches must be positive integers, not {args.batches!r}")
    args.batches = list(dict.fromkeys(batches))
    if args.size < 32:
        parser.error(f"--size must be at least 32 (the net downsamples 32×), not {args.size}")
    if args.seconds <= 0 or args.repeat < 1 or args.http_concurrency < 1:
        parser.error("--seconds, --repeat and --http-concurrency must be positive")
    if args.warmup < 0 or args.threads < 0:
        parser.error("--warmup and --threads must not be negative")
    if args.device is None:
        args.device = default_device()
    elif args.device == "cuda" and default_device() != "cuda":
        parser.error(
            f"--device cuda needs torch.cuda.is_available() (it is {torch.cuda.is_available()}) "
            f"and ONNX Runtime's {CUDA_EP} (offered: {', '.join(ort.get_available_providers())})"
        )


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    nets = build_nets(args.size, args.seed)
    files = export_files(nets, work)
    batch_max = max(args.batches)
    x = np.random.default_rng(args.seed + 1).normal(size=(batch_max, 3, args.size, args.size))
    x = x.astype(np.float32)
    variants = torch_variants(nets, x, args.device) + ort_variants(
        files, x, args.device, args.threads
    )
    samples = measure(variants, args)
    torch_report = section_report("torch", variants, samples, nets, args.batches)
    ort_report = section_report("onnxruntime", variants, samples, nets, args.batches)
    ort_report["batchnorm_nodes"] = files.batchnorm_nodes
    ort_report["batchnorm_nodes_left_by_ort"] = {
        "fp32_unfolded": batchnorm_left_by_ort(files.fp32_unfolded, work)
    }
    http: dict[str, Any] = {"skipped": True}
    if not args.skip_http:
        served = next(v for v in variants if v.key == SERVED)
        http = http_section(served, files, x, best_batch(ort_report), args, work)
    return {
        "bench": "bench/gpu.py",
        "date": datetime.date.today().isoformat(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "device": device_info(args.device),
        "versions": {
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "python": platform.python_version(),
        },
        "model": {
            "name": MODEL,
            "input": [3, args.size, args.size],
            **nets.fold,
            "torch_threads": torch.get_num_threads(),
        },
        "torch": torch_report,
        "onnxruntime": ort_report,
        "http": http,
    }


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as folder:
        results = run(args, Path(folder))
    device = results["device"]
    print(
        f"\n# bench/gpu.py, {results['date']}, {device['name']} ({args.device}), torch "
        f"{torch.__version__}, onnxruntime {ort.__version__}, ResNet-18-style 3×{args.size}×"
        f"{args.size}, medians of {args.repeat} repeat(s) of {args.seconds} s"
    )
    print_section("1. PyTorch eager (input on the device)", results["torch"], args.batches)
    print_section(
        "2. ONNX Runtime, IOBinding from and to host memory", results["onnxruntime"], args.batches
    )
    print_batchnorm_nodes(results["onnxruntime"])
    print_http(results["http"])
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
