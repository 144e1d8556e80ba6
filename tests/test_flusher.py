"""The flusher's rules: batching, bounds, retries, splitting, draining, accounting."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import weakref
from collections.abc import MutableMapping, Sequence
from typing import Any

import pytest
from structlog.testing import capture_logs

from lunamon import BatchTooLarge, MemorySink, MonitoringSettings, Point, SinkError
from lunamon._backlog import PACK_RUN
from lunamon.flusher import Flusher, FlushPolicy, SinkStats


@pytest.fixture(autouse=True, params=["emit", "emitter"])
def _both_ways(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test twice: emitting with ``Flusher.emit`` (the reference), and with what
    the hot path calls instead, ``Flusher.emitter()`` (compiled when built), which must
    leave every channel as the reference does."""
    if request.param == "emitter":
        build = Flusher.__init__

        def build_with_emitter(self: Flusher, *args: Any, **kwargs: Any) -> None:
            build(self, *args, **kwargs)
            vars(self)["emit"] = self.emitter()

        monkeypatch.setattr(Flusher, "__init__", build_with_emitter)


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


# --------------------------------------------------------------------------- mutants killed
# Each test below fails with a change that the first release's suite let through
# (docs/mutation.md); the comment names the change.


async def test_overflow_is_counted_when_the_batch_in_flight_fills_the_whole_bound() -> None:
    # batch_size == buffer_size: a failed batch in flight takes the whole bound, the buffer
    # has no room at all, and every new point is dropped at once. Mutant: that branch
    # without its `overflow` count (emitted 15 != written 0 + dropped 0 + buffered 10).
    sink = ScriptedSink([ConnectionError("down")] * 1000)
    flusher = Flusher(
        [sink], make_policy(batch_size=10, buffer_size=10, max_retries=1000, shutdown_timeout=0.1)
    )
    for i in range(10):
        flusher.emit(point(i))
    await flusher.flush()  # the 10 points go in flight; the write fails, they stay there
    assert flusher._channels[0].capacity == 0
    for i in range(10, 15):
        flusher.emit(point(i))
    stats = flusher.stats()["scripted"]
    assert (stats["emitted"], stats["buffered"], stats["dropped"]["overflow"]) == (15, 10, 5)
    assert_invariant(stats)
    sink.script.clear()
    await flusher.flush()
    assert sink.written == list(range(10))  # the batch in flight, not the dropped points
    assert_invariant(flusher.stats()["scripted"])
    await flusher.close()


async def test_after_a_413_later_batches_stay_at_the_smaller_size() -> None:
    # Mutant: the split without `channel.batch_size = ...`: every later batch starts at
    # the configured size again, is refused again and split again.
    class SizeLimitedSink(ScriptedSink):
        refused = 0

        async def write(self, points: Sequence[Point]) -> None:
            self.attempts += 1
            if len(points) > 3:
                self.refused += 1
                raise BatchTooLarge(server_text="body too large")
            self.batches.append(list(points))

    sink = SizeLimitedSink()
    flusher = Flusher([sink], make_policy(batch_size=16, buffer_size=100))
    for i in range(16):
        flusher.emit(point(i))
    await flusher.flush()
    # 16 refused, 8 refused, 4 refused, then batches of 2: the size found is kept
    assert sink.refused == 3
    assert [len(b) for b in sink.batches] == [2] * 8
    assert flusher._channels[0].batch_size == 2
    for i in range(16, 26):
        flusher.emit(point(i))
    await flusher.flush()
    assert sink.refused == 3  # no 413 for the later batches
    assert [len(b) for b in sink.batches] == [2] * 13
    assert sink.written == list(range(26))
    stats = flusher.stats()["scripted"]
    assert (stats["written"], stats["dropped"]["rejected"]) == (26, 0)
    assert_invariant(stats)
    await flusher.close()


def test_backoff_jitter_spreads_over_the_upper_half_of_each_delay() -> None:
    # Mutant: no jitter (the capped delay itself, or half of it): every retry of every
    # sink would come back at the same instant. Here, many draws of one attempt's delay
    # must be distinct and cover [cap/2, cap], with a mean near 3/4 of the cap.
    flusher = Flusher([ScriptedSink()], make_policy(retry_base_delay=0.5, retry_max_delay=30.0))
    flusher._rng.seed(20240601)
    channel = flusher._channels[0]
    for attempt, cap in [(1, 0.5), (3, 2.0), (7, 30.0), (200, 30.0)]:
        channel.attempts = attempt
        draws = [flusher._backoff(channel) for _ in range(400)]
        assert all(cap / 2 <= d <= cap for d in draws), attempt
        assert len(set(draws)) == len(draws), attempt
        assert min(draws) < cap * 0.55, attempt
        assert max(draws) > cap * 0.95, attempt
        assert abs(sum(draws) / len(draws) - cap * 0.75) < cap * 0.05, attempt


