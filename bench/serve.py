"""The serving benchmark: the service against what a user would pick instead, in one run.

    .venv/bin/python bench/serve.py                 # both models, 3 repeats, about 25 minutes
    .venv/bin/python bench/serve.py --models digits --repeat 1 --seconds 4   # a quick look

Every server runs as a real process pinned to core 0 (`taskset`), with ONNX Runtime on one
thread; the load generator (`bench/loadgen.py`, raw asyncio, closed loop, bounded count and
time, 127.0.0.1) runs pinned to core 1. For each model (the digits CNN, where the HTTP path is
the cost, and a ResNet-18-style net at 3×224×224, compute-bound, ~3 MB JSON bodies) it measures

  (a) the in-process ONNX Runtime limit on one thread, at batch 1, 8 and 64;
  (b) the service (`python -m service.main`) with batching off and on, JSON and binary bodies;
  (c) bench/baseline_naive.py: FastAPI + pydantic body + sync handler + one session.run each;
  (d) bench/baseline_litserve.py: LitServe with its own batching (64, 5 ms) on the same model;

at concurrency 1, 8 and 64, and prints throughput, p50/p90/p99 latency and errors, then the
ratios service/naive, service/LitServe and service/limit. With `--repeat` above 1 every figure
is the median over the repeats (each repeat restarts every server). Access logs are off for
every server (uvicorn's for the baselines, the service's own); the service keeps validation,
metrics and batching on.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
SERVER_CORE, LOAD_CORE = "0", "1"
CONCURRENCY = (1, 8, 64)
DIGITS_ONNX = ROOT / "models" / "digits" / "1" / "model.onnx"


@dataclass(frozen=True)
class Workload:
    """One model and its request bodies, written to files for the load generator."""

    name: str
    onnx: Path
    shape: tuple[int, ...]  # one request's input, batch 1
    json_body: Path
    binary_body: Path
    binary_header: str  # Inference-Header-Content-Length: N


def make_workload(name: str, onnx: Path, shape: tuple[int, ...], folder: Path) -> Workload:
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    tensor = {"name": "input", "shape": list(shape), "datatype": "FP32"}
    json_body = folder / f"{name}.json"
    json_body.write_text(json.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]}))
    head = json.dumps(
        {
            "inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        }
    ).encode()
    binary_body = folder / f"{name}.bin"
    binary_body.write_bytes(head + x.tobytes())
    return Workload(
        name, onnx, shape, json_body, binary_body, f"Inference-Header-Content-Length: {len(head)}"
    )


def export_resnet18(folder: Path, size: int = 224) -> Path:
    """A ResNet-18-style net at 3×`size`×`size` with random weights, BN folded, exported and
    verified by the project's own exporter (the service never imports torch; the bench may)."""
    import onnx
    import torch

    from training.export import export_onnx
    from training.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet18").eval()
    proto = export_onnx(model, torch.randn(1, 3, size, size))
    path = folder / f"resnet18-{size}.onnx"
    onnx.save(proto, str(path))
    return path


# ---------------------------------------------------------------- (a) in-process limit


def ort_limit(onnx: Path, shape: tuple[int, ...], batch: int, seconds: float) -> float:
    """Inferences per second of `session.run` in a loop, one thread, pinned to the server core."""
    import onnxruntime as ort

    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {int(SERVER_CORE)})
    try:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(onnx), options, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).normal(size=(batch, *shape[1:])).astype(np.float32)
        for _ in range(3):
            session.run(None, {"input": x})
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            session.run(None, {"input": x})
            runs += 1
        return runs * batch / (time.perf_counter() - start)
    finally:
        os.sched_setaffinity(0, before)


# ---------------------------------------------------------------- servers


@dataclass(frozen=True)
class Server:
    label: str
    command: list[str]
    env: dict[str, str]
    payloads: tuple[str, ...]  # "json", "binary"


