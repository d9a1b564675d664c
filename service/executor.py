"""Running a validated request on a model version, and accounting for it.

`Executor.run` takes a validated request's feeds and returns its outputs. For a version whose
`BatchPolicy` is enabled, the request goes through the version's dynamic batcher
(`service/batching.py`) and may share an ONNX Runtime call with other requests; otherwise, and
for a request larger than the largest batch, it runs on its own. A call runs inline on the event
loop when the warm-up measured the model at a few microseconds (a thread handoff would cost more),
else in a worker thread so the loop keeps serving.

`Executor.admit` is the door: it takes a request in, or refuses it with 503 and Retry-After
before its body is read, when the version already has `max_queue_size` requests waiting. Under
overload a refusal must cost as little as possible, or the event loop spends its time reading and
parsing requests it will refuse while the admitted ones wait behind that work.

`Executor.track` wraps a whole request (validation, run, encoding) and records it as a success
or a failure with Triton's reasons, in the statistics behind /stats and /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.batching import Batcher
from service.errors import (
    BadRequestError,
    ClientGoneError,
    InferenceFailedError,
    ModelNotReadyError,
    QueueFullError,
    ServiceError,
)
from service.metrics import Metrics
from service.runtime import ModelVersion
from service.stats import BACKEND, CANCELED, OTHER, REJECTED, StatsBook

# ASGI `receive`: after the body, it returns only when the client disconnects (or we answered).
Disconnect = Callable[[], Awaitable[Any]]
_REASONS: dict[type[ServiceError], str] = {
    InferenceFailedError: BACKEND,
    QueueFullError: REJECTED,
    ClientGoneError: CANCELED,
}


@dataclass
class Tracking:
    """What one request learns while it runs: how long it waited before executing."""

    queue_ns: int = 0


class Executor:
    def __init__(self, stats: StatsBook, metrics: Metrics) -> None:
        self.stats = stats
        self.metrics = metrics

    @contextlib.contextmanager
    def admit(self, model: ModelVersion) -> Iterator[None]:
        """Count the request enclosed as pending, or raise `QueueFullError` at once when the
        version has `max_queue_size` requests waiting: for a version that batches, those being
        received or queued for its batcher (and, so that requests too large to batch cannot
        pile up beside it, no more than a queue and a batch in flight in all); for one that
        does not, every request in flight."""
        record = self.stats.of(model.name, model.version)
        limit = model.batching.max_queue_size
        batcher = self._batcher(model)
        if batcher is None:
            waiting = record.pending
            full = waiting >= limit
        else:
            waiting = batcher.queue.waiting
            full = waiting >= limit or record.pending >= limit + batcher.policy.max_batch_size
        if full:
            record.record_failure(0, REJECTED)
            raise QueueFullError(
                f"model {model.name!r} version {model.version} has {waiting} requests waiting "
                f"(max_queue_size {limit}); retry shortly"
            )
        record.pending += 1
        try:
            yield
        finally:
            record.pending -= 1

    @contextlib.contextmanager
    def track(self, model: ModelVersion) -> Iterator[Tracking]:
        """Record the request enclosed as a success or a failure (admitted by `admit`)."""
        record = self.stats.of(model.name, model.version)
        start = time.perf_counter_ns()
        tracking = Tracking()
        try:
            yield tracking
        except ServiceError as exc:
            record.record_failure(time.perf_counter_ns() - start, _reason(exc))
            raise
        except BaseException:
            record.record_failure(time.perf_counter_ns() - start, OTHER)
            raise
        else:
            elapsed = time.perf_counter_ns() - start
            record.record_success(elapsed, tracking.queue_ns)
            self.metrics.observe_request(model.name, model.version, elapsed / 1e9)

    def expecting(self, model: ModelVersion) -> contextlib.AbstractContextManager[None]:
        """Enclose the reading of a request's body: the batcher waits for such requests."""
        batcher = self._batcher(model)
        return batcher.queue.expecting() if batcher else contextlib.nullcontext()

    async def run(
        self,
        model: ModelVersion,
        feeds: dict[str, np.ndarray],
        output_names: Sequence[str],
        batch_size: int,
        tracking: Tracking | None = None,
        disconnect: Disconnect | None = None,
    ) -> dict[str, np.ndarray]:
        """The request's outputs (at least `output_names`). `disconnect`, when given, lets a
        request whose client goes away while it waits be dropped before it runs."""
        batcher = self._batcher(model)
        if batcher is not None and batch_size <= batcher.policy.max_batch_size:
            outputs, queue_ns = await batcher.submit(feeds, batch_size, disconnect)
        else:
            submitted = time.perf_counter_ns()
            outputs, started = await self._execute(model, feeds, output_names, batch_size)
            queue_ns = max(0, started - submitted)
        if tracking is not None:
            tracking.queue_ns = queue_ns
        return outputs

    def _batcher(self, model: ModelVersion) -> Batcher | None:
        """The version's batcher, made on first use and remade when its policy changed (a
        reload with a new config.json); requests queued on the old one still drain."""
        policy = model.batching
        if not policy.enabled:
            return None
        batcher = model.batcher
        if batcher is None or batcher.policy != policy:
            # A weak reference: the batcher lives on the version, and must not keep it alive.
            execute = functools.partial(self._execute_batch, weakref.ref(model))
            batcher = model.batcher = Batcher(policy, execute, inline=model.inline)
        return batcher

    async def _execute_batch(
        self, ref: weakref.ref[ModelVersion], feeds: dict[str, np.ndarray], rows: int
    ) -> tuple[dict[str, np.ndarray], int]:
        model = ref()
        if model is None:  # cannot happen while a request holds it; be explicit all the same
            raise ModelNotReadyError("the model version was unloaded")
        return await self._execute(model, feeds, model.output_names, rows)

    async def _execute(
        self,
        model: ModelVersion,
        feeds: dict[str, np.ndarray],
        output_names: Sequence[str],
        rows: int,
    ) -> tuple[dict[str, np.ndarray], int]:
        """One ONNX Runtime call; returns the outputs and when it started (perf_counter_ns)."""
        try:
            if model.inline:
                outputs, timings = model.run(feeds, output_names)
            else:
                outputs, timings = await asyncio.to_thread(model.run, feeds, output_names)
        except ServiceError:
            raise
        except Exception as exc:
            raise _backend_error(model, exc) from None
        self.stats.of(model.name, model.version).record_execution(rows, timings)
        return outputs, timings.start_ns


def _reason(exc: ServiceError) -> str:
    """Triton's failure reason for `exc`: that of the nearest class of its ancestry listed."""
    return next((_REASONS[c] for c in type(exc).__mro__ if c in _REASONS), OTHER)


def _backend_error(model: ModelVersion, exc: Exception) -> ServiceError:
    """ONNX Runtime refused inputs that passed validation (a value-dependent check in the
    graph, such as a Reshape): the client can do nothing else, so it is the model's error."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:500]
    if "INVALID_ARGUMENT" in text:
        return BadRequestError(
            f"model {model.name!r} version {model.version} rejected the inputs: {text}"
        )
    return InferenceFailedError(
        f"internal error: model {model.name!r} version {model.version} failed to run; the "
        "server log has the details",
        detail=text,
    )
