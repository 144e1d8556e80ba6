"""lunamon's own log: the application decides what it shows.

Events go to structlog's ``lunamon`` logger when the application configured
structlog, else to the stdlib logger ``lunamon`` (so
``logging.getLogger("lunamon").setLevel(logging.ERROR)`` silences the rest, and
nothing prints unless logging is set up). Every text is redacted with the secret
values lunamon knows (:func:`lunamon._secrets.remember`). An event logged while a
monitored request is served carries its ``request_id``. A dead sink fails every
flush: :class:`RateLimitedLogger` lets the same event through once per interval
and says how many were suppressed meanwhile.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Final

import structlog

from lunamon._secrets import redact_known
from lunamon.collector import current

__all__ = ["RateLimitedLogger", "logger"]

_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
_stdlib = logging.getLogger("lunamon")


def _clean(value: Any) -> Any:
    return redact_known(value) if isinstance(value, str) else value


class _Logger:
    """``logger.info("event", key=value)``: structlog's calling convention, either way."""

    def _log(self, level: str, event: str, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
        event = redact_known(event % args if args else event)
        fields = {key: _clean(value) for key, value in kw.items()}
        collector = current.get()
        if collector is not None and "request_id" not in fields:
            fields["request_id"] = collector.request_id
        if structlog.is_configured():
            getattr(structlog.get_logger("lunamon"), level)(event, **fields)
            return
        number = _LEVELS[level]
        if _stdlib.isEnabledFor(number):
            text = " ".join([event, *(f"{key}={value!r}" for key, value in fields.items())])
            _stdlib.log(number, text, extra={"lunamon_event": event, "lunamon_fields": fields})

    def debug(self, event: str, *args: Any, **kw: Any) -> None:
        self._log("debug", event, args, kw)

    def info(self, event: str, *args: Any, **kw: Any) -> None:
        self._log("info", event, args, kw)

    def warning(self, event: str, *args: Any, **kw: Any) -> None:
        self._log("warning", event, args, kw)

    def error(self, event: str, *args: Any, **kw: Any) -> None:
        self._log("error", event, args, kw)

    def critical(self, event: str, *args: Any, **kw: Any) -> None:
        self._log("critical", event, args, kw)

    exception = error


logger: Final = _Logger()


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
