"""Every exception lunamon raises on purpose, in one place.

- :class:`SettingsError`: a configuration value refused (file, ``setup()`` or
  ``LUNAMON_*``); the message names the source and the key, never a secret.
- :class:`SinkError` and :class:`BatchTooLarge`: a failed write, classified so
  that the flusher knows whether to retry, split or drop it.
- :class:`LineProtocolError`: a line that is not valid line protocol, and
  :class:`NotTextError` for input that is not UTF-8 text at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from lunamon.point import Point

__all__ = ["BatchTooLarge", "LineProtocolError", "NotTextError", "SettingsError", "SinkError"]

# How much of a server's error text is kept: InfluxDB echoes whole offending lines.
MAX_SERVER_TEXT: Final = 1024


class SettingsError(ValueError):
    """Invalid monitoring settings. The message names the file and the key, never a secret."""

    def __init__(self, problem: str, *, key: str | None = None, source: str | None = None) -> None:
        self.problem = problem
        self.key = key
        self.source = source
        super().__init__(": ".join(part for part in (source, key, problem) if part))

    def relabel(self, *, key: str | None, source: str | None) -> SettingsError:
        """The same problem, reported for another key path and source."""
        return SettingsError(self.problem, key=key, source=source)


class SinkError(Exception):
    """A failed write, classified: ``retryable`` or not, with the server's text.

    ``retry_after`` (seconds) is the server's ``Retry-After`` when it sent one.

    ``pending`` says exactly which points of the batch are *not* stored (a list
    of the batch's own points, in any order): the others are, and the flusher
    counts them written at once; it then retries only ``pending`` (``retryable``)
    or drops only those (refused; for :class:`BatchTooLarge`, splits them). A
    sink that stores a batch in parts (a table per series, requests of 1,000
    lines) sets it whenever a part is stored; ``None``, the default, means that
    nothing of the batch is known to be stored. ``delivered`` is the older,
    coarser form for a refused batch only: how many of its points were stored
    (a plugin that failed on some points); ``pending`` wins when both are given.
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
        delivered: int = 0,
        pending: list[Point] | None = None,
    ) -> None:
        if len(server_text) > MAX_SERVER_TEXT:
            server_text = server_text[:MAX_SERVER_TEXT] + "...(truncated)"
        super().__init__(message if not server_text else f"{message}: {server_text}")
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after
        self.server_text = server_text
        self.delivered = delivered
        self.pending = pending


class BatchTooLarge(SinkError):
    """The server refused the body as too large (413): the flusher splits the batch."""

    def __init__(self, message: str = "batch too large", *, server_text: str = "") -> None:
        super().__init__(message, retryable=False, status=413, server_text=server_text)


class LineProtocolError(ValueError):
    """A line that is not valid line protocol; says which line and why."""


class NotTextError(LineProtocolError):
    """The input is not UTF-8 text; ``offset`` is the first bad byte."""

    def __init__(self, offset: int) -> None:
        super().__init__(f"not UTF-8 text: byte {offset}")
        self.offset = offset
