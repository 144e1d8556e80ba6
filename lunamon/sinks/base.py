"""What a sink is (its errors are in :mod:`lunamon.errors`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from lunamon.point import Point

__all__ = ["Sink", "sink_name"]


@runtime_checkable
class Sink(Protocol):
    """Where finished points go. ``write`` is called with one batch at a time.

    A sink raises :class:`SinkError` to say whether a failed batch may be
    retried; connection errors, ``OSError`` and timeouts are retried too, any
    other exception rejects the batch (counted, logged; the flusher goes on).
    """

    async def start(self) -> None: ...

    async def write(self, points: Sequence[Point]) -> None: ...

    async def close(self) -> None: ...


def sink_name(sink: object) -> str:
    """A sink's ``name`` attribute when it has one, else its class name."""
    name = getattr(sink, "name", None)
    return name if isinstance(name, str) and name else type(sink).__name__
