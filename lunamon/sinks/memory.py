"""A sink that keeps what it is given, for tests and the embedded demo."""

from __future__ import annotations

from collections.abc import Sequence

from lunamon.point import Point

__all__ = ["MemorySink"]


class MemorySink:
    """Appends every written point to :attr:`points` (tests, the embedded demo).

    :param name: the sink's name in ``stats()`` and logs
    """

    def __init__(self, name: str | None = None) -> None:
        self.name = name or "memory"
        self.points: list[Point] = []
        self.started = False
        self.closed = False

    def __repr__(self) -> str:
        return f"MemorySink(name={self.name!r}, points={len(self.points)})"

    async def start(self) -> None:
        self.started = True

    async def write(self, points: Sequence[Point]) -> None:
        self.points.extend(points)

    async def close(self) -> None:
        self.closed = True

    def series(self, name: str) -> list[Point]:
        """The points of one series, in the order they were written."""
        return [p for p in self.points if p.series == name]