# --------------------------------------------------------------------------- wake-ups and timing

SLOW_RETRIES = {"retry_base_delay": 30.0, "retry_max_delay": 30.0}


async def test_a_full_batch_wakes_the_task_at_once_every_time() -> None:
    # Exactly at batch_size points, never one before, and again after each write (not
    # only at the next flush_interval, nor after a backoff taken for an empty buffer).
    sink = ScriptedSink()
    flusher = Flusher([sink], make_policy(flush_interval=30.0, batch_size=10, **SLOW_RETRIES))
    await flusher.start()
    for round_ in range(3):
        for i in range(9):
            flusher.emit(point(round_ * 10 + i))
        await asyncio.sleep(0.1)
        assert len(sink.written) == round_ * 10  # nine points: no write yet
        flusher.emit(point(round_ * 10 + 9))
        await wait_for(lambda r=round_: len(sink.written) == (r + 1) * 10, timeout=2.0)
    assert [len(b) for b in sink.batches] == [10, 10, 10]
    await flusher.close()


async def test_the_flush_interval_triggers_every_write_not_only_the_first() -> None:
    sink = ScriptedSink()
    flusher = Flusher([sink], make_policy(flush_interval=0.05, batch_size=1000))
    await flusher.start()
    for expected in (3, 5, 6):
        while len(sink.written) + len(flusher._channels[0].buffer) < expected:
            flusher.emit(point(len(sink.written) + len(flusher._channels[0].buffer)))
        await wait_for(lambda e=expected: len(sink.written) == e, timeout=2.0)
    await flusher.close()


async def test_points_emitted_during_a_backoff_do_not_cut_it_short() -> None:
    sink = ScriptedSink([ConnectionError("down")])
    flusher = Flusher(
        [sink],
        make_policy(flush_interval=30.0, batch_size=2, retry_base_delay=0.6, retry_max_delay=0.6),
    )
    await flusher.start()
    flusher.emit(point(0))
    flusher.emit(point(1))
    await wait_for(lambda: sink.attempts == 1, timeout=2.0)
    started = time.monotonic()
    flusher.emit(point(2))
    flusher.emit(point(3))  # a full batch: would wake the task, but it is backing off
    await asyncio.sleep(0.2)
    assert sink.attempts == 1
    await wait_for(lambda: sink.written == [0, 1, 2, 3], timeout=3.0)
    assert time.monotonic() - started >= 0.25  # the backoff's lower bound (0.6 / 2, minus 0.1)
    assert flusher.stats()["scripted"]["retries"] == 1
    await flusher.close()


async def test_a_write_that_hangs_times_out_after_write_timeout() -> None:
    class HangsOnce(ScriptedSink):
        async def write(self, points: Sequence[Point]) -> None:
            self.attempts += 1
            if self.attempts == 1:
                await asyncio.Event().wait()
            self.batches.append(list(points))

    sink = HangsOnce()
    flusher = Flusher([sink], make_policy(write_timeout=0.2, retry_base_delay=0.01))
    flusher.emit(point(1))
    started = time.monotonic()
    await flusher.flush()
    assert 0.15 <= time.monotonic() - started < 1.0
    assert flusher.stats()["scripted"]["retries"] == 1
    await flusher.flush()
    assert sink.written == [1]
    await flusher.close()


def test_backoff_reaches_its_cap_however_small_the_base_delay() -> None:
    # base * 2 ** (attempts - 1), capped: exact even when 2 ** 64 times the base is still
    # under the cap, and no overflow for any attempt count.
    flusher = Flusher([ScriptedSink()], make_policy(retry_base_delay=1e-19, retry_max_delay=30.0))
    channel = flusher._channels[0]
    channel.attempts = 60
    assert 1e-19 * 2**59 / 2 <= flusher._backoff(channel) <= 1e-19 * 2**59
    for attempts in (70, 100, 2000, 10**30):
        channel.attempts = attempts
        assert 15.0 <= flusher._backoff(channel) <= 30.0, attempts


async def test_retry_after_of_a_failed_write_sets_the_next_delay() -> None:
    sink = ScriptedSink([SinkError("429", retryable=True, status=429, retry_after=7.0)])
    flusher = Flusher([sink], make_policy(retry_base_delay=0.01, retry_max_delay=30.0))
    flusher.emit(point(1))
    await flusher.flush()
    assert flusher._backoff(flusher._channels[0]) == 7.0
    await flusher.close()


