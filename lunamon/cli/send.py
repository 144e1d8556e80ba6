"""``lunamon send``: ship a line-protocol file into InfluxDB through lunamon's own delivery.

The points go through a :class:`~lunamon.monitoring.Monitoring` with one
:class:`~lunamon.sinks.influxdb.InfluxDBSink`, so batching, retries with
backoff, ``Retry-After``, splitting on 413 and the drop accounting are
exactly those of a monitored service.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Final

from lunamon.cli.influxql import InfluxTarget, ping
from lunamon.flusher import SinkStats
from lunamon.monitoring import Monitoring
from lunamon.point import Point
from lunamon.settings import MonitoringSettings
from lunamon.sinks.base import Sink

__all__ = ["deliver", "send_points"]

_POLL: Final = 0.1  # seconds between progress updates


async def send_points(
    points: Sequence[Point],
    target: InfluxTarget,
    *,
    batch_size: int = 5000,
    max_retries: int = 10,
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


async def deliver(
    points: Sequence[Point],
    sink: Sink,
    *,
    batch_size: int = 5000,
    max_retries: int = 10,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, SinkStats]:
    """``points`` into ``sink`` through a :class:`Monitoring` (batches, retries and
    accounting as in a service); the stats once every point is written or dropped."""
    settings = MonitoringSettings(
        service="lunamon-send",
        batch_size=batch_size,
        buffer_size=max(len(points), batch_size),
        max_retries=max_retries,
        shutdown_timeout=30.0,
    )
    monitoring = Monitoring(settings, [sink])
    await monitoring.start()
    try:
        for point in points:
            monitoring.emit(point)
        # One immediate attempt at everything; failures stay under the retry rules.
        flush = asyncio.create_task(monitoring.flush())
        while True:
            (stats,) = monitoring.stats().values()
            if on_progress is not None:
                on_progress(stats["emitted"] - stats["buffered"])
            if flush.done() and not stats["buffered"]:
                break
            await asyncio.sleep(_POLL)
        await flush
    finally:
        await monitoring.close()
    final = monitoring.stats()
    if on_progress is not None:
        (stats,) = final.values()
        on_progress(stats["emitted"] - stats["buffered"])
    return final
