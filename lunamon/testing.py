"""Test helpers, also a pytest plugin: capture the points an app produces.

Like ``structlog.testing.capture_logs``::

    def test_it(lunamon_points):
        ...  # drive the app
        assert lunamon_points.series("request")[0].tags["status_code"] == "200"

or, without pytest, ``with capture_points() as points: ...``. Points are
captured when emitted, before any sink sees them, whatever sinks are configured.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from lunamon.flusher import _taps
from lunamon.point import Point

__all__ = ["CapturedPoints", "capture_points", "lunamon_points"]


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


@pytest.fixture
def lunamon_points() -> Iterator[CapturedPoints]:
    """The points emitted during the test (a :class:`CapturedPoints` list)."""
    with capture_points() as points:
        yield points
