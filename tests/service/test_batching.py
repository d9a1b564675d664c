"""The dynamic batcher without HTTP: `collect` against a scripted queue and a fake clock (no
sleeping, no timing), then `Batcher` against a fake execute on a real event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import numpy as np
import pytest

from service.batching import (
    Batcher,
    BatchPolicy,
    Pending,
    RequestQueue,
    batch_key,
    collect,
    merge,
    split,
)
from service.errors import (
    BadRequestError,
    ClientGoneError,
    QueueFullError,
    error_response_for,
)

DELAY = 0.0005  # seconds


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class ScriptedQueue:
    """A `BatchQueue` whose future arrivals are scripted: `wait` jumps the clock to the next
    arrival or to its timeout, whichever comes first, and never sleeps."""

    clock: FakeClock
    queue: RequestQueue = field(default_factory=lambda: RequestQueue(100))
    script: list[tuple[float, Pending | None]] = field(default_factory=list)  # None: gives up
    waits: list[float] = field(default_factory=list)

    @property
    def arriving(self) -> int:
        return len(self.script)

    def pop_first(self) -> Pending | None:
        return self.queue.pop_first()

    def take(self, key: Any, room: int) -> list[Pending]:
        return self.queue.take(key, room)

    async def wait(self, timeout: float) -> None:
        self.waits.append(timeout)
        due = self.clock.now + timeout
        if self.script and self.script[0][0] <= due:
            at, item = self.script.pop(0)
            self.clock.now = at
            if item is not None:
                self.queue.put(item)
        else:
            self.clock.now = due


LOOP = asyncio.new_event_loop()  # the collect tests' futures belong to it; closed at the end


@pytest.fixture(scope="module", autouse=True)
def _close_loop():
    yield
    LOOP.close()


def pending(rows: int = 1, width: int = 3, fill: float = 0.0) -> Pending:
    """A request of `rows` rows of `width` values."""
    feeds = {"x": np.full((rows, width), fill, dtype=np.float32)}
    return Pending(feeds, rows, LOOP.create_future())


def run_collect(q: ScriptedQueue, max_batch: int = 8) -> list[Pending]:
    return LOOP.run_until_complete(collect(q, max_batch, DELAY, q.clock))


def test_a_lone_request_leaves_at_once_without_waiting() -> None:
    q = ScriptedQueue(FakeClock())
    only = pending()
    q.queue.put(only)
    start = q.clock.now
    assert run_collect(q) == [only]
    assert q.waits == [] and q.clock.now == start


def test_waits_for_arrivals_until_the_deadline_and_no_longer() -> None:
    clock = FakeClock()
    first, soon, late = pending(), pending(), pending()
    q = ScriptedQueue(clock, script=[(clock.now + 0.0002, soon), (clock.now + 0.002, late)])
    q.queue.put(first)
    start = clock.now
    assert run_collect(q) == [first, soon]
    assert clock.now == pytest.approx(start + DELAY)  # left at the deadline
    assert q.script == [(start + 0.002, late)]  # the late one is the next batch's


def test_stops_waiting_as_soon_as_nothing_more_is_arriving() -> None:
    clock = FakeClock()
    first = pending()
    q = ScriptedQueue(clock, script=[(clock.now + 0.0001, None)])  # that one failed validation
    q.queue.put(first)
    start = clock.now
    assert run_collect(q) == [first]
    assert clock.now == pytest.approx(start + 0.0001)


def test_size_cap_counts_rows_and_keeps_the_rest_in_order() -> None:
    q = ScriptedQueue(FakeClock())
    items = [pending(rows=3), pending(rows=2), pending(rows=4), pending(rows=1), pending(rows=2)]
    for item in items:
        q.queue.put(item)
    batch = run_collect(q, max_batch=6)
    assert batch == [items[0], items[1], items[3]]  # 3 + 2 + 1; the 4-row one did not fit
    assert q.queue.pop_first() is items[2] and q.queue.pop_first() is items[4]


def test_a_full_batch_leaves_without_waiting_for_arrivals() -> None:
    clock = FakeClock()
    q = ScriptedQueue(clock, script=[(clock.now + 0.0001, pending())])
    for _ in range(4):
        q.queue.put(pending())
    assert len(run_collect(q, max_batch=4)) == 4
    assert q.waits == []


def test_mixed_shapes_are_kept_apart() -> None:
    q = ScriptedQueue(FakeClock())
    a, b, c = pending(width=3), pending(width=5), pending(width=3)
    for item in (a, b, c):
        q.queue.put(item)
    assert run_collect(q) == [a, c]
    assert run_collect(q) == [b]
    assert batch_key(a.feeds) != batch_key(b.feeds)


def test_cancelled_and_disconnected_requests_are_dropped_before_they_run() -> None:
    q = ScriptedQueue(FakeClock())
    cancelled, gone, kept = pending(), pending(), pending()
    cancelled.future.cancel()
    gone.gone = True
    for item in (cancelled, gone, kept):
        q.queue.put(item)
    assert run_collect(q) == [kept]
    assert len(q.queue) == 0
    assert isinstance(gone.future.exception(), ClientGoneError)


def test_queue_full_is_refused_at_once_as_503_with_retry_after() -> None:
    queue = RequestQueue(max_size=2)
    queue.put(pending())
    queue.put(pending())
    with pytest.raises(QueueFullError, match="queue is full") as caught:
        queue.put(pending())
    response = error_response_for(caught.value)
    assert response.status_code == HTTPStatus.SERVICE_UNAVAILABLE
    assert response.headers["Retry-After"] == "1"


def test_merge_and_split_hand_each_request_its_own_rows() -> None:
    batch = [pending(rows=2, fill=1), pending(rows=1, fill=2), pending(rows=3, fill=3)]
    merged = merge(batch)["x"]
    assert merged.shape == (6, 3)
    parts = split({"y": merged * 10}, batch)
    assert parts is not None
    for item, part in zip(batch, parts, strict=True):
        np.testing.assert_array_equal(part["y"], item.feeds["x"] * 10)
    assert split({"y": merged.sum(axis=0)}, batch) is None  # no batch dimension: refuse


def test_policy_is_off_without_a_batch_dimension_or_when_the_config_says_so() -> None:
    knobs = {"max_batch_size": 8, "max_queue_delay_us": 100, "max_queue_size": 4}
    assert BatchPolicy.resolve(True, **knobs).enabled
    assert not BatchPolicy.resolve(False, **knobs).enabled
    assert not BatchPolicy.resolve(True, **knobs, dynamic_batching=False).enabled
    assert not BatchPolicy.resolve(True, **{**knobs, "max_batch_size": 1}).enabled


# ---------------------------------------------------------------- Batcher on a real loop

Execute = Callable[[dict[str, np.ndarray], int], Awaitable[tuple[dict[str, np.ndarray], int]]]


@dataclass
class FakeModel:
    """Doubles its input; refuses any batch holding a negative value, as a graph's
    value-dependent check would; records every call's batch size."""

    calls: list[int] = field(default_factory=list)
    gate: asyncio.Event | None = None

    async def __call__(
        self, feeds: dict[str, np.ndarray], rows: int
    ) -> tuple[dict[str, np.ndarray], int]:
        if self.gate is not None:
            await self.gate.wait()
        self.calls.append(rows)
        if (feeds["x"] < 0).any():
            raise BadRequestError("negative input")
        return {"y": feeds["x"] * 2}, 0