def servers(workload: Workload, repo: Path, port: int) -> list[Server]:
    service_env = {
        "FOLDSERVE_REPOSITORY": str(repo),
        "FOLDSERVE_MODELS": workload.name,
        "FOLDSERVE_PORT": str(port),
        "FOLDSERVE_INTRA_OP_THREADS": "1",
        "FOLDSERVE_INTER_OP_THREADS": "1",
        "FOLDSERVE_ACCESS_LOG": "false",
        "FOLDSERVE_LOG_LEVEL": "warning",
    }
    service = [PYTHON, "-m", "service.main"]
    naive = [PYTHON, "-m", "uvicorn", "bench.baseline_naive:app", "--port", str(port)]
    naive += ["--no-access-log", "--log-level", "warning"]
    litserve = [PYTHON, "bench/baseline_litserve.py", str(workload.onnx), workload.name, str(port)]
    chosen = [
        Server("service, batching on", service, service_env, ("json", "binary")),
        Server(
            "service, batching off",
            service,
            {**service_env, "FOLDSERVE_MAX_BATCH_SIZE": "0"},
            ("json", "binary"),
        ),
        Server("naive FastAPI", naive, {"NAIVE_MODEL": str(workload.onnx)}, ("json",)),
    ]
    if importlib.util.find_spec("litserve") is None:
        print("litserve is not installed (pip install -e '.[bench]'): skipping LitServe")
    else:
        chosen.append(Server("LitServe", litserve, {}, ("json",)))
    return chosen


