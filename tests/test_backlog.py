"""Points waiting behind a slow or dead sink are packed (lunamon/_backlog.py): they come
back equal and in order, every count stays exact, and they take a fraction of the memory."""

from __future__ import annotations

import tracemalloc
from collections.abc import Sequence
from typing import Any

from lunamon import MonitoringSettings, Point
from lunamon._backlog import PACK_RUN, PackedPoints
from lunamon._ids import new_request_id
from lunamon.flusher import Flusher, SinkStats
from lunamon.point import TagSet

STEPS = [f"step_{n}_time" for n in range(9)]


def _assert_invariant(stats: SinkStats) -> None:
    dropped = sum(stats["dropped"].values())
    assert stats["emitted"] == stats["written"] + dropped + stats["buffered"], stats


def _seed_points(n: int, start: int = 0) -> list[Point]:
    """Request points as the recorder makes them: one shared TagSet, eleven fields."""
    tags = TagSet(service="svc", route="POST:/handlers/{handlerId}/events", status_code="200")
    points = []
    for i in range(start, start + n):
        fields: dict[str, Any] = {"request_id": new_request_id(), "execution_time": i / 7}
        for k, step in enumerate(STEPS):
            fields[step] = (i + k) / 1000
        points.append(Point.trusted("request", 10**18 + i * 1000, tags, fields))
    return points


def test_packed_points_come_back_equal_in_order_with_their_tags_object() -> None:
    shared = TagSet(service="svc", route="GET:/a", status_code="200")
    points = [
        Point.trusted("request", 1, shared, {"request_id": "r1", "execution_time": 0.5}),
        Point("error", -5, {"error_code": "7"}, {"request_id": 'q"\\\n', "n": 2**62}),
        Point.trusted("request", 3, shared, {"execution_time": -0.0, "ok": True, "f": False}),
        Point("custom", 4, {}, {"ü": "ünï", "x": 1e308, "i": -1}),
        Point.trusted("request", 5, shared, {"request_id": "r5", "execution_time": 0.25}),
    ]
    packed = PackedPoints(points)
    assert len(packed) == 5
    back = [packed.popleft() for _ in range(5)]
    assert back == points
    assert back[0].tags is shared
    assert back[4].tags is shared
    for before, after in zip(points, back, strict=True):
        assert list(after.fields) == list(before.fields)  # field order kept
        for key, value in before.fields.items():
            assert type(after.fields[key]) is type(value)
    assert str(back[2].fields["execution_time"]) == "-0.0"
    assert len(packed) == 0


def test_points_alike_but_for_their_tags_keep_their_own_tags() -> None:
    a, b = {"route": "GET:/a"}, {"route": "GET:/b"}
    points = [Point.trusted("request", n, tags, {"execution_time": n / 3}) for n, tags in
              enumerate([a, b, a, b])]  # fmt: skip
    packed = PackedPoints(points)
    back = [packed.popleft() for _ in range(4)]
    assert [p.tags for p in back] == [a, b, a, b]
    assert back[1].tags is b


class _Carrying(Point):
    """A point carrying a fifth item, as `lunamon send` forwards a line as read."""

    __slots__ = ()


def test_other_kinds_of_points_are_kept_whole_in_a_run() -> None:
    plain = _seed_points(3)
    carrying = tuple.__new__(_Carrying, ("request", 7, {"a": "b"}, {"x": 1.5}, "raw line"))
    points = [plain[0], carrying, plain[1], carrying, plain[2]]
    packed = PackedPoints(points)
    assert packed.popleft() == plain[0]
    assert packed.popleft() is carrying
    packed.skip()
    packed.skip()  # a whole one skipped
    assert packed.popleft() == plain[2]
    assert len(packed) == 0


async def test_a_backlog_of_forwarded_lines_is_left_plain() -> None:
    sink = DownSink()
    flusher = await _failing(sink, batch_size=100, buffer_size=10_000)
    for n in range(1_000):
        flusher.emit(tuple.__new__(_Carrying, ("request", n, {}, {"x": 1.0}, f"line {n}")))
    assert flusher._channels[0].packed == 0
    assert flusher.stats()["down"]["buffered"] == 1_001
    await flusher.close()


