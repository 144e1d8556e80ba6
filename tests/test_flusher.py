"""The flusher's rules: batching, bounds, retries, splitting, draining, accounting."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest
from structlog.testing import capture_logs

from lunamon import BatchTooLarge, MemorySink, MonitoringSettings, Point, SinkError
from lunamon.flusher import Flusher, FlushPolicy, SinkStats


def point(i: int) -> Point:
    return Point.trusted("request", i, {"route": "GET:/x"}, {"execution_time": float(i)})


def assert_invariant(stats: SinkStats) -> None:
    assert stats["emitted"] == stats["written"] + sum(stats["dropped"].values()) + stats["buffered"]


class ScriptedSink:
    """Fails the first writes as scripted (an exception, or None for success), then succeeds."""

    def __init__(self, script: Sequence[BaseException | None] = (), name: str = "scripted"):
        self.script = list(script)
        self.name = name
        self.batches: list[list[Point]] = []
        self.attempts = 0
        self.closed = False

    async def start(self) -> None:
        pass

    async def write(self, points: Sequence[Point]) -> None:
        self.attempts += 1
        if self.script:
            outcome = self.script.pop(0)
            if outcome is not None:
                raise outcome
        self.batches.append(list(points))

    async def close(self) -> None:
        self.closed = True

    @property
    def written(self) -> list[int]:
        return [p.time_ns for batch in self.batches for p in batch]


def make_policy(**settings: Any) -> FlushPolicy:
    """The flusher's policy from settings: the defaults and checks are the settings'."""
    return MonitoringSettings(**settings).flush_policy()


FAST = make_policy(
    flush_interval=30.0, batch_size=10, buffer_size=100, retry_base_delay=0.01, retry_max_delay=0.05
)


async def wait_for(condition: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.005)


async def test_batch_size_triggers_a_write_before_the_interval() -> None:
    sink = ScriptedSink()
    flusher = Flusher([sink], FAST)
    await flusher.start()
    for i in range(25):
        flusher.emit(point(i))
    await wait_for(lambda: len(sink.written) >= 20)
    assert [len(b) for b in sink.batches][:2] == [10, 10]
    await flusher.close()
    assert sink.written == list(range(25))
    assert_invariant(flusher.stats()["scripted"])


async def test_flush_interval_triggers_a_write() -> None:
    sink = ScriptedSink()
    flusher = Flusher([sink], make_policy(flush_interval=0.05, batch_size=1000, buffer_size=1000))
    await flusher.start()
    for i in range(3):
        flusher.emit(point(i))
    await wait_for(lambda: sink.written == [0, 1, 2])
    await flusher.close()


async def test_overflow_drops_the_oldest_and_counts_exactly() -> None:
    sink = ScriptedSink([ConnectionError("down")] * 1000)
    flusher = Flusher([sink], make_policy(batch_size=10, buffer_size=50, max_retries=1000))
    for i in range(120):
        flusher.emit(point(i))
    stats = flusher.stats()["scripted"]
    assert stats["buffered"] == 50
    assert stats["dropped"]["overflow"] == 70
    assert_invariant(stats)
    sink.script.clear()
    await flusher.flush()
    assert sink.written == list(range(70, 120))  # the newest survived, in order
    assert_invariant(flusher.stats()["scripted"])
    await flusher.close()


async def test_buffer_bound_includes_the_batch_in_flight() -> None:
    sink = ScriptedSink([ConnectionError("down")] * 1000)
    flusher = Flusher(
        [sink], make_policy(batch_size=10, buffer_size=30, max_retries=1000, shutdown_timeout=0.1)
    )
    for i in range(10):
        flusher.emit(point(i))
    await flusher.flush()  # takes a batch of 10 in flight, fails, keeps it
    for i in range(10, 100):
        flusher.emit(point(i))
        assert flusher.stats()["scripted"]["buffered"] <= 30
    stats = flusher.stats()["scripted"]
    assert stats["dropped"]["overflow"] == 70
    assert_invariant(stats)
    await flusher.close()


async def test_retryable_errors_are_retried_with_backoff_then_delivered() -> None:
    errors: list[BaseException | None] = [
        SinkError("503", retryable=True, status=503),
        ConnectionRefusedError("refused"),
        TimeoutError(),
    ]
    sink = ScriptedSink(errors)
    flusher = Flusher(
        [sink], make_policy(flush_interval=0.02, batch_size=10, retry_base_delay=0.01)
    )
    await flusher.start()
    for i in range(5):
        flusher.emit(point(i))
    await wait_for(lambda: sink.written == list(range(5)))
    stats = flusher.stats()["scripted"]
    assert stats["retries"] == 3
    assert stats["written"] == 5
    assert_invariant(stats)
    await flusher.close()


async def test_retry_after_is_honoured_and_capped() -> None:
    flusher = Flusher([ScriptedSink()], make_policy(retry_base_delay=0.5, retry_max_delay=30.0))
    channel = flusher._channels[0]
    channel.attempts = 1
    channel.retry_after = 7.0
    assert flusher._backoff(channel) == 7.0
    channel.retry_after = 10**9
    assert flusher._backoff(channel) == 30.0
    channel.retry_after = -5
    assert flusher._backoff(channel) == 0.0
    channel.retry_after = None
    delays = []
    for attempt in range(1, 12):
        channel.attempts = attempt
        delays.append(flusher._backoff(channel))
    for attempt, delay in enumerate(delays, 1):
        cap = min(30.0, 0.5 * 2 ** (attempt - 1))
        assert cap / 2 <= delay <= cap  # jitter within the upper half
    assert len(set(delays)) > 1


async def test_retry_budget_exhausted_is_counted() -> None:
    sink = ScriptedSink([SinkError("500", retryable=True, status=500)] * 10)
    policy = make_policy(batch_size=10, max_retries=2, retry_base_delay=0.01, retry_max_delay=0.01)
    flusher = Flusher([sink], policy)
    for i in range(4):
        flusher.emit(point(i))
    with capture_logs() as logs:
        for _ in range(3):
            await flusher.flush()
    stats = flusher.stats()["scripted"]
    assert stats["dropped"]["retry_exhausted"] == 4
    assert stats["retries"] == 2
    assert any(e["event"] == "retry_budget_exhausted" for e in logs)
    assert_invariant(stats)
    flusher.emit(point(99))
    await flusher.flush()
    assert sink.written == []  # the script still fails: 5 attempts so far
    await flusher.close()


@pytest.mark.parametrize("status", [400, 401, 403, 404])
async def test_non_retryable_errors_are_rejected_logged_once_not_retried(status: int) -> None:
    sink = ScriptedSink(
        [SinkError("no", retryable=False, status=status, server_text="x" * 5000)] * 3
    )
    flusher = Flusher([sink], make_policy(batch_size=2, buffer_size=10))
    for i in range(6):
        flusher.emit(point(i))
    with capture_logs() as logs:
        await flusher.flush()
    stats = flusher.stats()["scripted"]
    assert stats["dropped"]["rejected"] == 6
    assert stats["retries"] == 0
    assert sink.attempts == 3
    rejected = [e for e in logs if e["event"] == "batch_rejected"]
    assert len(rejected) == 1  # rate-limited: once, not once per batch
    assert len(rejected[0]["error"]) <= 1024
    assert_invariant(stats)
    await flusher.close()


async def test_too_large_batches_are_split_and_a_single_point_dropped() -> None:
    class SizeLimitedSink(ScriptedSink):
        async def write(self, points: Sequence[Point]) -> None:
            self.attempts += 1
            if len(points) > 3 or any(p.time_ns == 13 for p in points):
                raise BatchTooLarge(server_text="body too large")
            self.batches.append(list(points))

    sink = SizeLimitedSink()
    flusher = Flusher([sink], make_policy(batch_size=16, buffer_size=100))
    for i in range(16):
        flusher.emit(point(i))
    await flusher.flush()
    stats = flusher.stats()["scripted"]
    assert sink.written == [i for i in range(16) if i != 13]
    assert stats["dropped"]["rejected"] == 1
    assert_invariant(stats)
    await flusher.close()


async def test_a_raising_sink_is_counted_and_does_not_hold_back_another() -> None:
    class Broken(ScriptedSink):
        async def write(self, points: Sequence[Point]) -> None:
            raise ZeroDivisionError("plugin bug")

    good, bad = MemorySink(), Broken(name="broken")
    flusher = Flusher([good, bad], make_policy(batch_size=5))
    for i in range(12):
        flusher.emit(point(i))
    await flusher.flush()
    stats = flusher.stats()
    assert len(good.points) == 12
    assert stats["broken"]["dropped"]["rejected"] == 12
    for s in stats.values():
        assert_invariant(s)
    flusher.emit(point(12))
    await flusher.flush()
    assert len(good.points) == 13
    await flusher.close()


async def test_a_slow_sink_does_not_hold_back_another() -> None:
    release = asyncio.Event()

    class Hung(ScriptedSink):
        async def write(self, points: Sequence[Point]) -> None:
            await release.wait()

    good, hung = MemorySink(), Hung(name="hung")
    flusher = Flusher([good, hung], make_policy(flush_interval=0.02, batch_size=5))
    await flusher.start()
    for i in range(7):
        flusher.emit(point(i))
    await wait_for(lambda: len(good.points) == 7)
    assert flusher.stats()["hung"]["buffered"] == 7
    release.set()
    await flusher.close()


async def test_close_drains_with_the_sink_up() -> None:
    sink = ScriptedSink()
    flusher = Flusher([sink], make_policy(batch_size=10, buffer_size=1000))
    await flusher.start()
    for i in range(95):
        flusher.emit(point(i))
    await flusher.close()
    assert sink.written == list(range(95))
    assert sink.closed
    stats = flusher.stats()["scripted"]
    assert stats["written"] == 95
    assert stats["buffered"] == 0


async def test_close_with_the_sink_down_respects_the_deadline_and_counts_shutdown() -> None:
    sink = ScriptedSink([ConnectionError("down")] * 10_000)
    policy = make_policy(batch_size=10, shutdown_timeout=0.3, retry_base_delay=0.01)
    flusher = Flusher([sink], policy)
    await flusher.start()
    for i in range(25):
        flusher.emit(point(i))
    started = time.monotonic()
    with capture_logs() as logs:
        await flusher.close()
    assert time.monotonic() - started < 0.3 + 0.5
    stats = flusher.stats()["scripted"]
    assert stats["dropped"]["shutdown"] == 25
    assert stats["buffered"] == 0
    assert_invariant(stats)
    assert any(e["event"] == "points_dropped_at_shutdown" for e in logs)


async def test_close_with_a_hung_sink_respects_the_deadline() -> None:
    class Hung(ScriptedSink):
        async def write(self, points: Sequence[Point]) -> None:
            await asyncio.Event().wait()

    flusher = Flusher([Hung()], make_policy(shutdown_timeout=0.2))
    await flusher.start()
    flusher.emit(point(1))
    started = time.monotonic()
    await flusher.close()
    assert time.monotonic() - started < 1.0
    assert flusher.stats()["scripted"]["dropped"]["shutdown"] == 1


async def test_emit_after_close_is_counted_and_never_raises() -> None:
    sink = ScriptedSink()
    flusher = Flusher([sink], make_policy())
    await flusher.close()
    flusher.emit(point(1))
    await flusher.flush()
    stats = flusher.stats()["scripted"]
    assert stats["dropped"]["after_close"] == 1
    assert stats["emitted"] == 1
    assert_invariant(stats)


async def test_repeated_sink_names_are_numbered() -> None:
    flusher = Flusher([MemorySink(), MemorySink(), ScriptedSink(), MemorySink()], make_policy())
    assert list(flusher.stats()) == ["memory", "memory#2", "scripted", "memory#3"]


def test_emit_before_any_loop_exists_then_run() -> None:
    sink = MemorySink()
    flusher = Flusher([sink], make_policy())
    flusher.emit(point(1))  # no event loop yet: buffered

    async def main() -> None:
        await flusher.start()
        flusher.emit(point(2))
        await flusher.close()

    asyncio.run(main())
    assert [p.time_ns for p in sink.points] == [1, 2]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"flush_interval": 0},
        {"batch_size": 0},
        {"batch_size": 10, "buffer_size": 5},
        {"max_retries": -1},
        {"retry_base_delay": 1.0, "retry_max_delay": 0.5},
    ],
)
def test_bad_policy_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - message per rule
        make_policy(**kwargs)


async def test_close_waits_for_a_write_in_flight_instead_of_sending_it_twice() -> None:
    class ThreadSink(ScriptedSink):
        """Writes in a thread, like the file sink: a cancelled write still lands."""

        def _write(self, batch: list[Point]) -> None:
            started.set()
            release.wait(5)
            self.batches.append(batch)

        async def write(self, points: Sequence[Point]) -> None:
            await asyncio.to_thread(self._write, list(points))

    started, release = threading.Event(), threading.Event()
    sink = ThreadSink()
    flusher = Flusher([sink], make_policy(flush_interval=0.01, shutdown_timeout=5.0))
    await flusher.start()
    for i in range(10):
        flusher.emit(point(i))
    await asyncio.to_thread(started.wait, 5)  # the task is inside sink.write now
    closing = asyncio.create_task(flusher.close())
    await asyncio.sleep(0)
    release.set()
    await closing
    assert sink.written == list(range(10))  # once, not twice
    stats = flusher.stats()["scripted"]
    assert stats["written"] == 10
    assert_invariant(stats)