async def settle() -> None:
    """Let every task that can run, run (a few turns of the loop; no time passes)."""
    for _ in range(10):
        await asyncio.sleep(0)


def policy(max_batch: int = 8, queue: int = 64) -> BatchPolicy:
    return BatchPolicy(max_batch_size=max_batch, max_queue_delay_us=500, max_queue_size=queue)


async def submit_all(batcher: Batcher, values: list[float]) -> list[Any]:
    feeds = [{"x": np.full((1, 3), v, dtype=np.float32)} for v in values]
    results = await asyncio.gather(*(batcher.submit(f, 1) for f in feeds), return_exceptions=True)
    return [r if isinstance(r, BaseException) else r[0]["y"] for r in results]


def test_concurrent_requests_share_a_call_and_get_their_own_rows() -> None:
    model = FakeModel()
    values = [float(i) for i in range(20)]
    outputs = asyncio.run(submit_all(Batcher(policy(max_batch=8), model), values))
    for value, out in zip(values, outputs, strict=True):
        np.testing.assert_array_equal(out, np.full((1, 3), 2 * value, dtype=np.float32))
    assert sum(model.calls) == 20 and max(model.calls) == 8 and len(model.calls) < 20


def test_an_inline_model_batches_requests_of_the_same_turn_without_a_task() -> None:
    model = FakeModel()
    batcher = Batcher(policy(max_batch=8), model, inline=True)
    values = [float(i) for i in range(5)]
    outputs = asyncio.run(submit_all(batcher, values))
    for value, out in zip(values, outputs, strict=True):
        np.testing.assert_array_equal(out, np.full((1, 3), 2 * value, dtype=np.float32))
    assert model.calls == [5]