def test_skipped_points_are_passed_over_exactly() -> None:
    points = _seed_points(6)
    points[2] = Point("other", 9, {"a": "b"}, {"count": 3, "label": "x"})  # another layout
    packed = PackedPoints(points)
    packed.skip()
    assert packed.popleft() == points[1]
    packed.skip()  # the odd one: its integer and string are skipped, no float
    assert [packed.popleft() for _ in range(3)] == points[3:]


class DownSink:
    """Refuses every write with a connection error (retried, never rejected) until up."""

    name = "down"

    def __init__(self) -> None:
        self.up = False
        self.points: list[Point] = []
        self.batches: list[int] = []

    async def start(self) -> None:
        return None

    async def write(self, points: Sequence[Point]) -> None:
        if not self.up:
            raise ConnectionRefusedError("nothing listening")
        self.points.extend(points)
        self.batches.append(len(points))

    async def close(self) -> None:
        return None


def _flusher(sink: DownSink, **settings: Any) -> Flusher:
    return Flusher([sink], MonitoringSettings(max_retries=10**6, **settings).flush_policy())


async def _failing(sink: DownSink, **settings: Any) -> Flusher:
    """A flusher whose sink is down: one point in flight, its write failed once."""
    flusher = _flusher(sink, **settings)
    flusher.emit(Point("request", 1, {}, {"execution_time": 0.5}))
    await flusher.flush()
    assert flusher._channels[0].attempts == 1
    return flusher


async def test_a_backlog_is_packed_and_delivered_exactly_once_in_order() -> None:
    sink = DownSink()
    flusher = _flusher(sink, batch_size=50, buffer_size=2_000)
    channel = flusher._channels[0]
    points = _seed_points(3_000)
    await flusher.flush()  # started; the first attempt fails and is retried later
    for number, p in enumerate(points, 1):
        flusher.emit(p)
        if number % 97 == 0:
            _assert_invariant(flusher.stats()["down"])
            await flusher.flush()  # a failed attempt: the batch in flight stays
    stats = flusher.stats()["down"]
    _assert_invariant(stats)
    assert channel.packed > 1_000  # most of what waits is packed
    assert stats["buffered"] == 2_000
    assert stats["dropped"]["overflow"] == 1_000
    sink.up = True
    for _ in range(100):  # bounded: 2,000 points in batches of 50
        await flusher.flush()
        if not flusher.stats()["down"]["buffered"]:
            break
    stats = flusher.stats()["down"]
    _assert_invariant(stats)
    assert stats["written"] == 2_000
    assert channel.packed == 0
    # The batch in flight when the overflow began, then the newest points, in order.
    in_flight = points[:50]
    assert sink.points[:50] == in_flight
    assert sink.points[50:] == points[-1_950:]
    assert set(sink.batches) == {50}  # a batch that reaches into a packed run stays a batch
    await flusher.close()


async def test_a_sink_that_lags_without_failing_is_never_packed() -> None:
    sink = DownSink()
    sink.up = True
    flusher = _flusher(sink, batch_size=100, buffer_size=10_000)
    for p in _seed_points(2_000):
        flusher.emit(p)  # no write yet: far more than a batch and a run wait
    assert flusher._channels[0].packed == 0
    await flusher.close()


async def test_a_sink_that_keeps_up_never_sees_a_packed_point() -> None:
    sink = DownSink()
    sink.up = True
    flusher = _flusher(sink, batch_size=100, buffer_size=10_000)
    channel = flusher._channels[0]
    points = _seed_points(1_000)
    for start in range(0, 1_000, 100):
        for p in points[start : start + 100]:
            flusher.emit(p)
        assert channel.packed == 0
        await flusher.flush()
    assert sink.points == points
    assert all(p is q for p, q in zip(sink.points, points, strict=True))  # the same objects
    await flusher.close()


