"""One ONNX Runtime session per loaded model version: load, describe, warm up, run.

Inputs and outputs go through IOBinding on every provider, the CPU included, so the path the
GPU takes is the path the tests take (a model replaying a CUDA graph binds fixed GPU buffers
instead: `service/cuda_graph.py`). A session is safe to run from several threads at once; each
call makes its own binding. Provider options (cuDNN algorithm search, the CUDA memory arena,
TensorRT's fp16 and engine cache) come from the settings, through `RuntimeOptions`. Loading
checks the graph before ONNX Runtime sees it (no BatchNormalization in training mode), reads the
foldserve metadata the exporter wrote, and warms the session up with zeros, timing it: that
measurement decides whether calls run inline on the event loop or in a worker thread.
"""

from __future__ import annotations

import functools
import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from foldserve.model_metadata import PREFIX, MetadataError, ModelMetadata
from service import cuda_graph, datatypes
from service.batching import Batcher, BatchPolicy
from service.datatypes import Datatype
from service.errors import OnnxWireError, SettingsError, VersionLoadError
from service.onnx_scan import check_inference_mode
from service.settings import Settings

logger = logging.getLogger(__name__)

SHORT_PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


@dataclass(frozen=True)
class RuntimeOptions:
    providers: tuple[str, ...]
    device_id: int = 0
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    warmup_runs: int = 3
    inline_max_us: float = 200.0
    max_batch_size: int = 0
    max_queue_delay_us: int = 0
    max_queue_size: int = 1024
    cuda_conv_algo_search: str = "HEURISTIC"
    cuda_arena_extend_strategy: str = "kNextPowerOfTwo"
    cuda_mem_limit_mib: int = 0
    cuda_tf32: bool = True
    cuda_graphs: bool = False
    tensorrt_fp16: bool = False
    tensorrt_cache_dir: Path | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> RuntimeOptions:
        return cls(
            providers=resolve_providers(settings.providers, ort.get_available_providers()),
            device_id=settings.device_id,
            cuda_conv_algo_search=settings.cuda_conv_algo_search,
            cuda_arena_extend_strategy=settings.cuda_arena_extend_strategy,
            cuda_mem_limit_mib=settings.cuda_mem_limit_mib,
            cuda_tf32=settings.cuda_tf32,
            cuda_graphs=settings.cuda_graphs,
            tensorrt_fp16=settings.tensorrt_fp16,
            tensorrt_cache_dir=settings.tensorrt_cache_dir,
            intra_op_threads=settings.intra_op_threads,
            inter_op_threads=settings.inter_op_threads,
            warmup_runs=settings.warmup_runs,
            inline_max_us=settings.inline_max_us,
            max_batch_size=settings.max_batch_size,
            max_queue_delay_us=settings.max_queue_delay_us,
            max_queue_size=settings.max_queue_size,
        )

    def batch_policy(
        self,
        batched_model: bool,
        max_batch_size: int | None = None,
        max_queue_delay_us: int | None = None,
        dynamic_batching: bool | None = None,
    ) -> BatchPolicy:
        """The batcher's policy for one model: its config.json's knobs over the settings'."""
        return BatchPolicy.resolve(
            batched_model,
            max_batch_size=self.max_batch_size if max_batch_size is None else max_batch_size,
            max_queue_delay_us=(
                self.max_queue_delay_us if max_queue_delay_us is None else max_queue_delay_us
            ),
            max_queue_size=self.max_queue_size,
            dynamic_batching=dynamic_batching,
        )

    def provider_list(self, cuda_graph: bool = False) -> list[tuple[str, dict[str, str]]]:
        """The providers with their options, as `InferenceSession` takes them (strings, which
        every ONNX Runtime version parses). `cuda_graph` asks CUDA to capture a graph: only
        for a model whose shapes are all fixed (`load_version` decides)."""
        return [(p, self._provider_options(p, cuda_graph)) for p in self.providers]

    def _provider_options(self, provider: str, cuda_graph: bool) -> dict[str, str]:
        if provider == "CUDAExecutionProvider":
            options = {
                "device_id": str(self.device_id),
                "cudnn_conv_algo_search": self.cuda_conv_algo_search,
                "arena_extend_strategy": self.cuda_arena_extend_strategy,
            }
            if self.cuda_mem_limit_mib:
                options["gpu_mem_limit"] = str(self.cuda_mem_limit_mib * (1 << 20))
            if not self.cuda_tf32:  # named only when off: ONNX Runtime's default is on
                options["use_tf32"] = "0"
            if cuda_graph:
                options["enable_cuda_graph"] = "1"
            return options
        if provider == "TensorrtExecutionProvider":
            options = {
                "device_id": str(self.device_id),
                "trt_fp16_enable": "True" if self.tensorrt_fp16 else "False",
            }
            if self.tensorrt_cache_dir is not None:
                options["trt_engine_cache_enable"] = "True"
                options["trt_engine_cache_path"] = str(self.tensorrt_cache_dir)
            return options
        return {}


