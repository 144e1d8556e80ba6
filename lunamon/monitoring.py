"""``Monitoring``: the handle ``setup`` returns — emit, flush, close, stats."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Sequence
from typing import Any

from lunamon.flusher import Flusher, FlushPolicy, SinkStats
from lunamon.point import Point
from lunamon.settings import MonitoringSettings
from lunamon.sinks.base import Sink
from lunamon.spool import Spool

__all__ = ["Monitoring"]


class Monitoring:
    """One service's monitoring: its settings, its sinks and the flusher feeding them.

    ``settings.enabled`` false gives a handle whose ``emit`` does nothing.
    """

    def __init__(self, settings: MonitoringSettings, sinks: Sequence[Sink]) -> None:
        self.settings = settings
        self.service = settings.service
        self.enabled = settings.enabled
        self.sinks = list(sinks) if settings.enabled else []
        self._flusher = Flusher(self.sinks, settings.flush_policy())
        # The flusher's emit, compiled for the common point when built (Flusher.emitter).
        self.emit: Callable[[Point], None] = self._flusher.emitter() if self.enabled else _discard
        # With `spool_dir`, emit also keeps each point for the spool (lunamon.spool).
        self._spool: Spool | None = None
        if self.enabled and self.sinks and settings.spool_dir:
            self._spool = Spool(
                settings.spool_dir, settings.spool_max_bytes, self._flusher, self._replays
            )
            self.emit = self._spool.wrap(self._flusher.emitter())
        # The Prometheus metrics sink when [monitoring.metrics] is enabled (setup sets it).
        self.metrics: Any = None

    def _replays(self, sink: Sink) -> bool:
        """Whether ``sink`` gets what a dead process left in the spool: not the metrics
        sink (a dead process's counts are its own), nor a sink with ``spool_replay = False``."""
        return sink is not self.metrics and getattr(sink, "spool_replay", True) is not False

    def __repr__(self) -> str:
        state = "enabled" if self.enabled else "disabled"
        return f"<Monitoring service={self.service!r} {state} sinks={self._flusher.sink_names}>"

    @property
    def policy(self) -> FlushPolicy:
        return self._flusher.policy

    async def start(self) -> None:
        """Start the sinks and the delivery tasks (``setup`` does this on app startup)."""
        await self._flusher.start()
        if self._spool is not None:
            await self._spool.start()
        if self.enabled and self.settings.gc_freeze:
            freeze_startup_heap()

    async def flush(self) -> None:
        """One attempt per sink now to write what is buffered, skipping backoff; never raises."""
        await self._flusher.flush()

    async def close(self) -> None:
        """Drain within ``shutdown_timeout`` and stop (``setup`` does this on app cleanup).

        With ``spool_dir``, what is still undelivered at the deadline is counted dropped
        (``shutdown``) here and stays in the spool: the next process delivers it.
        """
        if self._spool is not None:
            await self._spool.close(self._flusher.close)
        else:
            await self._flusher.close()

    def stats(self) -> dict[str, SinkStats]:
        """Per sink: ``emitted``, ``written``, ``retries``, ``buffered``, ``dropped`` by reason."""
        return self._flusher.stats()

    def spool_stats(self) -> dict[str, Any] | None:
        """The spool's counters (:meth:`lunamon.spool.Spool.stats`); None without ``spool_dir``."""
        return self._spool.stats() if self._spool is not None else None


def _discard(point: Point) -> None:
    return None


_frozen_in: int | None = None  # the pid that froze its heap (a forked child has not)


def freeze_startup_heap() -> bool:
    """``gc.collect()`` then ``gc.freeze()``, once per process; whether it ran now.

    A service's startup objects (modules, routes, settings) live as long as it does,
    yet every full collection walks them all. Buffered points raise the count of
    long-lived objects until a full collection runs, and its pause (tens of
    milliseconds for a large heap) stalls every request in flight. Frozen objects are
    left out of every later collection; what they free is never reclaimed, which for
    objects alive at startup costs nothing. Python's documentation recommends the same
    before forking workers.
    """
    global _frozen_in
    pid = os.getpid()
    if _frozen_in == pid:
        return False
    _frozen_in = pid
    gc.collect()
    gc.freeze()
    return True
