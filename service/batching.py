"""The dynamic batcher: concurrent requests to one model version merged into one ONNX Runtime call.

Three layers, so the policy is testable without HTTP, threads or timing:

- `BatchPolicy`: the knobs in force for a version (settings, overridden by the model's
  config.json), and whether it batches at all: only models whose every input and output has a
  dynamic first dimension do.
- `collect(queue, max_batch_size, max_delay, clock)`: forms one batch from a `RequestQueue`, as
  LitServe's `collate_requests` does, with the clock and the queue as arguments so tests drive
  deadlines with a fake clock and a scripted queue, never sleeping.
- `Batcher`: per version, a bounded queue and a drain task that runs only while there is work
  (no task outlives the traffic, so an unloaded version is not kept alive by its batcher); for
  a model that runs inline, the request that finds it idle runs the batch itself, sparing the
  task hop that would cost as much as the model.

When to stop waiting: a batch leaves at once unless more requests for the same version are on
their way (their bodies are still being read), and then at the latest `max_delay` after its first
request was taken. A lone request therefore never pays a timeout; under load, requests queue
while the previous batch runs and the next batch takes them all. Only requests whose inputs
agree on names, dtypes and every dimension after the first share a call, and each request was
validated before it was queued, so a malformed neighbour cannot fail it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from service.errors import ClientGoneError, QueueFullError, ServiceError

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
Outputs = dict[str, np.ndarray]
# Runs merged feeds with `rows` rows; returns the outputs and when execution started (ns).
Execute = Callable[[dict[str, np.ndarray], int], Awaitable[tuple[Outputs, int]]]


@dataclass(frozen=True)
class BatchPolicy:
    """The batcher's knobs for one version; `max_batch_size` 0 means it is never batched."""

    max_batch_size: int = 0
    max_queue_delay_us: int = 0
    max_queue_size: int = 1024

    @property
    def enabled(self) -> bool:
        return self.max_batch_size > 1

    @classmethod
    def resolve(
        cls,
        batched_model: bool,
        *,
        max_batch_size: int,
        max_queue_delay_us: int,
        max_queue_size: int,
        dynamic_batching: bool | None = None,
    ) -> BatchPolicy:
        """The effective policy: no batching for a model without a batch dimension, or when
        the model's config turns dynamic batching off."""
        if not batched_model or dynamic_batching is False or max_batch_size <= 1:
            return cls(0, 0, max_queue_size)
        return cls(max_batch_size, max_queue_delay_us, max_queue_size)


def batch_key(feeds: dict[str, np.ndarray]) -> Hashable:
    """What must agree for two requests to share a call: per input, name, dtype and the
    dimensions after the batch dimension."""
    if len(feeds) == 1:  # the common case, without the sort
        ((name, a),) = feeds.items()
        return ((name, a.dtype, a.shape[1:]),)
    return tuple(sorted((name, a.dtype, a.shape[1:]) for name, a in feeds.items()))


@dataclass(eq=False)
class Pending:
    """One validated request waiting in a queue; its future receives its own rows."""

    feeds: dict[str, np.ndarray]
    rows: int
    future: asyncio.Future[tuple[Outputs, int]]
    key: Hashable = None
    submitted_ns: int = field(default_factory=time.perf_counter_ns)
    gone: bool = False  # the client disconnected: drop it rather than run it

    def __post_init__(self) -> None:
        if self.key is None:
            self.key = batch_key(self.feeds)

    @property
    def dropped(self) -> bool:
        """Nobody waits for the answer any more (client gone, or the waiter cancelled)."""
        return self.gone or self.future.done()


class BatchQueue(Protocol):
    """What `collect` needs of a queue; `RequestQueue` is the real one, tests script their own."""

    arriving: int

    def pop_first(self) -> Pending | None: ...

    def take(self, key: Hashable, room: int) -> list[Pending]: ...

    async def wait(self, timeout: float) -> None: ...


