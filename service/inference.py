"""Running a validated request on a model version, and accounting for it.

`Executor.run` is the seam where the dynamic batcher (issue 6) slots in: it takes a validated
request's feeds and returns its outputs, and whether they ran alone or merged with others is its
business. Today each request runs on its own, inline on the event loop when the warm-up measured
the model at a few microseconds (a thread handoff would cost more), else in a worker thread so
the loop keeps serving.

`Executor.track` wraps a whole request (validation, run, encoding) and records it as a success
or a failure with Triton's reasons, in the statistics behind /stats and /metrics.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from service.errors import BadRequestError, InferenceFailedError, ServiceError
from service.metrics import Metrics
from service.runtime import ModelVersion
from service.stats import BACKEND, OTHER, StatsBook


@dataclass
class Tracking:
    """What one request learns while it runs: how long it waited before executing."""

    queue_ns: int = 0


class Executor:
    def __init__(self, stats: StatsBook, metrics: Metrics) -> None:
        self.stats = stats
        self.metrics = metrics

    @contextmanager
    def track(self, model: ModelVersion) -> Iterator[Tracking]:
        """Count the request enclosed as pending, then as a success or failure."""
        record = self.stats.of(model.name, model.version)
        record.pending += 1
        start = time.perf_counter_ns()
        tracking = Tracking()
        try:
            yield tracking
        except ServiceError as exc:
            reason = BACKEND if isinstance(exc, InferenceFailedError) else OTHER
            record.record_failure(time.perf_counter_ns() - start, reason)
            raise
        except BaseException:
            record.record_failure(time.perf_counter_ns() - start, OTHER)
            raise
        else:
            elapsed = time.perf_counter_ns() - start
            record.record_success(elapsed, tracking.queue_ns)
            self.metrics.observe_request(model.name, model.version, elapsed / 1e9)
        finally:
            record.pending -= 1

    async def run(
        self,
        model: ModelVersion,
        feeds: dict[str, np.ndarray],
        output_names: Sequence[str],
        batch_size: int,
        tracking: Tracking | None = None,
    ) -> dict[str, np.ndarray]:
        submitted = time.perf_counter_ns()
        try:
            if model.inline:
                outputs, timings = model.run(feeds, output_names)
            else:
                outputs, timings = await asyncio.to_thread(model.run, feeds, output_names)
        except ServiceError:
            raise
        except Exception as exc:
            raise _backend_error(model, exc) from None
        if tracking is not None:
            tracking.queue_ns = max(0, timings.start_ns - submitted)
        self.stats.of(model.name, model.version).record_execution(batch_size, timings)
        return outputs


def _backend_error(model: ModelVersion, exc: Exception) -> ServiceError:
    """ONNX Runtime refused inputs that passed validation (a value-dependent check in the
    graph, such as a Reshape): the client can do nothing else, so it is the model's error."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:500]
    if "INVALID_ARGUMENT" in text:
        return BadRequestError(
            f"model {model.name!r} version {model.version} rejected the inputs: {text}"
        )
    return InferenceFailedError(f"model {model.name!r} version {model.version} failed: {text}")
