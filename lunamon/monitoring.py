"""``Monitoring``: the handle ``setup`` returns — emit, flush, close, stats."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from lunamon.flusher import Flusher, FlushPolicy, SinkStats
from lunamon.point import Point
from lunamon.sinks.base import Sink

__all__ = ["Monitoring"]


class Monitoring:
    """One service's monitoring: its name, its sinks and the flusher feeding them.

    ``enabled=False`` gives a handle whose ``emit`` does nothing.
    """

    def __init__(
        self,
        service: str,
        sinks: Sequence[Sink],
        policy: FlushPolicy | None = None,
        *,
        enabled: bool = True,
    ) -> None:
        self.service = service
        self.enabled = enabled
        self.sinks = list(sinks)
        self._flusher = Flusher(self.sinks if enabled else (), policy)
        self.emit: Callable[[Point], None] = self._flusher.emit if enabled else _discard

    def __repr__(self) -> str:
        state = "enabled" if self.enabled else "disabled"
        return f"<Monitoring service={self.service!r} {state} sinks={self._flusher.sink_names}>"

    @property
    def policy(self) -> FlushPolicy:
        return self._flusher.policy

    async def start(self) -> None:
        """Start the sinks and the delivery tasks (``setup`` does this on app startup)."""
        await self._flusher.start()

    async def flush(self) -> None:
        """One attempt per sink now to write what is buffered, skipping backoff; never raises."""
        await self._flusher.flush()

    async def close(self) -> None:
        """Drain within ``shutdown_timeout`` and stop (``setup`` does this on app cleanup)."""
        await self._flusher.close()

    def stats(self) -> dict[str, SinkStats]:
        """Per sink: ``emitted``, ``written``, ``retries``, ``buffered``, ``dropped`` by reason."""
        return self._flusher.stats()


def _discard(point: Point) -> None:
    return None
