"""lunamon's pytest plugin (registered through the ``pytest11`` entry point).

The ``lunamon_points`` fixture holds every point emitted during the test, in
order, whatever sinks the app has.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lunamon.testing import CapturedPoints, capture_points

__all__ = ["lunamon_points"]


@pytest.fixture
def lunamon_points() -> Iterator[CapturedPoints]:
    """The points emitted during the test (a :class:`~lunamon.testing.CapturedPoints` list)."""
    with capture_points() as points:
        yield points
