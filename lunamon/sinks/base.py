"""What a sink is, and the errors that tell the flusher what to do after a failed write."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from lunamon.point import Point

__all__ = ["BatchTooLarge", "Sink", "SinkError", "sink_name"]

MAX_SERVER_TEXT = 1024


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


class SinkError(Exception):
    """A failed write, classified: ``retryable`` or not, with the server's text.

    ``retry_after`` (seconds) is the server's ``Retry-After`` when it sent one.
    The message never holds credentials; ``server_text`` is truncated to 1 KB.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        retry_after: float | None = None,
        server_text: str = "",
    ) -> None:
        if len(server_text) > MAX_SERVER_TEXT:
            server_text = server_text[:MAX_SERVER_TEXT] + "...(truncated)"
        super().__init__(message if not server_text else f"{message}: {server_text}")
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after
        self.server_text = server_text


class BatchTooLarge(SinkError):
    """The server refused the body as too large (413): the flusher splits the batch."""

    def __init__(self, message: str = "batch too large", *, server_text: str = "") -> None:
        super().__init__(message, retryable=False, status=413, server_text=server_text)


def sink_name(sink: object) -> str:
    """A sink's ``name`` attribute when it has one, else its class name."""
    name = getattr(sink, "name", None)
    return name if isinstance(name, str) and name else type(sink).__name__