@contextlib.contextmanager
def running(server: Server, port: int, workload: Workload, log: Path) -> Iterator[None]:
    """Start `server` pinned to the server core; yield once it answers an inference."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOLDSERVE_")}
    env.update(server.env)
    with log.open("ab") as sink:
        process = subprocess.Popen(
            ["taskset", "-c", SERVER_CORE, *server.command],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=sink,
            start_new_session=True,  # LitServe starts children: stop the whole group
        )
    try:
        _wait_until_it_infers(process, port, workload, log)
        yield
    finally:
        _stop(process)


def _wait_until_it_infers(
    process: subprocess.Popen[bytes], port: int, workload: Workload, log: Path
) -> None:
    url = f"http://127.0.0.1:{port}/v2/models/{workload.name}/infer"
    body = workload.json_body.read_bytes()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}; see {log}")
        with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
            request = urllib.request.Request(url, data=body, method="POST")
            request.add_header("Content-Type", "application/json")
            with urllib.request.urlopen(request, timeout=30) as response:
                outputs = json.loads(response.read())["outputs"]
                if response.status == 200 and len(outputs[0]["data"]) > 0:
                    return
        time.sleep(0.3)
    raise RuntimeError(f"server did not answer an inference within 120 s; see {log}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)  # the service drains at once on SIGINT
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def load(
    port: int, workload: Workload, payload: str, concurrency: int, args: argparse.Namespace
) -> dict[str, float]:
    body = workload.binary_body if payload == "binary" else workload.json_body
    small = workload.name == "digits"
    command = [
        "taskset",
        "-c",
        LOAD_CORE,
        PYTHON,
        str(ROOT / "bench" / "loadgen.py"),
        "--port",
        str(port),
        "--path",
        f"/v2/models/{workload.name}/infer",
        "--body",
        str(body),
        "-c",
        str(concurrency),
        "-n",
        str(args.requests if small else args.requests // 50),
        "-t",
        # ResNet at 64: a round of 64 requests takes seconds; give it several rounds.
        str(args.seconds if small else args.seconds * (2 if concurrency < 64 else 6)),
        "-w",
        str(max(concurrency * 4, 200) if small else concurrency),
    ]
    if payload == "binary":
        command += ["--header", workload.binary_header]
    else:  # FastAPI reads a pydantic body only when it is declared JSON
        command += ["--header", "Content-Type: application/json"]
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(done.stdout)


# ---------------------------------------------------------------- the run


def measure(args: argparse.Namespace, work: Path) -> tuple[dict, dict]:
    """{(model, server, payload, c): [result per repeat]}, {(model, batch): [inf/s]}."""
    repo = work / "repo"
    workloads = []
    for name in args.models:
        onnx = DIGITS_ONNX if name == "digits" else export_resnet18(work)
        target = repo / name / "1" / "model.onnx"
        target.parent.mkdir(parents=True)
        shutil.copyfile(onnx, target)
        shape = (1, 1, 8, 8) if name == "digits" else (1, 3, 224, 224)
        workloads.append(make_workload(name, target, shape, work))
    results: dict[tuple, list] = {}
    limits: dict[tuple, list] = {}
    log = work / "servers.log"
    for repeat in range(args.repeat):
        for w in workloads:
            for batch in CONCURRENCY:
                rate = ort_limit(w.onnx, w.shape, batch, args.seconds / 2)
                limits.setdefault((w.name, batch), []).append(rate)
            for server in servers(w, repo, args.port):
                with running(server, args.port, w, log):
                    for payload in server.payloads:
                        for c in CONCURRENCY:
                            r = load(args.port, w, payload, c, args)
                            results.setdefault((w.name, server.label, payload, c), []).append(r)
                            print(
                                f"[{repeat + 1}/{args.repeat}] {w.name:8} {server.label:22} "
                                f"{payload:6} c={c:<3} {r['rps']:>9.1f} req/s p50 "
                                f"{r['p50_ms']:.3f} ms p99 {r['p99_ms']:.3f} ms "
                                f"errors {r['errors']}",
                                flush=True,
                            )
    return results, limits


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs) or float("nan")  # nan: nothing counted


def report(results: dict, limits: dict, args: argparse.Namespace) -> None:
    print(f"\n# bench/serve.py, {datetime.date.today()}, medians of {args.repeat} repeat(s)")
    print("| model | server | payload | c | req/s | p50 ms | p90 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (model, batch), rates in sorted(limits.items()):
        print(
            f"| {model} | (a) ORT in-process, 1 thread | batch {batch} | – | "
            f"{statistics.median(rates):,.1f} inf/s | | | | |"
        )
    for (model, label, payload, c), runs in results.items():
        errors = sum(r["errors"] for r in runs)
        print(
            f"| {model} | {label} | {payload} | {c} | {median(runs, 'rps'):,.1f} | "
            f"{median(runs, 'p50_ms'):.3f} | {median(runs, 'p90_ms'):.3f} | "
            f"{median(runs, 'p99_ms'):.3f} | {errors} |"
        )
    print("\n## ratios (service with batching on; throughput unless said)")
    for model in args.models:
        for c in CONCURRENCY:
            ours = results.get((model, "service, batching on", "json", c))
            naive = results.get((model, "naive FastAPI", "json", c))
            lit = results.get((model, "LitServe", "json", c))
            binary = results.get((model, "service, batching on", "binary", c))
            limit = statistics.median(limits[(model, c)])
            parts = [f"{model} c={c}:"]
            if ours and naive:
                parts.append(f"service/naive {median(ours, 'rps') / median(naive, 'rps'):.2f}×")
                parts.append(
                    f"p50 service/naive {median(ours, 'p50_ms') / median(naive, 'p50_ms'):.2f}"
                )
                parts.append(
                    f"p99 service {median(ours, 'p99_ms'):.1f} vs naive "
                    f"{median(naive, 'p99_ms'):.1f} ms"
                )
            if ours and lit:
                parts.append(f"service/LitServe {median(ours, 'rps') / median(lit, 'rps'):.2f}×")
                parts.append(f"(LitServe p99 {median(lit, 'p99_ms'):.1f} ms)")
            if binary:
                parts.append(f"binary service/limit(batch {c}) {median(binary, 'rps') / limit:.2f}")
            print(" ".join(parts))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,resnet18", type=lambda s: s.split(","))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="per load run (×2 ResNet)")
    parser.add_argument("--requests", type=int, default=30_000, help="per load run (÷50 ResNet)")
    parser.add_argument("--port", type=int, default=8123)
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        parser.error("needs two cores: one for the server, one for the load generator")
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as folder:
        results, limits = measure(args, Path(folder))
        report(results, limits, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