class RequestQueue:
    """A bounded FIFO of pending requests for one version, and a wake-up for the collector.

    `arriving` counts requests for this version whose bodies are still being read: the
    collector waits for companions only while it is above zero.
    """

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.arriving = 0
        self._items: deque[Pending] = deque()
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def waiting(self) -> int:
        """Requests that will need a place: those queued and those whose bodies are on the way."""
        return len(self._items) + self.arriving

    def put(self, item: Pending) -> None:
        """Queue `item`, or raise `QueueFullError` at once (the caller answers 503)."""
        if len(self._items) >= self.max_size:
            raise QueueFullError(
                f"the model's queue is full ({self.max_size} requests waiting); retry shortly"
            )
        self._items.append(item)
        self._changed.set()

    @contextlib.contextmanager
    def expecting(self) -> Iterator[None]:
        """Count a request as on its way while the block runs (its body being read)."""
        self.arriving += 1
        try:
            yield
        finally:
            self.arriving -= 1
            self._changed.set()  # a collector waiting for it should look again

    def pop_first(self) -> Pending | None:
        """The oldest request still wanted; dropped ones are discarded on the way."""
        while self._items:
            item = self._items.popleft()
            if not item.dropped:
                return item
            _settle_dropped(item)
        return None

    def take(self, key: Hashable, room: int) -> list[Pending]:
        """Queued requests with `key`, oldest first, while their rows fit in `room`; the others
        keep their places. Dropped requests are discarded."""
        taken: list[Pending] = []
        kept: deque[Pending] = deque()
        for item in self._items:
            if item.dropped:
                _settle_dropped(item)
            elif item.key == key and item.rows <= room:
                taken.append(item)
                room -= item.rows
            else:
                kept.append(item)
        self._items = kept
        return taken

    async def wait(self, timeout: float) -> None:
        """Until something is queued or stops arriving, or `timeout` seconds pass."""
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)


def _settle_dropped(item: Pending) -> None:
    if not item.future.done():
        item.future.set_exception(ClientGoneError("the client disconnected before it ran"))


async def collect(
    queue: BatchQueue, max_batch_size: int, max_delay: float, clock: Clock
) -> list[Pending]:
    """One batch: the oldest wanted request, then queued requests of the same shape, up to
    `max_batch_size` rows. Waits only while more requests are arriving, and not past
    `max_delay` seconds after the first was taken; returns [] when nothing is wanted."""
    first = queue.pop_first()
    if first is None:
        return []
    batch = [first]
    rows = first.rows
    deadline = clock() + max_delay
    while True:
        more = queue.take(first.key, max_batch_size - rows)
        batch += more
        rows += sum(p.rows for p in more)
        remaining = deadline - clock()
        if rows >= max_batch_size or queue.arriving <= 0 or remaining <= 0:
            return batch
        await queue.wait(remaining)


def merge(batch: list[Pending]) -> dict[str, np.ndarray]:
    """The batch's inputs concatenated along the batch dimension (no copy for one request)."""
    if len(batch) == 1:
        return batch[0].feeds
    return {name: np.concatenate([p.feeds[name] for p in batch]) for name in batch[0].feeds}


def split(outputs: Outputs, batch: list[Pending]) -> list[Outputs] | None:
    """Each request's rows of the merged outputs (views, no copy); None when an output's first
    dimension is not the batch, so rows cannot be told apart and must not be handed out."""
    total = sum(p.rows for p in batch)
    if any(a.ndim == 0 or a.shape[0] != total for a in outputs.values()):
        return None
    if len(batch) == 1:
        return [outputs]
    parts = []
    start = 0
    for p in batch:
        parts.append({n: a[start : start + p.rows] for n, a in outputs.items()})
        start += p.rows
    return parts


