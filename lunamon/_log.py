"""lunamon's own log: structlog events from a logger named ``lunamon``, rate-limited.

A dead sink fails every flush; :class:`RateLimitedLogger` lets the same event
through once per interval and says how many were suppressed meanwhile.
"""

from __future__ import annotations

import time
from typing import Any

import structlog

__all__ = ["RateLimitedLogger", "logger"]

logger: Any = structlog.get_logger("lunamon")


class RateLimitedLogger:
    """Logs each distinct ``(level, event, key)`` at most once per ``interval`` seconds."""

    def __init__(self, interval: float = 30.0, log: Any = None) -> None:
        self.interval = interval
        self._log = log if log is not None else logger
        self._last: dict[tuple[str, str, str], tuple[float, int]] = {}

    def log(self, level: str, event: str, *, key: str = "", **kw: Any) -> None:
        now = time.monotonic()
        slot = (level, event, key)
        last = self._last.get(slot)
        if last is not None and now - last[0] < self.interval:
            self._last[slot] = (last[0], last[1] + 1)
            return
        if last is not None and last[1]:
            kw["suppressed"] = last[1]
        self._last[slot] = (now, 0)
        getattr(self._log, level)(event, **kw)
