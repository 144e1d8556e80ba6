"""LogSink: one structlog event per point with series, time_ns, tags and fields."""

from __future__ import annotations

import pytest
import structlog
from structlog.testing import capture_logs

from lunamon.point import Point
from lunamon.sinks.log import LogSink

POINTS = [
    Point("request", 1_000 + i, {"route": "GET:/", "status_code": 200}, {"execution_time": 0.5})
    for i in range(3)
]


async def test_one_event_per_point() -> None:
    sink = LogSink()
    await sink.start()
    with capture_logs() as logs:
        await sink.write(POINTS)
    await sink.close()
    assert logs == [
        {
            "event": "point",
            "log_level": "info",
            "series": "request",
            "time_ns": 1_000 + i,
            "tags": {"route": "GET:/", "status_code": "200"},
            "fields": {"execution_time": 0.5},
        }
        for i in range(3)
    ]


async def test_event_level_and_logger() -> None:
    logger = structlog.get_logger("custom").bind(component="monitoring")
    sink = LogSink(logger, event="monitoring_point", level="debug", name="debug-log")
    with capture_logs() as logs:
        await sink.write(POINTS[:1])
    assert sink.name == "debug-log"
    assert [(e["event"], e["log_level"], e["component"]) for e in logs] == [
        ("monitoring_point", "debug", "monitoring")
    ]


async def test_large_batch_is_logged_completely() -> None:
    points = [Point("m", i, None, {"v": i}) for i in range(1234)]
    with capture_logs() as logs:
        await LogSink().write(points)
    assert [e["time_ns"] for e in logs] == list(range(1234))


def test_defaults_and_checks() -> None:
    assert LogSink().name == "log"
    with pytest.raises(ValueError, match="level"):
        LogSink(level="loud")
