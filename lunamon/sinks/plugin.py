"""LUNA-compatible monitoring plugins, and the adapter that makes one a sink.

A plugin written for LUNA's ``BaseRequestMonitoringPlugin`` (``initialize``,
``close``, ``flushPointToMonitoring(point, logger)``, ``handleEvent(points,
logger)``) runs unchanged behind :class:`PluginSink`; whatever it raises
comes out of :meth:`PluginSink.write` for the flusher to count.
"""

from __future__ import annotations

import abc
import asyncio
import inspect
from collections.abc import Callable, Sequence
from typing import Any

from lunamon._log import logger as _lunamon_logger
from lunamon._secrets import redact_known
from lunamon.errors import SinkError
from lunamon.point import Point

__all__ = ["BaseRequestMonitoringPlugin", "PluginSink"]


class BaseRequestMonitoringPlugin(abc.ABC):
    """LUNA's monitoring plugin contract: implement :meth:`flushPointToMonitoring`."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def initialize(self) -> None:  # noqa: B027  (an optional hook, like LUNA's)
        """Called once before the first points (open connections here)."""

    async def close(self) -> None:  # noqa: B027  (an optional hook, like LUNA's)
        """Called once at shutdown (close connections here)."""

    @abc.abstractmethod
    async def flushPointToMonitoring(self, point: Point, logger: Any) -> None:
        """Deliver one point (``async def``, or a plain ``def``: run in a worker thread)."""

    async def handleEvent(self, points: Sequence[Point], logger: Any) -> None:
        """Deliver a batch point by point; one :class:`SinkError` sums up the failures.

        Coroutine ``flushPointToMonitoring`` runs for every point concurrently; a
        plain ``def`` one runs in a worker thread, so it cannot block the loop.
        Points that were delivered stay delivered: the error is not retryable (the
        batch is not sent twice) and says how many were (``delivered``).
        """
        flush = self.flushPointToMonitoring
        if inspect.iscoroutinefunction(flush):
            results = await asyncio.gather(
                *(flush(point, logger) for point in points), return_exceptions=True
            )
        else:
            results = await asyncio.to_thread(_flush_each, flush, points, logger)
        failures = [result for result in results if isinstance(result, BaseException)]
        if failures:
            first = failures[0]
            raise SinkError(
                redact_known(
                    f"{type(self).__name__}: {len(failures)} of {len(results)} points failed;"
                    f" first: {type(first).__name__}: {first}"
                ),
                retryable=False,
                delivered=len(results) - len(failures),
            )


def _flush_each(
    flush: Callable[[Point, Any], Any], points: Sequence[Point], logger: Any
) -> list[Any]:
    """A synchronous plugin's per-point calls (in a worker thread), failures returned."""
    results: list[Any] = []
    for point in points:
        try:
            results.append(flush(point, logger))
        except Exception as exc:
            results.append(exc)
    return results


async def _call(method: Callable[..., Any], *args: Any) -> Any:
    """A plugin hook, awaited when it is a coroutine function, else run in a worker thread."""
    if inspect.iscoroutinefunction(method):
        return await method(*args)
    return await asyncio.to_thread(method, *args)


class PluginSink:
    """A :class:`~lunamon.sinks.base.Sink` backed by a LUNA-style monitoring plugin.

    ``start`` calls ``initialize`` (a failure is logged and ``initialize`` is
    tried again before the next write, whose exception it then becomes),
    ``write`` calls ``handleEvent``, ``close`` calls ``close`` (a failure is logged).
    """

    def __init__(
        self,
        plugin: BaseRequestMonitoringPlugin,
        *,
        logger: Any = None,
        name: str | None = None,
    ) -> None:
        self.plugin = plugin
        self.logger = logger if logger is not None else _lunamon_logger
        self.name = name or type(plugin).__name__
        self._initialized = False
        self._closed = False

    def __repr__(self) -> str:
        return f"PluginSink(name={self.name!r}, plugin={type(self.plugin).__name__})"

    async def start(self) -> None:
        self._closed = False
        try:
            await self._initialize()
        except Exception as exc:
            _lunamon_logger.error(
                "plugin_initialize_failed",
                sink=self.name,
                error=f"{type(exc).__name__}: {exc}",
                will_retry=True,
            )

    async def _initialize(self) -> None:
        if not self._initialized:
            await _call(self.plugin.initialize)
            self._initialized = True

    async def write(self, points: Sequence[Point]) -> None:
        if not points:
            return
        await self._initialize()
        batch = points if isinstance(points, list) else list(points)
        await _call(self.plugin.handleEvent, batch, self.logger)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._initialized = False
        try:
            await _call(self.plugin.close)
        except Exception as exc:
            _lunamon_logger.error(
                "plugin_close_failed", sink=self.name, error=f"{type(exc).__name__}: {exc}"
            )
