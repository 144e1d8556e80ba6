"""``lunamon send``: ship a line-protocol file into InfluxDB or ClickHouse through
lunamon's own delivery, in batches while the file is read.

The points go through a :class:`~lunamon.monitoring.Monitoring` per
connection (``--connections``, 2 by default: the server works on one batch
while the next one travels), so batching, retries with backoff,
``Retry-After``, splitting on 413 and the drop accounting are exactly those of
a monitored service. Memory stays flat: the reader is held back while
``window`` batches per connection wait for the sink, and goes on each time a
write attempt ends. Into InfluxDB, the lines the reader
checked on its fast path are forwarded as they were read (:func:`forwarded`),
not rebuilt into points and encoded again.

Sending a file twice stores each point once: InfluxDB keeps one point per series,
tag set and time; into ClickHouse, whose tables keep every row, each INSERT first
asks which of its points' times the table holds and sends the others only
(:class:`~lunamon.sinks.clickhouse.ClickHouseSink`'s ``check_existing``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Final

from lunamon.cli.influxql import InfluxTarget, ping
from lunamon.flusher import SinkStats
from lunamon.lineprotocol import Record
from lunamon.monitoring import Monitoring
from lunamon.point import FieldValue, Point
from lunamon.settings import MonitoringSettings
from lunamon.sinks._http import compress
from lunamon.sinks.base import Sink, sink_name
from lunamon.sinks.clickhouse import ClickHouseSink
from lunamon.sinks.influxdb import InfluxDBSink

__all__ = ["deliver", "forwarded", "send_points"]

# The command line sends with the library's own defaults (defined once, in settings).
_DEFAULTS: Final = MonitoringSettings()
BATCH_SIZE: Final = _DEFAULTS.batch_size
MAX_RETRIES: Final = _DEFAULTS.max_retries
WINDOW: Final = 3  # batches buffered per connection at most: the reader waits beyond
_YIELD_EVERY: Final = 256  # points read between two turns of the event loop (~1 ms)


async def send_points(
    points: Iterable[Point],
    target: InfluxTarget,
    *,
    batch_size: int = BATCH_SIZE,
    max_retries: int = MAX_RETRIES,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, SinkStats]:
    """Write ``points`` to ``target``; returns the stats (per sink name, as
    :meth:`Monitoring.stats`) once every point is written or dropped
    (``on_progress`` gets the number done so far)."""
    await ping(target)
    return await deliver(
        points,
        target.sink(),
        batch_size=batch_size,
        max_retries=max_retries,
        on_progress=on_progress,
    )


class _Line(Point):
    """A point the reader checked on its fast path, with the line it was read from:
    sent to InfluxDB as that line. (A fifth item after the point's four.)"""

    __slots__ = ()

    @classmethod
    def of(
        cls,
        series: str,
        time_ns: int,
        tags: dict[str, str],
        fields: dict[str, FieldValue],
        line: str,
    ) -> _Line:
        """The reader's checked parts and their line (no checks, as :meth:`Point.trusted`)."""
        return tuple.__new__(cls, (series, time_ns, tags, fields, line))

    def to_line_protocol(self) -> str:
        return self[4]  # type: ignore[no-any-return]


def forwarded(records: Iterable[Record]) -> Iterator[Point]:
    """Points of the reader's records, those of its fast path carrying their line."""
    for record in records:
        if type(record) is Point:
            yield record
            continue
        head, shape, groups, floats, time_ns, line = record
        fields = shape.fields(groups, floats)
        yield _Line.of(head.series, time_ns, head.tags, fields, line)


def _body(points: Sequence[Point]) -> bytes:
    """The line-protocol body of a batch: forwarded lines as read, other points encoded."""
    lines = [p[4] if type(p) is _Line else p.to_line_protocol() for p in points]
    return ("\n".join(lines) + "\n").encode()


class _Watched:
    """The sink of a delivery: tells the reader each time a write attempt ends (there may
    be room again), and posts forwarded lines to InfluxDB as they are."""

    def __init__(self, sink: Sink, attempted: asyncio.Event) -> None:
        self.sink = sink
        self.name = sink_name(sink)
        self.attempted = attempted

    async def start(self) -> None:
        await self.sink.start()

    async def write(self, points: Sequence[Point]) -> None:
        try:
            sink = self.sink
            if isinstance(sink, InfluxDBSink):
                body = _body(points)
                await sink.send(await compress(body) if sink.gzip else body)
            else:
                await sink.write(points)
        finally:
            self.attempted.set()

    async def close(self) -> None:
        await self.sink.close()


async def deliver(
    points: Iterable[Point],
    sink: Sink | Sequence[Sink],
    *,
    batch_size: int = BATCH_SIZE,
    max_retries: int = MAX_RETRIES,
    on_progress: Callable[[int], None] | None = None,
    window: int = WINDOW,
    check_existing: bool = True,
) -> dict[str, SinkStats]:
    """``points`` into ``sink`` through a :class:`Monitoring` (batches, retries and
    accounting as in a service), taken from the iterable as the sink keeps up (at most
    ``window`` batches buffered); the stats once every point is written or dropped.

    Several sinks (of one destination) are several connections: one Monitoring each,
    the batches dealt out in turn, their stats added up under the first sink's name.
    ``on_progress`` gets the number of points written or dropped so far. With
    ``check_existing`` (the default), a ClickHouse sink sends only the points its table
    does not hold yet: the same points twice are stored once."""
    sinks = [sink] if isinstance(sink, Sink) else list(sink)
    for one in sinks:
        if check_existing and isinstance(one, ClickHouseSink):
            one.check_existing = True
    attempted = asyncio.Event()
    settings = MonitoringSettings(
        service="lunamon-send",
        batch_size=batch_size,
        buffer_size=batch_size * window,
        max_retries=max_retries,
        shutdown_timeout=30.0,
    )
    monitorings = [Monitoring(settings, [_Watched(s, attempted)]) for s in sinks]
    name = sink_name(sinks[0])

    def stats() -> dict[str, SinkStats]:
        return {name: _added([s for m in monitorings for s in m.stats().values()])}

    def progress() -> None:
        if on_progress is not None:
            total = stats()[name]
            on_progress(total["emitted"] - total["buffered"])

    async def room(monitoring: Monitoring, limit: int) -> None:
        """Until ``monitoring`` buffers at most ``limit`` points (its delivery task writes
        meanwhile): a batch emitted then is never dropped for want of room."""
        await asyncio.sleep(0)  # the delivery tasks take the batches just completed
        while True:
            progress()
            (own,) = monitoring.stats().values()
            if own["buffered"] <= limit:
                return
            attempted.clear()
            await attempted.wait()

    for monitoring in monitorings:
        await monitoring.start()
    try:
        turn = 0
        batch: list[Point] = []
        for point in points:
            batch.append(point)
            if len(batch) % _YIELD_EVERY == 0:
                # Reading holds the loop: let the delivery tasks take their answers and
                # post the next batches now, so that the server is not kept waiting.
                await asyncio.sleep(0)
            if len(batch) == batch_size:
                # A whole batch at once: a delivery task never takes a part of one.
                monitoring = monitorings[turn % len(monitorings)]
                await room(monitoring, batch_size * (window - 1))
                _emit_all(monitoring, batch)
                batch = []
                turn += 1
        monitoring = monitorings[turn % len(monitorings)]
        await room(monitoring, batch_size * (window - 1))
        _emit_all(monitoring, batch)
        # What is left: one attempt now, then the delivery tasks' retries until done.
        await asyncio.gather(*(m.flush() for m in monitorings))
        for monitoring in monitorings:
            await room(monitoring, 0)
    finally:
        await asyncio.gather(*(m.close() for m in monitorings))
    final = stats()
    if on_progress is not None:
        on_progress(final[name]["emitted"] - final[name]["buffered"])
    return final


def _emit_all(monitoring: Monitoring, points: list[Point]) -> None:
    emit = monitoring.emit
    for point in points:
        emit(point)


def _added(stats: list[SinkStats]) -> SinkStats:
    """The stats of several connections as one sink's."""
    total: SinkStats = {"emitted": 0, "written": 0, "retries": 0, "buffered": 0, "dropped": {}}
    for one in stats:
        for key in ("emitted", "written", "retries", "buffered"):
            total[key] += one[key]
        for reason, count in one["dropped"].items():
            total["dropped"][reason] = total["dropped"].get(reason, 0) + count
    return total