class Batcher:
    """The dynamic batcher of one model version: a bounded queue, and who drains it.

    Normally a drain task, started by the first request that finds the batcher idle and ended
    when the queue is empty. For a model that runs inline (on the event loop, in microseconds)
    the request that finds the batcher idle leads instead: it yields one turn of the loop, so
    that requests read in the same turn join, then collects and runs the batch in its own task
    (a task hop would cost as much as the model). Only inline models lead, because their run
    never suspends: a leader cannot be cancelled half-way and strand its companions.
    """

    def __init__(
        self,
        policy: BatchPolicy,
        execute: Execute,
        clock: Clock = time.monotonic,
        inline: bool = False,
    ) -> None:
        self.policy = policy
        self.queue = RequestQueue(policy.max_queue_size)
        self._execute = execute
        self._clock = clock
        self._inline = inline
        self._task: asyncio.Task[None] | None = None
        self._leading = False

    async def submit(
        self,
        feeds: dict[str, np.ndarray],
        rows: int,
        disconnect: Callable[[], Awaitable[Any]] | None = None,
    ) -> tuple[Outputs, int]:
        """This request's outputs and its queueing time in ns; `QueueFullError` when full.

        `disconnect` (ASGI `receive`, once the body is read) returns when the client goes away:
        the request is then dropped from the queue and fails with `ClientGoneError`.
        """
        loop = asyncio.get_running_loop()
        pending = Pending(feeds, rows, loop.create_future())
        self.queue.put(pending)
        idle = self._task is None and not self._leading
        if idle and self._inline:
            try:
                await self._lead()
            except asyncio.CancelledError:
                pending.future.cancel()  # nobody will read it: drop it from the queue
                raise
        elif idle:
            self._task = loop.create_task(self._drain())
        watcher = None
        if disconnect is not None and not pending.future.done():
            watcher = loop.create_task(disconnect())
            watcher.add_done_callback(functools.partial(_on_disconnect, pending))
        try:
            outputs, started_ns = await pending.future
        finally:
            if watcher is not None:
                watcher.cancel()
        return outputs, max(0, started_ns - pending.submitted_ns)

    async def _lead(self) -> None:
        """Run one batch in the caller's task; leave what remains to a drain task."""
        self._leading = True
        try:
            await asyncio.sleep(0)  # one turn: requests read in the same turn queue up
            # No waiting for arrivals beyond that turn: a leader never suspends while it holds
            # a batch (max_delay 0), so a cancelled leader cannot strand its companions.
            batch = await collect(self.queue, self.policy.max_batch_size, 0.0, self._clock)
            if batch:
                await self._run(batch)
        finally:
            self._leading = False
            if len(self.queue) and self._task is None:
                self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        """Run batches until the queue is empty, then end (the next submit starts another)."""
        try:
            delay = self.policy.max_queue_delay_us / 1e6
            while len(self.queue):
                batch = await collect(self.queue, self.policy.max_batch_size, delay, self._clock)
                if batch:
                    await self._run(batch)
        finally:
            self._task = None

    async def _run(self, batch: list[Pending]) -> None:
        rows = sum(p.rows for p in batch)
        try:
            outputs, started_ns = await self._execute(merge(batch), rows)
        except Exception as exc:
            if len(batch) == 1:
                _fail(batch[0], exc)
                return
            await self._one_by_one(batch)  # isolate a value-dependent failure to its request
            return
        parts = split(outputs, batch)
        if parts is None:
            await self._one_by_one(batch)
            return
        for pending, part in zip(batch, parts, strict=True):
            if not pending.future.done():
                pending.future.set_result((part, started_ns))

    async def _one_by_one(self, batch: list[Pending]) -> None:
        for pending in batch:
            if pending.dropped:
                _settle_dropped(pending)
                continue
            try:
                result = await self._execute(pending.feeds, pending.rows)
            except Exception as exc:
                _fail(pending, exc)
            else:
                if not pending.future.done():
                    pending.future.set_result(result)


def _on_disconnect(pending: Pending, watcher: asyncio.Task[Any]) -> None:
    if watcher.cancelled() or watcher.exception() is not None:
        return
    message = watcher.result()
    if isinstance(message, dict) and message.get("type") == "http.disconnect":
        pending.gone = True
        _settle_dropped(pending)


def _fail(pending: Pending, exc: Exception) -> None:
    if pending.future.done():
        return
    if not isinstance(exc, ServiceError):
        logger.exception("batch execution failed", exc_info=exc)
    pending.future.set_exception(exc)