# --------------------------------------------------------------------------- bounds and accounting


async def test_after_a_write_the_whole_bound_is_free_again() -> None:
    sink = ScriptedSink()
    flusher = Flusher([sink], make_policy(batch_size=5, buffer_size=10))
    for i in range(5):
        flusher.emit(point(i))
    await flusher.flush()
    for i in range(5, 15):
        flusher.emit(point(i))
    stats = flusher.stats()["scripted"]
    assert (stats["buffered"], stats["dropped"]["overflow"]) == (10, 0)
    await flusher.flush()
    assert sink.written == list(range(15))
    await flusher.close()


async def test_every_emit_after_close_is_counted_for_every_sink() -> None:
    flusher = Flusher([ScriptedSink(), MemorySink()], make_policy())
    await flusher.close()
    for i in range(3):
        flusher.emit(point(i))
    for stats in flusher.stats().values():
        assert (stats["emitted"], stats["dropped"]["after_close"]) == (3, 3)
        assert_invariant(stats)


async def test_a_sink_whose_bound_is_all_in_flight_does_not_starve_the_next_sink() -> None:
    stuck, good = ScriptedSink([ConnectionError("down")] * 100), MemorySink()
    flusher = Flusher([stuck, good], make_policy(batch_size=10, buffer_size=10, max_retries=100))
    for i in range(10):
        flusher.emit(point(i))
    await flusher.flush()  # stuck: ten points in flight, the whole bound; good: written
    for i in range(10, 15):
        flusher.emit(point(i))
    stats = flusher.stats()
    assert stats["scripted"]["dropped"]["overflow"] == 5
    assert stats["memory"]["buffered"] == 5  # every point still reaches the other sink
    await flusher.flush()
    assert [p.time_ns for p in good.points] == list(range(15))
    stuck.script.clear()
    await flusher.close()


@pytest.mark.parametrize(("delivered", "written", "rejected"), [(2, 5, 3), (0, 3, 5), (9, 8, 0)])
async def test_points_a_refused_batch_stored_are_counted_written(
    delivered: int, written: int, rejected: int
) -> None:
    refused = SinkError("partial", retryable=False, status=400, delivered=delivered)
    sink = ScriptedSink([None, refused])
    flusher = Flusher([sink], make_policy(batch_size=5))
    for i in range(3):
        flusher.emit(point(i))
    await flusher.flush()  # 3 written
    for i in range(3, 8):
        flusher.emit(point(i))
    await flusher.flush()  # 5 refused, `delivered` of them stored all the same
    stats = flusher.stats()["scripted"]
    assert (stats["written"], stats["dropped"]["rejected"]) == (written, rejected)
    assert_invariant(stats)
    await flusher.close()


async def test_an_exhausted_batch_does_not_hold_back_the_next_one() -> None:
    sink = ScriptedSink([ConnectionError("down")] * 2)
    flusher = Flusher([sink], make_policy(batch_size=2, max_retries=0))
    for i in range(6):
        flusher.emit(point(i))
    await flusher.flush()  # two batches fail once each (no retries allowed), the third lands
    stats = flusher.stats()["scripted"]
    assert (stats["dropped"]["retry_exhausted"], stats["written"]) == (4, 2)
    assert sink.written == [4, 5]
    await flusher.close()


async def test_a_413_on_two_points_goes_down_to_single_points_for_good() -> None:
    class OnePointAtATime(ScriptedSink):
        refused = 0

        async def write(self, points: Sequence[Point]) -> None:
            if len(points) > 1:
                self.refused += 1
                raise BatchTooLarge()
            self.batches.append(list(points))

    sink = OnePointAtATime()
    flusher = Flusher([sink], make_policy(batch_size=2))
    for i in range(2):
        flusher.emit(point(i))
    await flusher.flush()
    for i in range(2, 6):
        flusher.emit(point(i))
    await flusher.flush()
    assert (sink.refused, sink.written) == (1, list(range(6)))
    await flusher.close()


# --------------------------------------------------------------------------- lifecycle


class CountingSink(ScriptedSink):
    starts = 0

    async def start(self) -> None:
        self.starts += 1


async def test_start_is_idempotent_names_its_task_and_is_refused_after_close() -> None:
    sink = CountingSink()
    flusher = Flusher([sink], make_policy())
    await flusher.start()
    task = flusher._channels[0].task
    assert task is not None
    assert task.get_name() == "lunamon:scripted"
    await flusher.start()
    flusher.emit(point(1))
    await flusher.flush()
    await flusher.flush()
    assert sink.starts == 1
    assert flusher._channels[0].task is task
    await flusher.close()
    assert task.cancelled()  # close stops the task, it does not leave it running

    closed = CountingSink()
    flusher = Flusher([closed], make_policy())
    await flusher.close()
    await flusher.start()
    assert (closed.starts, flusher._channels[0].task) == (0, None)


