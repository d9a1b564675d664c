"""Per model-version inference statistics: the one record behind `/stats` and `/metrics`.

Counts and cumulative durations follow Triton's statistics extension (`$duration_stat` is a
count and nanoseconds) so `tritonclient` and `perf_analyzer` read them unchanged; the Prometheus
collector in `metrics.py` renders the same numbers under Triton's metric names. Everything here
is updated from the event loop only, so no lock is needed.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from service.runtime import RunTimings

# Triton's failure reasons (nv_inference_request_failure{reason=...}).
REJECTED, CANCELED, BACKEND, OTHER = "REJECTED", "CANCELED", "BACKEND", "OTHER"


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += max(0, ns)

    def to_json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class VersionStats:
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchStats] = field(default_factory=dict)
    failures: Counter[str] = field(default_factory=Counter)
    pending: int = 0

    def record_execution(self, batch_size: int, timings: RunTimings) -> None:
        """One model execution serving `batch_size` inferences (a batcher may merge requests)."""
        self.execution_count += 1
        self.inference_count += batch_size
        self.compute_input.add(timings.input_ns)
        self.compute_infer.add(timings.infer_ns)
        self.compute_output.add(timings.output_ns)
        batch = self.batches.setdefault(batch_size, BatchStats())
        batch.compute_input.add(timings.input_ns)
        batch.compute_infer.add(timings.infer_ns)
        batch.compute_output.add(timings.output_ns)

    def record_success(self, total_ns: int, queue_ns: int) -> None:
        self.success.add(total_ns)
        self.queue.add(queue_ns)
        self.last_inference_ms = int(time.time() * 1000)

    def record_failure(self, total_ns: int, reason: str) -> None:
        self.fail.add(total_ns)
        self.failures[reason] += 1
        self.last_inference_ms = int(time.time() * 1000)

    def to_triton(self, name: str, version: int) -> dict[str, Any]:
        return {
            "name": name,
            "version": str(version),
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.to_json(),
                "fail": self.fail.to_json(),
                "queue": self.queue.to_json(),
                "compute_input": self.compute_input.to_json(),
                "compute_infer": self.compute_infer.to_json(),
                "compute_output": self.compute_output.to_json(),
                "cache_hit": Duration().to_json(),
                "cache_miss": Duration().to_json(),
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": b.compute_input.to_json(),
                    "compute_infer": b.compute_infer.to_json(),
                    "compute_output": b.compute_output.to_json(),
                }
                for size, b in sorted(self.batches.items())
            ],
        }


class StatsBook:
    """All versions' statistics since start-up; a reloaded version keeps counting on."""

    def __init__(self) -> None:
        self._by_version: dict[tuple[str, int], VersionStats] = {}

    def of(self, name: str, version: int) -> VersionStats:
        key = (name, version)
        if key not in self._by_version:
            self._by_version[key] = VersionStats()
        return self._by_version[key]

    def items(self) -> list[tuple[tuple[str, int], VersionStats]]:
        return sorted(self._by_version.items())
