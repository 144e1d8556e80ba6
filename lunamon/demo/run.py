"""``lunamon demo``'s run: the demo service on a free loopback port, driven by generated traffic.

With ``faces_sinks`` a second, faces-like service runs beside it on another port
(:mod:`lunamon.demo.faces`), monitored into those sinks, and the handlers-like
service stores its faces there. The services, the client and the monitoring share
one event loop in this process; when the traffic is over the monitoring is drained and closed (the
app's cleanup). Which sinks the points go to, and reading them back for the
report, are the command line's business (:mod:`lunamon.cli`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from lunamon.aiohttp import MONITORING_KEY
from lunamon.demo.faces import create_faces_app
from lunamon.demo.service import create_app, use_faces_service
from lunamon.demo.traffic import TrafficResult, drive
from lunamon.flusher import SinkStats
from lunamon.monitoring import Monitoring
from lunamon.sinks.base import Sink

if TYPE_CHECKING:
    from lunamon.settings import MonitoringSettings

__all__ = ["DemoResult", "run_demo"]

_QUIET = logging.Logger("lunamon.demo.server")
_QUIET.disabled = True


@dataclass
class DemoResult:
    url: str  # where the service listened
    started_ns: int  # wall clock when the service started: every point of the run is newer
    traffic: TrafficResult
    stats: dict[str, SinkStats]
    metrics: str = ""  # the service's /metrics after the traffic (with metrics=True)
    faces_stats: dict[str, SinkStats] | None = None  # the faces-like service's, when it ran


async def run_demo(
    sinks: Iterable[Sink],
    *,
    requests: int | None = 2000,
    concurrency: int = 16,
    duration: float | None = None,
    latency: float = 0.002,
    settings: MonitoringSettings | None = None,
    seed: int | None = None,
    on_start: Callable[[str], None] | None = None,
    on_request: Callable[[], None] | None = None,
    metrics: bool = False,
    faces_sinks: Iterable[Sink] | None = None,
) -> DemoResult:
    """Run the demo service monitored into ``sinks`` (with the other options of
    ``settings``, when given) under generated traffic; return what the client saw and
    the monitoring stats, once every point is written or dropped.

    ``on_start`` gets the service's URL when it listens; ``on_request`` is called
    after each request. With ``faces_sinks``, the faces-like service runs too (its
    stats are ``faces_stats``).
    """
    faces_runner: web.AppRunner | None = None
    faces_app: web.Application | None = None
    faces_url: str | None = None
    if faces_sinks is not None:
        faces_app = create_faces_app(sinks=faces_sinks, latency=latency)
        _flush_on_cleanup(faces_app)
        faces_runner, faces_url = await _start(faces_app)
    try:
        result = await _run_handlers(
            sinks,
            faces_url,
            requests=requests,
            concurrency=concurrency,
            duration=duration,
            latency=latency,
            settings=settings,
            seed=seed,
            on_start=on_start,
            on_request=on_request,
            metrics=metrics,
        )
    finally:
        if faces_runner is not None:
            await faces_runner.cleanup()  # after the handlers: no call is still in flight
    if faces_app is not None:
        result.faces_stats = faces_app[MONITORING_KEY].stats()
    return result


def _flush_on_cleanup(app: web.Application) -> None:
    monitoring = app[MONITORING_KEY]

    async def flush_then_close(_app: web.Application) -> AsyncIterator[None]:
        # Cleanups run in reverse: this one before lunamon's close(). The flush waits for a
        # write in progress and sends the rest, so close() finds no batch in flight.
        yield
        await monitoring.flush()

    app.cleanup_ctx.append(flush_then_close)


async def _start(app: web.Application) -> tuple[web.AppRunner, str]:
    # handler_cancellation: a client that goes away cancels its handler (recorded as 499).
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        logger=_QUIET,  # the demo's unhandled exceptions are on purpose: no tracebacks
        shutdown_timeout=5.0,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


async def _run_handlers(
    sinks: Iterable[Sink],
    faces_url: str | None,
    *,
    requests: int | None,
    concurrency: int,
    duration: float | None,
    latency: float,
    settings: MonitoringSettings | None,
    seed: int | None,
    on_start: Callable[[str], None] | None,
    on_request: Callable[[], None] | None,
    metrics: bool,
) -> DemoResult:
    app = create_app(
        sinks=sinks,
        latency=latency,
        settings=settings,
        metrics={"enabled": True} if metrics else None,
    )
    if faces_url is not None:
        use_faces_service(app, faces_url)
    monitoring = app[MONITORING_KEY]
    _flush_on_cleanup(app)
    started_ns = time.time_ns()
    runner, url = await _start(app)
    try:
        if on_start is not None:
            on_start(url)
        traffic = await drive(
            url,
            requests=requests,
            concurrency=concurrency,
            duration=duration,
            seed=seed,
            on_request=on_request,
        )
        scraped = await _scrape(url, monitoring) if metrics else ""
    finally:
        await runner.cleanup()  # on_cleanup closes the monitoring: drained within its deadline
    return DemoResult(url, started_ns, traffic, monitoring.stats(), scraped)


async def _scrape(url: str, monitoring: Monitoring) -> str:
    """The service's ``/metrics`` once the points of the traffic are counted."""
    await monitoring.flush()
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
        return await response.text()
