"""A version's live counters for its page: requests, errors, batch size and latency percentiles.

Read from the same records /stats and /metrics render (the `StatsBook` and the latency
histogram in the app's Prometheus registry), never kept separately, so the page cannot disagree
with a scrape of this process. With several worker processes each page shows the counts of the
process that answered it; /metrics adds them all up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from prometheus_client import CollectorRegistry

from service.stats import StatsBook

LATENCY_HISTOGRAM = "foldserve_inference_request_duration_seconds"
QUANTILES = (0.5, 0.9, 0.99)


@dataclass(frozen=True)
class Counters:
    requests: int  # successful inference requests
    errors: int
    inferences: int  # items inferred; a batch of n counts n
    executions: int  # model runs; a dynamic batcher merges requests into fewer
    average_batch: float | None
    latency_ms: dict[str, float | None]  # "p50" → milliseconds, None before any request

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def display(self) -> dict[str, str]:
        """Each counter as the page shows it; the script refreshes the page from this too."""
        shown = {
            "requests": f"{self.requests:,}",
            "errors": f"{self.errors:,}",
            "inferences": f"{self.inferences:,}",
            "executions": f"{self.executions:,}",
            "average_batch": "—" if self.average_batch is None else f"{self.average_batch:.2f}",
        }
        for key, ms in self.latency_ms.items():
            shown[key] = "—" if ms is None else f"{ms:.3g} ms"
        return shown


def read_counters(
    stats: StatsBook, registry: CollectorRegistry, name: str, version: int
) -> Counters:
    """The counters of one version; all zero when it has not served yet."""
    record = dict(stats.items()).get((name, version))  # `of` would create an empty record
    buckets = latency_buckets(registry, name, version)
    latency = {f"p{round(q * 100)}": _ms(histogram_quantile(q, buckets)) for q in QUANTILES}
    if record is None:
        return Counters(0, 0, 0, 0, None, latency)
    executions = record.execution_count
    return Counters(
        requests=record.success.count,
        errors=record.fail.count,
        inferences=record.inference_count,
        executions=executions,
        average_batch=record.inference_count / executions if executions else None,
        latency_ms=latency,
    )


def latency_buckets(
    registry: CollectorRegistry, name: str, version: int
) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of the version's latency histogram, ascending."""
    wanted = {"model": name, "version": str(version)}
    buckets = [
        (float(sample.labels["le"]), sample.value)
        for family in registry.collect()
        if family.name == LATENCY_HISTOGRAM
        for sample in family.samples
        if sample.name == LATENCY_HISTOGRAM + "_bucket"
        and all(sample.labels.get(k) == v for k, v in wanted.items())
    ]
    return sorted(buckets)


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus's `histogram_quantile`: linear interpolation inside the bucket holding q.

    An estimate within one bucket's width, which is what a histogram can tell; a quantile that
    falls in the +Inf bucket is reported as the largest finite bound. None without observations.
    """
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(upper):
                return lower
            inside = cumulative - below
            return lower + (upper - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = upper, cumulative
    return lower


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0