async def test_packing_starts_a_run_beyond_a_batch_and_goes_on_run_by_run() -> None:
    sink = DownSink()
    flusher = await _failing(sink, batch_size=100, buffer_size=10_000)
    channel = flusher._channels[0]
    points = iter(_seed_points(100 + 3 * PACK_RUN + 1))

    def emit(n: int) -> None:
        for _ in range(n):
            flusher.emit(next(points))

    emit(100 + PACK_RUN)
    assert channel.packed == 0  # a batch and a run wait: not yet
    emit(1)
    # The newest run and one, packed; the oldest batch stays plain for the next write.
    assert channel.packed == PACK_RUN
    assert len(channel.buffer) == 100 + 1
    emit(PACK_RUN - 1)
    assert channel.packed == PACK_RUN  # the next run is not complete
    emit(1)
    assert channel.packed == PACK_RUN + PACK_RUN - 1
    assert flusher.stats()["down"]["buffered"] == 1 + 100 + 2 * PACK_RUN + 1  # 1 in flight
    await flusher.close()


async def test_a_run_too_short_to_pack_is_left_plain() -> None:
    # batch_size 300: the first run is packed after 557 points, behind a plain batch. Once
    # a write took that batch, the next trigger finds a single plain point beyond a batch.
    sink = DownSink()
    flusher = await _failing(sink, batch_size=300, buffer_size=10_000)
    channel = flusher._channels[0]
    points = _seed_points(857)
    for p in points[:557]:
        flusher.emit(p)
    assert channel.packed == PACK_RUN
    assert channel.take(300) == points[:300]
    for p in points[557:]:
        flusher.emit(p)
    stats = flusher.stats()["down"]
    assert stats["buffered"] == 557 + 1  # and the one in flight
    assert channel.take(557) == points[300:]
    assert (channel.packed, len(channel.buffer)) == (0, 0)
    await flusher.close()


async def _behind_a_packed_backlog() -> Flusher:
    """A flusher whose sink is down, one point in flight and 1,000 behind it, packed."""
    flusher = await _failing(DownSink(), batch_size=100, buffer_size=10_000)
    for p in _seed_points(1_000):
        flusher.emit(p)
    assert flusher._channels[0].packed > 0
    return flusher


async def test_a_forked_child_packs_its_own_backlog_again() -> None:
    flusher = await _behind_a_packed_backlog()
    channel = flusher._channels[0]
    assert channel.failing is not None
    flusher._reset_after_fork()  # what a forked child does: the parent sends these
    assert (channel.packed, len(channel.buffer)) == (0, 0)
    assert channel.failing is None  # the child's sink has not failed yet
    flusher.emit(Point("request", 1, {}, {"execution_time": 0.5}))
    await flusher.flush()  # the child's own sink is down too
    for p in _seed_points(1_000, start=5_000):
        flusher.emit(p)
    assert channel.packed > 0
    stats = flusher.stats()["down"]
    assert stats["buffered"] == 1_001
    _assert_invariant({**stats, "emitted": stats["emitted"] - 1_001})  # the parent's 1,001
    await flusher.close()


async def test_buffered_points_behind_a_dead_sink_take_under_400_bytes_each() -> None:
    # BENCHMARKS.md section 5: 100,000 buffered seed points in 40 MB. Measured here for
    # 20,000 with tracemalloc: what the buffer holds, not the interpreter around it.
    sink = DownSink()
    flusher = await _failing(sink, batch_size=500, buffer_size=20_000)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for start in range(0, 20_000, 1_000):  # made inside the trace, kept only by the buffer
            for p in _seed_points(1_000, start):
                flusher.emit(p)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert flusher.stats()["down"]["buffered"] == 20_000  # one in flight, one overflowed
    assert flusher._channels[0].packed > 15_000
    assert used / 20_000 < 400, f"{used / 20_000:.0f} bytes a point"
    await flusher.close()


# ------------------------------------------------------------------ a dead process's points
# Flusher.emit_to and room: what lunamon.spool replays into one sink's buffer.


