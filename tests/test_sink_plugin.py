"""LUNA-style monitoring plugins behind PluginSink."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

import pytest
from structlog.testing import capture_logs

from lunamon.errors import SinkError
from lunamon.point import Point
from lunamon.sinks.plugin import BaseRequestMonitoringPlugin, PluginSink

POINTS = [Point("request", 1_000 + i, {"route": "GET:/"}, {"n": i}) for i in range(5)]


class CollectingPlugin(BaseRequestMonitoringPlugin):
    """Keeps what it is given; fails the points listed in ``fail_on``."""

    def __init__(self, app: Any, fail_on: Sequence[int] = ()) -> None:
        super().__init__(app)
        self.fail_on = set(fail_on)
        self.points: list[Point] = []
        self.loggers: list[Any] = []
        self.calls: list[str] = []

    async def initialize(self) -> None:
        self.calls.append("initialize")

    async def close(self) -> None:
        self.calls.append("close")

    async def flushPointToMonitoring(self, point: Point, logger: Any) -> None:
        await asyncio.sleep(0)
        self.loggers.append(logger)
        if point.fields["n"] in self.fail_on:
            raise ConnectionError(f"cannot deliver {point.fields['n']}")
        self.points.append(point)


async def test_points_arrive_and_lifecycle_is_called() -> None:
    plugin = CollectingPlugin(app="the app")
    logger = object()
    sink = PluginSink(plugin, logger=logger)
    await sink.start()
    await sink.write(POINTS)
    await sink.close()
    assert plugin.points == POINTS
    assert plugin.loggers == [logger] * 5
    assert plugin.calls == ["initialize", "close"]
    assert plugin.app == "the app"
    assert sink.name == "CollectingPlugin"
    assert PluginSink(plugin, name="mine").name == "mine"


async def test_a_failing_point_raises_from_write_and_the_others_arrive() -> None:
    plugin = CollectingPlugin(app=None, fail_on=[1, 3])
    sink = PluginSink(plugin)
    with pytest.raises(SinkError) as caught:
        await sink.write(POINTS)
    assert not caught.value.retryable
    assert "2 of 5 points failed" in str(caught.value)
    assert "ConnectionError: cannot deliver 1" in str(caught.value)
    assert plugin.points == [POINTS[0], POINTS[2], POINTS[4]]
    # the sink goes on
    plugin.fail_on.clear()
    await sink.write(POINTS[:1])
    assert plugin.points[-1] == POINTS[0]


async def test_a_custom_handle_event_that_raises_surfaces_unchanged() -> None:
    class Broken(CollectingPlugin):
        async def handleEvent(self, points: Sequence[Point], logger: Any) -> None:
            raise ValueError("plugin bug")

    with pytest.raises(ValueError, match="plugin bug"):
        await PluginSink(Broken(None)).write(POINTS)


async def test_initialize_failure_is_logged_then_retried_before_the_next_write() -> None:
    class FlakyStart(CollectingPlugin):
        async def initialize(self) -> None:
            self.calls.append("initialize")
            if self.calls.count("initialize") == 1:
                raise OSError("not yet")

    plugin = FlakyStart(None)
    sink = PluginSink(plugin)
    with capture_logs() as logs:
        await sink.start()  # does not raise
    assert [e["event"] for e in logs] == ["plugin_initialize_failed"]
    await sink.write(POINTS[:2])
    await sink.write(POINTS[2:])
    assert plugin.calls == ["initialize", "initialize"]
    assert plugin.points == POINTS


async def test_close_failure_is_logged_not_raised() -> None:
    class BadClose(CollectingPlugin):
        async def close(self) -> None:
            raise RuntimeError("close failed")

    sink = PluginSink(BadClose(None))
    await sink.start()
    with capture_logs() as logs:
        await sink.close()
        await sink.close()
    assert [e["event"] for e in logs] == ["plugin_close_failed"]


def test_the_plugin_base_is_abstract() -> None:
    with pytest.raises(TypeError):
        BaseRequestMonitoringPlugin(None)  # type: ignore[abstract]


# --------------------------------------------------------------------------- through setup()


def _settings_app(plugin_path: str, **options: Any) -> tuple[Any, Any]:
    from aiohttp import web

    import lunamon

    app = web.Application()
    settings = lunamon.MonitoringSettings(
        service="svc",
        sinks=(lunamon.SinkSettings(plugin_path, options),),
        max_retries=0,
    )
    return app, lunamon.setup(app, settings=settings)


async def test_a_plugin_failing_on_some_points_counts_each_point() -> None:
    _app, monitoring = _settings_app(f"{__name__}:CollectingPlugin", fail_on=[1, 3])
    await monitoring.start()
    plugin = monitoring.sinks[0].plugin
    for point in POINTS * 2 + POINTS[:4]:  # 14 points, 2 x 2 + 1 failing
        monitoring.emit(point)
    await monitoring.flush()
    stats = monitoring.stats()["CollectingPlugin"]
    failing = sum(1 for p in POINTS * 2 + POINTS[:4] if p.fields["n"] in (1, 3))
    assert stats["written"] == 14 - failing == len(plugin.points)
    assert stats["dropped"]["rejected"] == failing
    assert stats["emitted"] == stats["written"] + sum(stats["dropped"].values())
    await monitoring.close()


class SyncPlugin(BaseRequestMonitoringPlugin):
    """A plugin written with plain ``def`` methods (LUNA allows it in spirit)."""

    def __init__(self, app: Any, api_key: str = "") -> None:
        super().__init__(app)
        self.api_key = api_key
        self.points: list[Point] = []
        self.threads: set[int] = set()

    def initialize(self) -> None:  # type: ignore[override]
        self.threads.add(threading.get_ident())

    def flushPointToMonitoring(self, point: Point, logger: Any) -> None:  # type: ignore[override]
        self.threads.add(threading.get_ident())
        if point.fields["n"] == 4:
            raise RuntimeError(f"broker rejected with key {self.api_key}")
        self.points.append(point)


async def test_a_sync_plugin_runs_off_the_loop_and_is_counted_per_point() -> None:
    _app, monitoring = _settings_app(f"{__name__}:SyncPlugin", api_key="K3y-S3cr3t")
    await monitoring.start()
    plugin = monitoring.sinks[0].plugin
    with capture_logs() as logs:
        for point in POINTS:
            monitoring.emit(point)
        await monitoring.flush()
    stats = monitoring.stats()["SyncPlugin"]
    assert (stats["written"], stats["dropped"]["rejected"]) == (4, 1)
    assert plugin.points == POINTS[:4]
    assert threading.get_ident() not in plugin.threads  # never on the loop's thread
    text = repr(logs)
    assert "broker rejected with key ***" in text  # the configured secret is redacted
    assert "K3y-S3cr3t" not in text
    await monitoring.close()