async def test_a_sink_that_fails_to_start_is_logged_and_still_written_to() -> None:
    boom = RuntimeError("no route to influx " + "x" * 2000)

    class FailsToStart(ScriptedSink):
        async def start(self) -> None:
            raise boom

    sink = FailsToStart()
    flusher = Flusher([sink], make_policy(flush_interval=0.02))
    with capture_logs() as logs:
        await flusher.start()
    assert logs == [
        {"event": "sink_start_failed", "sink": "scripted", "error": repr(boom)[:1024],
         "log_level": "error"}
    ]  # fmt: skip
    flusher.emit(point(1))
    await wait_for(lambda: sink.written == [1], timeout=2.0)
    await flusher.close()


async def test_close_drains_through_a_short_outage_with_backoff() -> None:
    # The sink was reached before (written > 0): close retries within its deadline.
    sink = ScriptedSink([None, ConnectionError("blip"), ConnectionError("blip")])
    flusher = Flusher([sink], make_policy(batch_size=5, retry_base_delay=0.01, shutdown_timeout=3))
    for i in range(5):
        flusher.emit(point(i))
    await flusher.flush()
    for i in range(5, 10):
        flusher.emit(point(i))
    started = time.monotonic()
    await flusher.close()
    assert time.monotonic() - started < 1.0
    assert sink.written == list(range(10))
    assert sink.attempts == 4
    stats = flusher.stats()["scripted"]
    assert (stats["written"], stats["retries"], stats["dropped"]["shutdown"]) == (10, 2, 0)


async def test_points_left_at_shutdown_are_logged_with_their_count() -> None:
    sink = ScriptedSink([ConnectionError("down")] * 100)
    flusher = Flusher([sink], make_policy(batch_size=10, shutdown_timeout=0.2))
    for i in range(25):
        flusher.emit(point(i))
    with capture_logs() as logs:
        await flusher.close()
    dropped = [e for e in logs if e["event"] == "points_dropped_at_shutdown"]
    assert dropped == [
        {"event": "points_dropped_at_shutdown", "sink": "scripted", "count": 25,
         "log_level": "warning"}
    ]  # fmt: skip


@pytest.mark.parametrize("how", ["hangs", "raises"])
async def test_a_sink_close_that_hangs_or_raises_is_bounded_and_logged(how: str) -> None:
    problem = OSError("cannot close " + "y" * 2000)

    class BadClose(ScriptedSink):
        async def close(self) -> None:
            if how == "hangs":
                await asyncio.Event().wait()
            raise problem

    flusher = Flusher([BadClose()], make_policy(shutdown_timeout=0.2))
    flusher.emit(point(1))
    started = time.monotonic()
    with capture_logs() as logs:
        await flusher.close()
    assert time.monotonic() - started < 0.9
    failed = [e for e in logs if e["event"] == "sink_close_failed"]
    error = repr(TimeoutError()) if how == "hangs" else repr(problem)[:1024]
    assert failed == [
        {"event": "sink_close_failed", "sink": "scripted", "error": error, "log_level": "error"}
    ]
    assert flusher.stats()["scripted"]["written"] == 1


# --------------------------------------------------------------------------- what is logged


def only(logs: list[MutableMapping[str, Any]], event: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == event]


async def test_failed_writes_are_logged_with_sink_attempt_points_and_error() -> None:
    long = SinkError("server said " + "z" * 2000, retryable=True, status=503)
    sink = ScriptedSink([ConnectionError(), long])
    flusher = Flusher([sink], make_policy(batch_size=10, retry_base_delay=0.01))
    for i in range(3):
        flusher.emit(point(i))
    with capture_logs() as logs:
        await flusher.flush()
        await flusher.flush()
    flusher._log = type(flusher._log)()  # a fresh rate limit for the second failure
    with capture_logs() as more:
        await flusher.flush()
    assert only(logs, "sink_write_failed") == [
        {"event": "sink_write_failed", "sink": "scripted", "attempt": 1, "points": 3,
         "error": "ConnectionError", "log_level": "warning"},
    ]  # fmt: skip
    assert sink.written == [0, 1, 2]
    assert only(more, "sink_write_failed") == []
    assert flusher.stats()["scripted"]["retries"] == 2
    await flusher.close()

    sink = ScriptedSink([long])
    flusher = Flusher([sink], make_policy(batch_size=10))
    flusher.emit(point(1))
    with capture_logs() as logs:
        await flusher.flush()
    assert only(logs, "sink_write_failed") == [
        {"event": "sink_write_failed", "sink": "scripted", "attempt": 1, "points": 1,
         "error": str(long)[:1024], "log_level": "warning"},
    ]  # fmt: skip
    await flusher.close()


