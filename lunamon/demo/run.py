"""``lunamon demo``: the demo service on a free loopback port, driven by generated traffic.

The service, the client and the monitoring share one event loop in this
process. Points go to a line-protocol file, an InfluxDB database or the
sinks of a config file; when the run is over the monitoring is drained and
closed (the app's cleanup) and the points are read back for the report.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from lunamon.aiohttp import MONITORING_KEY
from lunamon.demo.influx import InfluxTarget, ping, query_points
from lunamon.demo.service import create_app
from lunamon.demo.traffic import TrafficResult, drive
from lunamon.flusher import SinkStats
from lunamon.point import Point
from lunamon.sinks.base import Sink
from lunamon.sinks.memory import MemorySink

if TYPE_CHECKING:
    from lunamon.settings import MonitoringSettings

__all__ = ["DemoResult", "REPORT_COPY", "run_demo"]

SERVICE = "luna-handlers"
# With --config the points cannot be read back from arbitrary sinks: a copy is kept here.
REPORT_COPY = "report-copy"

_QUIET = logging.Logger("lunamon.demo.server")
_QUIET.disabled = True


@dataclass
class DemoResult:
    url: str  # where the service listened
    destination: str  # where the points went, for people
    traffic: TrafficResult
    stats: dict[str, SinkStats]
    points: list[Point]  # read back from the destination, for the report
    report_source: str


async def run_demo(
    *,
    requests: int | None = 2000,
    concurrency: int = 16,
    duration: float | None = None,
    latency: float = 0.002,
    out: Path | None = None,
    influx: InfluxTarget | None = None,
    settings: MonitoringSettings | None = None,
    seed: int | None = None,
    on_start: Callable[[str, str], None] | None = None,
    on_request: Callable[[], None] | None = None,
) -> DemoResult:
    """Run the demo and return what the client saw, the monitoring stats and the points.

    Exactly one destination: ``out`` (a line-protocol file, overwritten),
    ``influx`` or ``settings`` (its sinks; a copy of the points is kept in
    memory for the report, under the sink name ``report-copy``).
    """
    memory: MemorySink | None = None
    sinks: list[Sink]
    if influx is not None:
        await ping(influx)
        sinks = [influx.sink()]
        destination = f"InfluxDB {influx}"
    elif settings is not None:
        memory = MemorySink(REPORT_COPY)
        sinks = [*settings.build_sinks(), memory]
        destination = f"the sinks of {settings.source}"
    else:
        from lunamon.sinks.file import LineProtocolFileSink

        target = out if out is not None else Path("lunamon-demo.lp")
        target.write_bytes(b"")  # a fresh file per run
        sinks = [LineProtocolFileSink(target)]
        destination = str(target)

    app = create_app(sinks=sinks, latency=latency, settings=settings)
    monitoring = app[MONITORING_KEY]

    async def flush_then_close(_app: web.Application) -> AsyncIterator[None]:
        # Cleanups run in reverse: this one before lunamon's close(). The flush waits for a
        # write in progress and sends the rest, so close() finds no batch in flight.
        yield
        await monitoring.flush()

    app.cleanup_ctx.append(flush_then_close)
    # handler_cancellation: a client that goes away cancels its handler (recorded as 499).
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        logger=_QUIET,  # the demo's unhandled exceptions are on purpose: no tracebacks
        shutdown_timeout=5.0,
    )
    await runner.setup()
    started_ns = time.time_ns()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        url = f"http://{host}:{port}"
        if on_start is not None:
            on_start(url, destination)
        traffic = await drive(
            url,
            requests=requests,
            concurrency=concurrency,
            duration=duration,
            seed=seed,
            on_request=on_request,
        )
    finally:
        await runner.cleanup()  # on_cleanup closes the monitoring: drained within its deadline
    stats = monitoring.stats()

    if influx is not None:
        where = f"time >= {started_ns} AND \"service\" = '{SERVICE}'"
        points = await query_points(influx, ("request", "error"), where)
        source = f"{influx}, this run"
    elif memory is not None:
        points = memory.points
        source = "an in-memory copy"
    else:
        from lunamon.demo.report import load_file

        points = load_file(destination)
        source = destination
    return DemoResult(url, destination, traffic, stats, points, source)
