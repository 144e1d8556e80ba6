"""Test helpers: capture the points an app produces (no pytest needed).

Like ``structlog.testing.capture_logs``::

    with capture_points() as points:
        ...  # drive the app
    assert points.series("request")[0].tags["status_code"] == "200"

or, in pytest, the ``lunamon_points`` fixture (:mod:`lunamon.pytest_plugin`)::

    def test_it(lunamon_points):
        ...  # drive the app
        assert lunamon_points.series("request")[0].tags["status_code"] == "200"

Points are captured when emitted, before any sink sees them, whatever sinks
are configured.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from lunamon.flusher import _taps
from lunamon.point import Point

__all__ = ["CapturedPoints", "capture_points"]


class CapturedPoints(list[Point]):
    """The captured points, in emission order."""

    def series(self, name: str) -> list[Point]:
        """The captured points of series ``name``."""
        return [p for p in self if p.series == name]


@contextmanager
def capture_points() -> Iterator[CapturedPoints]:
    """Capture every point emitted by any ``Monitoring`` of this process while active."""
    points = CapturedPoints()
    _taps.append(points)
    try:
        yield points
    finally:
        _taps.remove(points)