def test_a_cancelled_leader_leaves_its_companions_to_a_drain_task() -> None:
    async def scenario() -> tuple[Any, Any, list[int]]:
        model = FakeModel()
        batcher = Batcher(policy(), model, inline=True)
        feeds = {"x": np.ones((1, 3), dtype=np.float32)}
        leader = asyncio.ensure_future(batcher.submit(feeds, 1))
        await asyncio.sleep(0)  # the leader queued itself and yields its one turn
        companion = asyncio.ensure_future(batcher.submit(feeds, 1))
        leader.cancel()
        done = await asyncio.gather(leader, companion, return_exceptions=True)
        return done[0], done[1], model.calls

    leader, companion, calls = asyncio.run(scenario())
    assert isinstance(leader, asyncio.CancelledError)
    np.testing.assert_array_equal(companion[0]["y"], np.full((1, 3), 2.0, dtype=np.float32))
    assert calls == [1]  # the companion ran; the cancelled leader did not


def test_a_failing_request_fails_alone() -> None:
    model = FakeModel()
    outputs = asyncio.run(submit_all(Batcher(policy(), model), [1.0, -1.0, 3.0]))
    assert isinstance(outputs[1], BadRequestError)
    np.testing.assert_array_equal(outputs[0], np.full((1, 3), 2.0, dtype=np.float32))
    np.testing.assert_array_equal(outputs[2], np.full((1, 3), 6.0, dtype=np.float32))
    assert model.calls[0] == 3  # tried together first, then one by one


def test_queue_full_while_a_batch_runs() -> None:
    async def scenario() -> list[Any]:
        model = FakeModel(gate=asyncio.Event())
        batcher = Batcher(policy(max_batch=1 + 1, queue=1), model)
        first = asyncio.ensure_future(submit_all(batcher, [1.0]))
        await settle()  # the first is taken and blocks in the model
        second = asyncio.ensure_future(submit_all(batcher, [2.0]))  # waits in the queue
        await settle()
        third = await submit_all(batcher, [3.0])  # the queue holds one: refused
        model.gate.set()
        return [*(await first), *(await second), *third]

    first, second, third = asyncio.run(scenario())
    assert isinstance(third, QueueFullError)
    assert first[0, 0] == 2.0 and second[0, 0] == 4.0


def test_a_client_that_disconnects_while_queued_is_dropped() -> None:
    async def scenario() -> tuple[Any, list[int]]:
        model = FakeModel(gate=asyncio.Event())
        batcher = Batcher(policy(), model)
        running = asyncio.ensure_future(submit_all(batcher, [1.0]))
        await settle()
        client_left = asyncio.Event()

        async def disconnect() -> dict[str, str]:
            await client_left.wait()
            return {"type": "http.disconnect"}

        feeds = {"x": np.full((1, 3), 5.0, dtype=np.float32)}
        waiting = asyncio.ensure_future(batcher.submit(feeds, 1, disconnect))
        await settle()
        client_left.set()
        result = await asyncio.gather(waiting, return_exceptions=True)
        model.gate.set()
        await running
        return result[0], model.calls

    outcome, calls = asyncio.run(scenario())
    assert isinstance(outcome, ClientGoneError)
    assert calls == [1]  # only the request that was running; the gone one never ran