def resolve_providers(requested: Sequence[str], available: Sequence[str]) -> tuple[str, ...]:
    """'auto' → CUDA then CPU when CUDA is offered, else CPU; explicit names must be offered."""
    if tuple(requested) == ("auto",):
        if "CUDAExecutionProvider" in available:
            return ("CUDAExecutionProvider", "CPUExecutionProvider")
        return ("CPUExecutionProvider",)
    names = tuple(SHORT_PROVIDER_NAMES.get(p.lower(), p) for p in requested)
    missing = [n for n in names if n not in available]
    if missing:
        raise SettingsError(
            f"invalid setting providers (FOLDSERVE_PROVIDERS): {', '.join(missing)} not offered "
            f"by this ONNX Runtime (it offers {', '.join(available)}; or use 'auto')"
        )
    return names


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as the v2 metadata describes it (-1 for a dynamic dim)."""

    name: str
    datatype: Datatype
    shape: tuple[int, ...]

    @property
    def numpy_dtype(self) -> np.dtype:
        return self.datatype.dtype

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype.name, "shape": list(self.shape)}


@dataclass(frozen=True)
class RunTimings:
    """Nanoseconds spent binding inputs, running the graph, and copying outputs back."""

    start_ns: int  # perf_counter_ns when the call began (in its thread)
    input_ns: int
    infer_ns: int
    output_ns: int


@dataclass(eq=False)
class ModelVersion:
    """A loaded, warmed-up version; dropped when no request holds it.

    The session and specs never change once built. `batching` is set by the manager from the
    model's configuration (a reload may change it); `batcher` is the executor's, made on first
    use, and lives and dies with the version.
    """

    name: str
    version: int
    path: Path
    session: ort.InferenceSession
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    metadata: ModelMetadata | None
    stamp: tuple[int, int]  # (mtime_ns, size) of the file, to notice a replaced model
    warmup_us: float = 0.0
    inline_max_us: float = 0.0
    loaded_at: float = field(default_factory=time.time)
    batching: BatchPolicy = field(default_factory=BatchPolicy)
    batcher: Batcher | None = field(default=None, repr=False)
    graph: cuda_graph.CudaGraph | None = field(
        default=None, repr=False
    )  # set when a CUDA graph replays

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    @property
    def provider_options(self) -> dict[str, dict[str, str]]:
        return dict(self.session.get_provider_options())

    @property
    def batched(self) -> bool:
        """Every input and output has a dynamic first dimension: the batch."""
        specs = self.inputs + self.outputs
        return all(len(s.shape) > 0 and s.shape[0] == -1 for s in specs)

    @functools.cached_property
    def has_strings(self) -> bool:
        """String tensors, which IOBinding cannot bind: such a model runs through `run`."""
        return any(s.datatype is datatypes.BYTES for s in self.inputs + self.outputs)

    @property
    def inline(self) -> bool:
        return self.warmup_us <= self.inline_max_us

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def input(self, name: str) -> TensorSpec | None:
        return next((s for s in self.inputs if s.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((s for s in self.outputs if s.name == name), None)

    def run(
        self, feeds: dict[str, np.ndarray], output_names: Sequence[str]
    ) -> tuple[dict[str, np.ndarray], RunTimings]:
        """Run through IOBinding; string tensors, which IOBinding cannot bind, use `run`; a
        CUDA graph replays on its fixed buffers."""
        t0 = time.perf_counter_ns()
        if self.graph is not None:
            t1 = time.perf_counter_ns()
            outputs = self.graph.run(feeds, output_names)
            t2 = t3 = time.perf_counter_ns()
            return outputs, RunTimings(t0, t1 - t0, t2 - t1, t3 - t2)
        if self.has_strings:
            t1 = time.perf_counter_ns()
            values = self.session.run(list(output_names), feeds)
            t2 = t3 = time.perf_counter_ns()
        else:
            binding = self.session.io_binding()
            for name, array in feeds.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(array))
            for name in output_names:
                binding.bind_output(name)
            t1 = time.perf_counter_ns()
            self.session.run_with_iobinding(binding)
            t2 = time.perf_counter_ns()
            values = binding.copy_outputs_to_cpu()
            t3 = time.perf_counter_ns()
        outputs = {n: np.asarray(v) for n, v in zip(output_names, values, strict=True)}
        return outputs, RunTimings(t0, t1 - t0, t2 - t1, t3 - t2)

    def warm_up(self, runs: int) -> float:
        """Run zeros through the model; returns the median of `runs` timed calls, in µs."""
        feeds = {s.name: _zeros(s) for s in self.inputs}
        names = [s.name for s in self.outputs]
        self.run(feeds, names)  # the first call allocates and plans: not what later calls cost
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            self.run(feeds, names)
            times.append((time.perf_counter() - start) * 1e6)
        return statistics.median(times)


def _zeros(spec: TensorSpec) -> np.ndarray:
    shape = tuple(1 if d < 0 else d for d in spec.shape)
    if spec.datatype is datatypes.BYTES:
        return np.full(shape, "", dtype=object)
    return np.zeros(shape, dtype=spec.datatype.dtype)


def _specs(args: Sequence[Any]) -> tuple[TensorSpec, ...]:
    specs = []
    for arg in args:
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
        specs.append(TensorSpec(arg.name, datatypes.from_onnx(arg.type), shape))
    return tuple(specs)


def read_metadata(session: ort.InferenceSession) -> ModelMetadata | None:
    """The exporter's metadata, None for a model that has none (served, but without labels)."""
    props = dict(session.get_modelmeta().custom_metadata_map)
    if not any(k.startswith(PREFIX) for k in props):
        return None
    return ModelMetadata.from_props(props)