async def test_each_sink_and_each_status_has_its_own_log_rate_limit() -> None:
    a = ScriptedSink([ConnectionError("a down")] * 3, name="a")
    b = ScriptedSink([ConnectionError("b down")] * 3, name="b")
    flusher = Flusher([a, b], make_policy(retry_base_delay=0.01))
    flusher.emit(point(1))
    with capture_logs() as logs:
        await flusher.flush()
        await flusher.flush()
    assert sorted(e["sink"] for e in only(logs, "sink_write_failed")) == ["a", "b"]
    await flusher.close()

    sink = ScriptedSink(
        [SinkError("bad", retryable=False, status=s) for s in (400, 400, 401)], name="c"
    )
    flusher = Flusher([sink], make_policy(batch_size=1))
    for i in range(3):
        flusher.emit(point(i))
    with capture_logs() as logs:
        await flusher.flush()
    assert [e["status"] for e in only(logs, "batch_rejected")] == [400, 401]
    await flusher.close()


@pytest.mark.parametrize(
    ("outcome", "event", "count", "status"),
    [
        (SinkError("refused " + "r" * 2000, retryable=False, status=400), "batch_rejected", 4, 400),
        (BatchTooLarge(server_text="t" * 2000), "point_too_large", 1, 413),
        (ZeroDivisionError("plugin bug " + "p" * 2000), "sink_raised", 4, None),
        (SinkError("boom " + "b" * 2000, retryable=True, status=500), "retry_budget_exhausted", 4,
         500),
    ],
)  # fmt: skip
async def test_dropped_batches_are_logged_with_count_status_and_error(
    outcome: Exception, event: str, count: int, status: int | None
) -> None:
    sink = ScriptedSink([outcome] * 2)
    flusher = Flusher([sink], make_policy(batch_size=4, max_retries=0))
    for i in range(count):
        flusher.emit(point(i))
    with capture_logs() as logs:
        await flusher.flush()
    assert only(logs, event) == [
        {"event": event, "sink": "scripted", "count": count, "status": status,
         "error": str(outcome)[:1024], "log_level": "error"}
    ]  # fmt: skip
    stats = flusher.stats()["scripted"]
    assert sum(stats["dropped"].values()) == count
    await flusher.close()


class Unprintable(Exception):
    def __str__(self) -> str:
        raise ValueError("this exception cannot say what it is")


async def test_a_sink_exception_that_cannot_be_printed_does_not_stop_the_task() -> None:
    sink = ScriptedSink([Unprintable()])
    flusher = Flusher([sink], make_policy(flush_interval=0.02))
    await flusher.start()
    with capture_logs() as logs:
        flusher.emit(point(1))
        await wait_for(lambda: flusher.stats()["scripted"]["dropped"]["rejected"] == 1)
        flusher.emit(point(2))
        await wait_for(lambda: sink.written == [2], timeout=2.0)  # by the task, not by close
    assert only(logs, "sink_raised")[0]["error"] == "Unprintable"
    task = flusher._channels[0].task
    assert task is not None
    assert not task.done()
    await flusher.close()


