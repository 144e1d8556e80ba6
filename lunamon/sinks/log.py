"""A sink that logs every point as one structlog event: monitoring into the log pipeline."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Final

from lunamon._log import logger as _lunamon_logger
from lunamon.point import Point

__all__ = ["LogSink"]

_LEVELS: Final = frozenset({"debug", "info", "warning", "error", "critical"})
# Points logged between two yields to the event loop.
_CHUNK: Final = 500


class LogSink:
    """Logs one ``event`` per point at ``level``, with the keys ``series``,
    ``time_ns``, ``tags`` and ``fields``, to ``logger`` (default: lunamon's).

    :param logger: a structlog (or stdlib-style) logger (code only)
    :param event: the event name of each log line
    :param level: ``debug``, ``info``, ``warning``, ``error`` or ``critical``
    :param name: the sink's name in ``stats()`` and logs
    """

    def __init__(
        self,
        logger: Any = None,
        *,
        event: str = "point",
        level: str = "info",
        name: str | None = None,
    ) -> None:
        if level not in _LEVELS:
            raise ValueError(f"level must be one of {sorted(_LEVELS)}, not {level!r}")
        self.logger = logger if logger is not None else _lunamon_logger
        self.event = event
        self.level = level
        self.name = name or "log"

    def __repr__(self) -> str:
        return f"LogSink(name={self.name!r}, event={self.event!r}, level={self.level!r})"

    async def start(self) -> None:
        return None

    async def write(self, points: Sequence[Point]) -> None:
        """Log each point; yields to the loop between chunks of a large batch."""
        log = getattr(self.logger, self.level)
        event = self.event
        for index, point in enumerate(points):
            if index and not index % _CHUNK:
                await asyncio.sleep(0)
            series, time_ns, tags, fields = point
            log(event, series=series, time_ns=time_ns, tags=dict(tags), fields=dict(fields))

    async def close(self) -> None:
        return None