def _check_metadata(meta: ModelMetadata | None, version: ModelVersion) -> None:
    if meta is None:
        return
    if version.input(meta.input.name) is None:
        raise VersionLoadError(
            f"the metadata names input {meta.input.name!r}, which the graph lacks"
        )
    if version.output(meta.output.name) is None:
        raise VersionLoadError(
            f"the metadata names output {meta.output.name!r}, which the graph lacks"
        )


def _session(path: Path, options: RuntimeOptions, cuda_graph: bool = False) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = options.inter_op_threads
    so.log_severity_level = 3  # ORT's own warnings go to stderr unstructured; keep errors only
    providers = options.provider_list(cuda_graph)
    return ort.InferenceSession(str(path), sess_options=so, providers=providers)


def _with_cuda_graph(version: ModelVersion, options: RuntimeOptions) -> None:
    """With `cuda_graphs` on, give a fixed-shape version running on CUDA a session that
    captures a graph (the shapes are known only once a first session has read the file)."""
    if not options.cuda_graphs or version.providers[0] != "CUDAExecutionProvider":
        return
    if not cuda_graph.qualifies(version.inputs + version.outputs):
        logger.info("model %s: dynamic or string shapes, so no CUDA graph", version.name)
        return
    try:
        session = _session(version.path, options, cuda_graph=True)
        graph = cuda_graph.CudaGraph(session, version.inputs, version.outputs, options.device_id)
        graph.run({s.name: _zeros(s) for s in version.inputs}, version.output_names)  # capture
    except Exception as exc:  # e.g. a node ONNX Runtime places on the CPU: no graph can hold it
        logger.warning(
            "model %s: no CUDA graph (%s); serving it without one", version.name, _first_line(exc)
        )
        return
    version.session, version.graph = session, graph


def load_version(name: str, version: int, path: Path, options: RuntimeOptions) -> ModelVersion:
    """Check, load and warm up one version; `VersionLoadError` with the reason when it cannot
    serve.

    Blocking (seconds for a large model): call it from a worker thread.
    """
    try:
        stat = path.stat()
        check_inference_mode(path)
        session = _session(path, options)
        loaded = ModelVersion(
            name=name,
            version=version,
            path=path,
            session=session,
            inputs=_specs(session.get_inputs()),
            outputs=_specs(session.get_outputs()),
            metadata=read_metadata(session),
            stamp=(stat.st_mtime_ns, stat.st_size),
            inline_max_us=options.inline_max_us,
        )
        _check_metadata(loaded.metadata, loaded)
        _with_cuda_graph(loaded, options)
        loaded.warmup_us = loaded.warm_up(options.warmup_runs)  # a graph is captured here
    except VersionLoadError:
        raise
    except OnnxWireError as exc:
        raise VersionLoadError(f"{path} is not a valid ONNX file ({exc})") from None
    except (OSError, ValueError, MetadataError) as exc:
        raise VersionLoadError(str(exc)) from None
    except Exception as exc:  # ONNX Runtime raises its own classes, with useful messages
        raise VersionLoadError(
            f"ONNX Runtime could not load or run it: {_first_line(exc)}"
        ) from None
    return loaded


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:500]