async def test_replayed_points_keep_the_bound_and_the_counts_of_emit() -> None:
    sink = DownSink()
    flusher = await _failing(sink, batch_size=10, buffer_size=20)  # one point in flight
    channel = flusher._channels[0]
    assert flusher.room("down") == 10 - 1
    points = _seed_points(25)
    assert flusher.emit_to("down", points[:4]) == 1  # the position of the first
    assert flusher.room("down") == 10 - 5
    assert flusher.emit_to("down", points[4:]) == 5
    assert list(channel.buffer) == points[6:]  # 19 beside the one in flight: oldest dropped
    stats = flusher.stats()["down"]
    assert (stats["emitted"], stats["buffered"]) == (26, 20)
    assert {k: n for k, n in stats["dropped"].items() if n} == {"overflow": 6}
    _assert_invariant(stats)
    assert flusher.room("down") == 10 - 20
    await flusher.close()


async def test_replayed_points_past_a_batch_in_flight_that_fills_the_bound_are_counted() -> None:
    sink = DownSink()
    flusher = _flusher(sink, batch_size=10, buffer_size=10)
    for p in _seed_points(10):
        flusher.emit(p)
    await flusher.flush()  # the whole bound is in flight now, and failed
    channel = flusher._channels[0]
    assert (len(channel.buffer), channel.capacity) == (0, 0)
    assert flusher.emit_to("down", _seed_points(3, start=100)) == 10
    stats = flusher.stats()["down"]
    assert (stats["emitted"], stats["buffered"], stats["dropped"]["overflow"]) == (13, 10, 3)
    assert not channel.buffer
    await flusher.close()


async def test_replayed_points_after_close_are_counted_and_dropped() -> None:
    sink = DownSink()
    flusher = _flusher(sink, batch_size=10, buffer_size=20, shutdown_timeout=0.05)
    await flusher.flush()
    await flusher.close()
    before = flusher.stats()["down"]
    assert flusher.emit_to("down", _seed_points(3)) == before["emitted"]
    stats = flusher.stats()["down"]
    assert stats["emitted"] == before["emitted"] + 3
    assert stats["dropped"]["after_close"] == before["dropped"].get("after_close", 0) + 3
    assert stats["buffered"] == before["buffered"]
    _assert_invariant(stats)


async def test_replayed_points_wake_the_sink_unless_it_is_backing_off() -> None:
    sink = DownSink()
    flusher = _flusher(sink, batch_size=10, buffer_size=20)
    await flusher.flush()  # started: the sink's task waits on its wake event
    channel = flusher._channels[0]
    assert channel.wake is not None
    channel.wake.clear()
    channel.backing_off = True  # waiting out a retry delay: not woken early
    flusher.emit_to("down", _seed_points(1))
    assert not channel.wake.is_set()
    channel.backing_off = False
    flusher.emit_to("down", _seed_points(1))
    assert channel.wake.is_set()
    await flusher.close()


def test_room_is_half_the_bound_and_at_least_one() -> None:
    assert _flusher(DownSink(), batch_size=1, buffer_size=3).room("down") == 1
    assert _flusher(DownSink(), batch_size=1, buffer_size=1).room("down") == 1


async def test_the_front_counts_packed_points_as_not_done() -> None:
    flusher = await _behind_a_packed_backlog()
    channel = flusher._channels[0]
    assert flusher.fronts() == {"down": 0}  # the batch in flight holds position 0
    channel.set_inflight(None)  # as once that batch is done
    assert flusher.fronts() == {"down": 1}
    assert flusher.positions() == {"down": 1_001}
    await flusher.close()


async def test_a_point_of_another_type_ends_no_packed_run() -> None:
    class OwnPoint(Point):
        __slots__ = ()

    sink = DownSink()
    flusher = await _failing(sink, batch_size=10, buffer_size=1_000)
    channel = flusher._channels[0]
    plain = _seed_points(channel.pack_at)
    for p in plain:
        flusher.emit(p)
    assert channel.packed == 0  # not yet past the point that packs
    own = OwnPoint("request", 5, {"route": "GET:/own"}, {"execution_time": 0.5})
    flusher.emit(own)  # packing is due, but the newest point is not the recorder's kind
    assert channel.packed == 0
    taken = channel.take(len(channel.buffer))
    assert taken == [*plain, own]
    assert type(taken[-1]) is OwnPoint
    await flusher.close()
