"""``Flusher.emitter()``, what the hot path calls instead of ``Flusher.emit``: step for
step, it must leave every channel as the reference leaves it.

Two flushers with the same sinks' names and policy take the same points, one through
``emit`` (the reference), the other through ``emitter()`` (``lunamon._speedups.Emitter``
when built); after every point their channels are compared: counters, buffers, drops,
the wake-up. The cases are the ones where the compiled path must hand the point to the
reference: a batch completed, the bound reached (with and without a batch in flight),
packed points, a closed flusher, a test tap listening.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import lunamon.flusher
from lunamon import MemorySink, MonitoringSettings, Point
from lunamon._backlog import PackedPoints
from lunamon.flusher import Flusher
from lunamon.monitoring import Monitoring
from lunamon.testing import capture_points


def point(i: int) -> Point:
    return Point.trusted("request", i, {"route": "GET:/x"}, {"execution_time": float(i)})


def state(flusher: Flusher) -> list[tuple[Any, ...]]:
    """Everything emit may change, per channel."""
    return [
        (
            c.emitted,
            [p.time_ns if type(p) is Point else ("packed", len(p)) for p in c.buffer],
            c.packed,
            dict(c.dropped),
            c.wake.is_set() if c.wake is not None else None,
        )
        for c in flusher._channels
    ]


def pair(
    sinks: int = 1, **settings: Any
) -> tuple[Flusher, Callable[[Point], None], Flusher, Callable[[Point], None]]:
    policy = MonitoringSettings(**{"batch_size": 4, "buffer_size": 10, **settings}).flush_policy()
    reference = Flusher([MemorySink() for _ in range(sinks)], policy)
    compiled = Flusher([MemorySink() for _ in range(sinks)], policy)
    return reference, reference.emit, compiled, compiled.emitter()


def emit_both(
    reference: Flusher,
    emit: Callable[[Point], None],
    compiled: Flusher,
    emitter: Callable[[Point], None],
    points: range,
) -> None:
    for i in points:
        emit(point(i))
        emitter(point(i))
        assert state(compiled) == state(reference), f"after point {i}"


def with_events(*flushers: Flusher) -> None:
    for flusher in flushers:
        for channel in flusher._channels:
            channel.wake = asyncio.Event()


def test_the_hot_path_emits_through_the_compiled_emitter_when_built() -> None:
    monitoring = Monitoring(MonitoringSettings(service="svc"), [MemorySink()])
    if lunamon.flusher._Emitter is None:  # LUNAMON_PURE_PYTHON=1, or built without a compiler
        assert monitoring.emit == monitoring._flusher.emit
    else:
        assert type(monitoring.emit) is lunamon.flusher._Emitter
        assert isinstance(monitoring._flusher._channels[0], lunamon.flusher._ChannelBase)
        assert lunamon.flusher._ChannelBase.__module__ == "lunamon._speedups"


async def test_batches_complete_and_wake_the_task_as_the_reference_does() -> None:
    reference, emit, compiled, emitter = pair()
    with_events(reference, compiled)
    emit_both(reference, emit, compiled, emitter, range(3))
    assert not compiled._channels[0].wake.is_set()  # type: ignore[union-attr]
    emit_both(reference, emit, compiled, emitter, range(3, 4))  # the 4th completes a batch
    assert compiled._channels[0].wake.is_set()  # type: ignore[union-attr]
    compiled._channels[0].wake.clear()  # type: ignore[union-attr]
    reference._channels[0].wake.clear()  # type: ignore[union-attr]
    emit_both(reference, emit, compiled, emitter, range(4, 6))  # past a batch: every one wakes
    assert compiled._channels[0].wake.is_set()  # type: ignore[union-attr]


def test_the_bound_drops_the_oldest_as_the_reference_does() -> None:
    reference, emit, compiled, emitter = pair(batch_size=5, buffer_size=5)
    emit_both(reference, emit, compiled, emitter, range(12))
    assert compiled._channels[0].dropped["overflow"] == 7
    assert state(compiled)[0][1] == [7, 8, 9, 10, 11]


def test_a_batch_in_flight_takes_its_share_of_the_bound() -> None:
    reference, emit, compiled, emitter = pair(batch_size=6, buffer_size=6)
    for flusher in (reference, compiled):
        flusher._channels[0].set_inflight([point(-1), point(-2), point(-3), point(-4)])
    emit_both(reference, emit, compiled, emitter, range(5))
    assert compiled._channels[0].dropped["overflow"] == 3
    for flusher in (reference, compiled):
        flusher._channels[0].set_inflight([point(-1)] * 6)  # the whole bound in flight
    emit_both(reference, emit, compiled, emitter, range(5, 8))


def test_packed_points_count_towards_the_bound_and_the_batch() -> None:
    reference, emit, compiled, emitter = pair(batch_size=8, buffer_size=8)
    for flusher in (reference, compiled):
        channel = flusher._channels[0]
        channel.buffer.append(PackedPoints([point(-3), point(-2), point(-1)]))
        channel.packed = 2
        channel.emitted = 3
    emit_both(reference, emit, compiled, emitter, range(8))
    assert compiled._channels[0].dropped["overflow"] == 3


def test_every_sink_gets_the_point_and_one_full_sink_sends_it_to_the_reference() -> None:
    reference, emit, compiled, emitter = pair(sinks=3, batch_size=6, buffer_size=6)
    emit_both(reference, emit, compiled, emitter, range(4))
    for flusher in (reference, compiled):
        flusher._channels[1].set_inflight([point(-1), point(-2)])  # only the second is full
    emit_both(reference, emit, compiled, emitter, range(4, 9))
    assert [c.dropped["overflow"] for c in compiled._channels] == [3, 5, 3]


async def test_after_close_points_are_counted_as_after_close() -> None:
    reference, emit, compiled, emitter = pair(sinks=2)
    emit_both(reference, emit, compiled, emitter, range(2))
    await reference.close()
    await compiled.close()
    emit_both(reference, emit, compiled, emitter, range(2, 5))
    assert [c.dropped["after_close"] for c in compiled._channels] == [3, 3]


def test_a_test_tap_sees_every_point_the_emitter_takes() -> None:
    reference, emit, compiled, emitter = pair()
    with capture_points() as captured:
        emit_both(reference, emit, compiled, emitter, range(2))
    assert [p.time_ns for p in captured] == [0, 0, 1, 1]  # each point, from both flushers
    emit_both(reference, emit, compiled, emitter, range(2, 3))
    assert len(captured) == 4  # the tap is gone


def test_stats_keep_their_invariant_through_the_emitter() -> None:
    reference, emit, compiled, emitter = pair(sinks=2, batch_size=5, buffer_size=5)
    emit_both(reference, emit, compiled, emitter, range(9))
    for stats in compiled.stats().values():
        assert stats["emitted"] == 9
        assert (
            stats["emitted"]
            == stats["written"] + sum(stats["dropped"].values()) + stats["buffered"]
        )
    assert compiled.stats() == reference.stats()


def test_a_common_point_never_reaches_the_reference() -> None:
    """The compiled emitter's whole point: the common point costs no Python frame."""
    policy = MonitoringSettings(batch_size=3, buffer_size=3).flush_policy()
    flusher = Flusher([MemorySink(), MemorySink()], policy)
    if lunamon.flusher._Emitter is None:  # pure Python: the reference is all there is
        assert flusher.emitter() == flusher.emit
        return
    handed: list[Point] = []
    emitter = lunamon.flusher._Emitter(flusher._channels, lunamon.flusher._taps, handed.append)
    emitter(point(0))
    emitter(point(1))
    assert handed == []
    assert [(c.emitted, len(c.buffer)) for c in flusher._channels] == [(2, 2), (2, 2)]
    emitter(point(2))  # completes a batch: the reference decides
    assert [p.time_ns for p in handed] == [2]
    assert [(c.emitted, len(c.buffer)) for c in flusher._channels] == [(2, 2), (2, 2)]
