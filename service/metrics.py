"""`/metrics` in Prometheus text format, under Triton's metric names so its dashboards work.

The nv_* families are rendered at scrape time from the `StatsBook` (the record behind /stats),
so the two never disagree, and written out here with Triton's exact names: prometheus_client
appends `_total` to every counter, which Triton's names lack. Latency histograms, which Triton
does not name the same way, are ordinary prometheus_client histograms under `foldserve_*`.
Each app has its own registry, so tests can build several apps in one process.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from service.stats import StatsBook, VersionStats
from service.worker_metrics import SharedMetrics, multiprocess_dir

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1,
    5,
)

# (name, type, help, value of one version's stats)
_FAMILIES: list[tuple[str, str, str, Callable[[VersionStats], int]]] = [
    (
        "nv_inference_request_success",
        "counter",
        "Number of successful inference requests, all batch sizes",
        lambda s: s.success.count,
    ),
    (
        "nv_inference_count",
        "counter",
        "Number of inferences performed (a batch of n counts n)",
        lambda s: s.inference_count,
    ),
    (
        "nv_inference_exec_count",
        "counter",
        "Number of model executions performed",
        lambda s: s.execution_count,
    ),
    (
        "nv_inference_request_duration_us",
        "counter",
        "Cumulative inference request duration in microseconds",
        lambda s: (s.success.ns + s.fail.ns) // 1000,
    ),
    (
        "nv_inference_queue_duration_us",
        "counter",
        "Cumulative inference queuing duration in microseconds",
        lambda s: s.queue.ns // 1000,
    ),
    (
        "nv_inference_compute_input_duration_us",
        "counter",
        "Cumulative compute input duration in microseconds",
        lambda s: s.compute_input.ns // 1000,
    ),
    (
        "nv_inference_compute_infer_duration_us",
        "counter",
        "Cumulative compute inference duration in microseconds",
        lambda s: s.compute_infer.ns // 1000,
    ),
    (
        "nv_inference_compute_output_duration_us",
        "counter",
        "Cumulative compute output duration in microseconds",
        lambda s: s.compute_output.ns // 1000,
    ),
    (
        "nv_inference_pending_request_count",
        "gauge",
        "Instantaneous number of pending requests per model",
        lambda s: s.pending,
    ),
]
_FAILURE_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")


def _label_text(labels: dict[str, str]) -> str:
    escaped = (
        (k, v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"'))
        for k, v in labels.items()
    )
    return ",".join(f'{k}="{v}"' for k, v in escaped)


def render_triton(stats: StatsBook) -> str:
    """The nv_inference_* families in the Prometheus text format, with Triton's exact names."""
    items = stats.items()
    lines: list[str] = []
    for name, kind, doc, value in _FAMILIES:
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]
        for (model, version), record in items:
            labels = _label_text({"model": model, "version": str(version)})
            lines.append(f"{name}{{{labels}}} {value(record)}")
    name = "nv_inference_request_failure"
    lines += [f"# HELP {name} Number of failed inference requests", f"# TYPE {name} counter"]
    for (model, version), record in items:
        for reason in _FAILURE_REASONS:
            labels = _label_text({"model": model, "version": str(version), "reason": reason})
            lines.append(f"{name}{{{labels}}} {record.failures[reason]}")
    return "\n".join(lines) + "\n"


class Metrics:
    def __init__(self, stats: StatsBook) -> None:
        self._stats = stats
        self.registry = CollectorRegistry(auto_describe=True)
        # Several worker processes: /metrics adds them all up (service.worker_metrics).
        shared_dir = multiprocess_dir()
        self.shared = (
            SharedMetrics(lambda: render_triton(self._stats), shared_dir) if shared_dir else None
        )
        self._request_seconds = Histogram(
            "foldserve_inference_request_duration_seconds",
            "Successful inference request latency, from the body read to the response built",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._http_seconds = Histogram(
            "foldserve_http_request_duration_seconds",
            "HTTP request latency by route template and status",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

        # Label children by their label values: `labels()` validates and locks on every call,
        # a cost per request; the label sets are few (route templates, not paths).
        self._request_children: dict[tuple[str, int], Histogram] = {}
        self._http_children: dict[tuple[str, str, int], Histogram] = {}

    def observe_request(self, model: str, version: int, seconds: float) -> None:
        key = (model, version)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self._request_seconds.labels(model, str(version))
        child.observe(seconds)

    def observe_http(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        child = self._http_children.get(key)
        if child is None:
            child = self._http_children[key] = self._http_seconds.labels(method, route, str(status))
        child.observe(seconds)

    def render(self) -> bytes:
        if self.shared is not None:
            return self.shared.render()
        return render_triton(self._stats).encode() + generate_latest(self.registry)
