"""The request id in the service's log lines: a stdlib filter and a structlog processor.

Both read the collector of the monitored request being served when a log record is
made, and nothing else: a service that does not use them pays nothing per request.
Outside a monitored request the stdlib filter sets a placeholder (``-``), so a format
string naming ``%(request_id)s`` never fails, and the structlog processor adds nothing.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any, Final

from lunamon.collector import current

__all__ = ["RequestIdFilter", "add_request_id"]

_current_get = current.get
PLACEHOLDER: Final = "-"


class RequestIdFilter(logging.Filter):
    """Sets ``record.request_id`` to the id of the monitored request being served.

    Outside a monitored request it is ``placeholder`` (``-``); a record that already
    has one (``extra={"request_id": ...}``) keeps it. It never drops a record. Put it
    on a handler, so that every logger's records through that handler get it::

        handler.addFilter(lunamon.RequestIdFilter())
        handler.setFormatter(logging.Formatter("%(asctime)s %(request_id)s %(message)s"))
    """

    def __init__(self, name: str = "", placeholder: str = PLACEHOLDER) -> None:
        super().__init__(name)
        self.placeholder = placeholder

    def filter(self, record: logging.LogRecord) -> bool:
        if "request_id" not in record.__dict__:
            collector = _current_get()
            record.request_id = collector.request_id if collector is not None else self.placeholder
        return True


def add_request_id(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: ``request_id`` of the monitored request being served.

    Inside a monitored request only, and never over a ``request_id`` the caller bound
    or passed::

        structlog.configure(processors=[lunamon.add_request_id, ..., renderer])
    """
    if "request_id" not in event_dict:
        collector = _current_get()
        if collector is not None:
            event_dict["request_id"] = collector.request_id
    return event_dict