async def test_a_log_handler_that_raises_neither_breaks_flush_nor_kills_the_task(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broken = RuntimeError("log handler down " + "h" * 2000)

    def raising_log(*args: object, **kwargs: object) -> None:
        raise broken

    sink = ScriptedSink([ConnectionError("down")] * 4)
    flusher = Flusher([sink], make_policy(flush_interval=30.0, batch_size=1, retry_base_delay=0.01))
    monkeypatch.setattr(flusher._log, "log", raising_log)
    failed = {"event": "flush_failed", "sink": "scripted", "error": repr(broken)[:1024],
              "log_level": "error"}  # fmt: skip
    flusher.emit(point(1))
    with capture_logs() as logs:
        await flusher.flush()  # the failed write's warning raises: flush() still returns
    assert only(logs, "flush_failed") == [failed]
    with capture_logs() as logs:
        await flusher.start()
        flusher.emit(point(2))  # wakes the task: it fails the same way, then backs off and
        # retries (after retry_base_delay, not after the 30 s flush_interval)
        await wait_for(lambda: len(only(logs, "flush_failed")) == 3, timeout=2.0)
    assert only(logs, "flush_failed") == [failed] * 3
    monkeypatch.undo()
    await wait_for(lambda: sink.written == [1, 2], timeout=2.0)  # the task lived on
    await flusher.close()


# --------------------------------------------------------------------------- fork and exit


@pytest.fixture
def only_these_flushers(monkeypatch: pytest.MonkeyPatch) -> weakref.WeakSet[Flusher]:
    """The flushers the fork and exit hooks see: the test's own, not every one alive."""
    import lunamon.flusher

    live: weakref.WeakSet[Flusher] = weakref.WeakSet()
    monkeypatch.setattr(lunamon.flusher, "_live_flushers", live)
    return live


async def test_a_forked_child_forgets_what_the_parent_buffered(
    only_these_flushers: weakref.WeakSet[Flusher],
) -> None:
    from lunamon.flusher import _forget_in_child

    sink = CountingSink([ConnectionError("down")] * 100)
    flusher = Flusher(
        [sink], make_policy(batch_size=2, buffer_size=10, max_retries=100, shutdown_timeout=0.2)
    )
    only_these_flushers.add(flusher)
    await flusher.start()
    for i in range(5):
        flusher.emit(point(i))
    await wait_for(lambda: sink.attempts >= 1)
    task = flusher._channels[0].task
    _forget_in_child()  # what os.register_at_fork runs in the child
    channel = flusher._channels[0]
    assert (channel.buffered(), channel.inflight, channel.capacity) == (0, None, 10)
    assert (channel.wake, channel.lock, channel.task) == (None, None, None)
    assert task is not None
    task.cancel()  # (in a real child the parent's task does not exist)
    sink.script.clear()
    flusher.emit(point(9))  # the child starts afresh: its own task, its own points
    await flusher.start()
    assert sink.starts == 2
    await flusher.flush()
    assert sink.written == [9]
    await flusher.close()


def test_at_exit_an_unstarted_flusher_sends_what_it_holds_once(
    only_these_flushers: weakref.WeakSet[Flusher], monkeypatch: pytest.MonkeyPatch
) -> None:
    from lunamon.flusher import _drain_unstarted_at_exit

    holding, empty, started, closed = ScriptedSink(), ScriptedSink(), ScriptedSink(), ScriptedSink()
    flushers = [Flusher([sink], make_policy()) for sink in (holding, empty, started, closed)]
    for flusher in flushers:
        only_these_flushers.add(flusher)
    for flusher in (flushers[0], flushers[2], flushers[3]):
        flusher.emit(point(1))
    flushers[2]._started = True  # a started flusher is drained by its app's cleanup
    asyncio.run(flushers[3].close())
    _drain_unstarted_at_exit()
    assert (holding.written, holding.closed) == ([1], True)
    assert (empty.closed, started.closed, started.written) == (False, False, [])
    assert closed.written == [1]  # by its own close, not again
    _drain_unstarted_at_exit()  # closed now: nothing sent twice
    assert holding.written == [1]

    # A flusher passed over (empty, started) does not end the drain: with several of each,
    # in the WeakSet's arbitrary order, every holding one is still drained.
    sinks = [ScriptedSink() for _ in range(15)]
    several = [Flusher([sink], make_policy()) for sink in sinks]
    for number, flusher in enumerate(several):
        only_these_flushers.add(flusher)
        if number % 3:
            flusher.emit(point(number))
        if number % 3 == 2:
            flusher._started = True
    _drain_unstarted_at_exit()
    assert [sink.written for sink in sinks] == [
        [number] if number % 3 == 1 else [] for number in range(15)
    ]

    # A drain that fails is logged, and the next flusher is still drained.
    first, second = ScriptedSink(), ScriptedSink()
    failing, other = Flusher([first], make_policy()), Flusher([second], make_policy())
    only_these_flushers.add(failing)
    only_these_flushers.add(other)
    failing.emit(point(2))
    other.emit(point(3))
    broken = RuntimeError("cannot drain " + "d" * 2000)

    async def raising_close() -> None:
        raise broken

    monkeypatch.setattr(failing, "close", raising_close)
    with capture_logs() as logs:
        _drain_unstarted_at_exit()
    assert logs == [
        {"event": "drain_at_exit_failed", "error": repr(broken)[:1024], "log_level": "error"}
    ]
    assert second.written == [3]


@pytest.mark.skipif(
    "MUTANT_UNDER_TEST" in os.environ,
    reason="under mutmut a trampoline holds the batch too, so it is never freed in slices",
)
@pytest.mark.parametrize(("size", "slices"), [(400, 0), (1000, 1), (1200, 2)])
async def test_a_written_batch_is_freed_in_slices_a_loop_turn_apart(
    monkeypatch: pytest.MonkeyPatch, size: int, slices: int
) -> None:
    # 500 points per loop turn, only when the flusher holds the only reference.
    class KeepsSome(ScriptedSink):
        keep = False

        async def write(self, points: Sequence[Point]) -> None:
            if self.keep:
                self.batches.append(points)  # type: ignore[arg-type]  # the list itself

    sleeps: list[float] = []
    real_sleep = asyncio.sleep

    async def recording_sleep(delay: float) -> None:
        sleeps.append(delay)
        await real_sleep(0)

    sink = KeepsSome()
    flusher = Flusher([sink], make_policy(batch_size=size, buffer_size=size))
    for round_ in range(2):
        for i in range(size):
            flusher.emit(point(i))
        sink.keep = round_ == 1
        sleeps.clear()
        monkeypatch.setattr(asyncio, "sleep", recording_sleep)
        await asyncio.wait_for(flusher.flush(), 5.0)
        monkeypatch.undo()
        if round_ == 0:
            assert sleeps == [0] * slices
        else:  # the sink kept the list: it is left alone
            assert (sleeps, len(sink.batches[0])) == ([], size)
    assert flusher.stats()["scripted"]["written"] == 2 * size
    await flusher.close()


# ----------------------------------------------------------------- SinkError.pending
# A sink that stores a batch in parts says which points are not stored: the others are
# written at once, only the pending ones are retried, refused or split (RELIABILITY 36).


class PartSink(ScriptedSink):
    """Each scripted failure stores the batch's even-numbered points (``stored``) and
    raises with ``pending`` = the others; the invariant is checked at every write."""

    flusher: Flusher | None = None

    def __init__(self, script: Sequence[BaseException | None] = ()) -> None:
        super().__init__(script)
        self.seen: list[list[int]] = []
        self.stored: list[int] = []

    async def write(self, points: Sequence[Point]) -> None:
        assert self.flusher is not None
        assert_invariant(self.flusher.stats()["scripted"])
        self.seen.append([p.time_ns for p in points])
        outcome = self.script.pop(0) if self.script else None
        if outcome is None:
            self.stored += [p.time_ns for p in points]
            return
        if isinstance(outcome, SinkError):
            self.stored += [p.time_ns for p in points if p.time_ns % 2 == 0]
            outcome.pending = [p for p in points if p.time_ns % 2]
        raise outcome


def part_flusher(sink: PartSink, **settings: Any) -> Flusher:
    flusher = Flusher(
        [sink], make_policy(**{"batch_size": 8, "retry_base_delay": 0.01, **settings})
    )
    sink.flusher = flusher
    for i in range(8):
        flusher.emit(point(i))
    return flusher


async def test_a_retryable_failure_counts_the_stored_part_written_and_retries_the_rest() -> None:
    sink = PartSink([SinkError("busy", retryable=True, status=503)])
    flusher = part_flusher(sink)
    await flusher.flush()
    stats = flusher.stats()["scripted"]
    assert (stats["written"], stats["buffered"], stats["retries"]) == (4, 4, 1)
    assert_invariant(stats)
    await flusher.flush()
    assert sink.seen == [list(range(8)), [1, 3, 5, 7]]  # the stored part never again
    assert sorted(sink.stored) == list(range(8))
    assert flusher.stats()["scripted"]["written"] == 8
    await flusher.close()


async def test_a_refused_batch_rejects_only_its_pending_points() -> None:
    sink = PartSink([SinkError("refused", retryable=False, status=400, delivered=1)])
    flusher = part_flusher(sink)
    await flusher.flush()
    stats = flusher.stats()["scripted"]
    assert (stats["written"], stats["dropped"]["rejected"], stats["buffered"]) == (4, 4, 0)
    await flusher.close()


async def test_a_413_splits_only_the_pending_points() -> None:
    sink = PartSink([BatchTooLarge()])
    flusher = part_flusher(sink)
    await flusher.flush()
    assert sink.seen == [list(range(8)), [1, 3], [5, 7]]
    stats = flusher.stats()["scripted"]
    assert (stats["written"], stats["dropped"]["rejected"]) == (8, 0)
    await flusher.close()


async def test_nothing_pending_after_a_retryable_failure_is_all_written() -> None:
    class AllStored(PartSink):
        async def write(self, points: Sequence[Point]) -> None:
            self.seen.append([p.time_ns for p in points])
            raise SinkError("answer lost, rows found", retryable=True, pending=[])

    sink = AllStored()
    flusher = part_flusher(sink)
    await flusher.flush()
    stats = flusher.stats()["scripted"]
    assert (stats["written"], stats["buffered"], stats["retries"]) == (8, 0, 0)
    await flusher.close()


async def test_at_shutdown_the_stored_part_of_a_pending_batch_is_written() -> None:
    busy = [SinkError("busy", retryable=True, status=503) for _ in range(100)]
    sink = PartSink(busy)
    flusher = part_flusher(sink, shutdown_timeout=0.2, retry_max_delay=0.05)
    await flusher.start()
    await flusher.close()
    stats = flusher.stats()["scripted"]
    assert (stats["written"], stats["dropped"]["shutdown"]) == (len(set(sink.stored)), 4)
    assert stats["written"] == 4
    assert_invariant(stats)


async def test_a_sink_that_writes_again_after_failing_says_so_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = iter([100.0, 107.12345])  # the first failure, then the write that succeeds
    monkeypatch.setattr("lunamon.flusher._now", lambda: next(clock))
    errors: list[BaseException | None] = [
        ConnectionRefusedError("refused"),
        SinkError("503", retryable=True, status=503),
    ]
    sink = ScriptedSink(errors)
    flusher = Flusher([sink], FAST)
    channel = flusher._channels[0]
    for i in range(4):
        flusher.emit(point(i))
    channel.dropped["overflow"] += 1  # as if one was dropped before the outage
    channel.emitted += 1
    with capture_logs() as logs:
        assert not await flusher._attempt_all(channel)
        assert not await flusher._attempt_all(channel)
        channel.dropped["overflow"] += 2  # as if two were dropped during the outage
        channel.emitted += 2
        flusher.emit(point(4))
        assert await flusher._attempt_all(channel)  # back: the whole backlog at once
        flusher.emit(point(5))
        assert await flusher._attempt_all(channel)  # no second line
    recovered = [e for e in logs if e["event"] == "sink_recovered"]
    assert recovered == [
        {
            "event": "sink_recovered",
            "log_level": "info",
            "sink": "scripted",
            "down_seconds": 7.123,  # to the ms
            "delivered_late": 5,
            "dropped_meanwhile": 2,
        }
    ]
    assert channel.failing is None


async def test_a_retryable_error_stores_nothing_whatever_it_counted_delivered() -> None:
    # Retryable means the sink cannot say what it stored: the whole batch is sent again.
    sink = ScriptedSink([SinkError("503", retryable=True, status=503, delivered=2)])
    flusher = Flusher([sink], FAST)
    channel = flusher._channels[0]
    for i in range(4):
        flusher.emit(point(i))
    assert not await flusher._attempt_all(channel)
    assert flusher.stats()["scripted"]["written"] == 0
    assert await flusher._attempt_all(channel)
    assert sink.written == [0, 1, 2, 3]
    stats = flusher.stats()["scripted"]
    assert (stats["written"], stats["retries"]) == (4, 1)
    assert_invariant(stats)


async def test_a_batch_taken_behind_a_packed_backlog_holds_the_front_at_its_first_point() -> None:
    # lunamon.spool acknowledges up to the front: a batch partly stored must hold it at
    # the batch's first point until the batch is done, packed points behind it or not.
    sink = PartSink([ConnectionRefusedError("down"), None, SinkError("503", retryable=True)])
    flusher = part_flusher(sink)  # points 0..7: the first batch
    channel = flusher._channels[0]
    assert not await flusher._attempt_all(channel)  # down: 0..7 stay in flight
    for i in range(8, 8 + 8 + 2 * PACK_RUN):
        flusher.emit(point(i))
    assert channel.packed > 0
    assert not await flusher._attempt_all(channel)  # 0..7 stored, then 8..15 half stored
    assert sink.seen[1:] == [list(range(8)), list(range(8, 16))]
    assert [p.time_ns for p in channel.inflight or ()] == [9, 11, 13, 15]
    assert flusher.fronts() == {"scripted": 8}
    await flusher.close()


async def test_a_failed_write_the_sink_stored_all_the_same_goes_on_to_the_next_batch() -> None:
    # E.g. ClickHouse answering late: the sink found every row stored (nothing pending).
    stored = SinkError("answer lost", retryable=True, status=503, pending=[])
    sink = ScriptedSink([stored])
    flusher = Flusher([sink], FAST)
    channel = flusher._channels[0]
    for i in range(15):
        flusher.emit(point(i))
    assert await flusher._attempt_all(channel)  # both batches done, no wait for a retry
    assert sink.written == list(range(10, 15))  # the first raised, but was stored
    stats = flusher.stats()["scripted"]
    assert (stats["written"], stats["retries"], stats["buffered"]) == (15, 0, 0)
    assert_invariant(stats)
