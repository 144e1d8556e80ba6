"""The request-scoped collector: what one request records while it runs.

A ``contextvars`` variable holds the collector for the life of one request (set
by the middleware or ``monitor_request``, reset in ``finally``). Tasks created
inside the request copy the context, so ``asyncio.gather`` and ``create_task``
children record into the same request, and so do ``asyncio.to_thread`` and
:func:`run_in_executor` (plain ``loop.run_in_executor`` does not copy it).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import Executor
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final, TypeVar

from lunamon._validation import validate_field_value, validate_key, validate_tag_value
from lunamon.point import FieldValue, compiled_speedups

__all__ = [
    "RequestCollector",
    "add_field",
    "add_tag",
    "current_request",
    "run_in_executor",
]

T = TypeVar("T")
# Seconds are kept to the nanosecond below this (a double's spacing is under 1 ns there).
NS_EXACT_BELOW: Final = 4e6


class _CollectorFields:
    """A collector's fields, in Python: the reference of the compiled ``CollectorCore``
    (``lunamon._speedups``), which ``RequestCollector`` subclasses when it is built."""

    __slots__ = (
        "_start_ns",
        "_token",
        "ended",
        "extra_fields",
        "extra_tags",
        "request_id",
        "route",
        "sent_status",
        "started",
        "steps",
    )

    def __init__(self, route: str, request_id: str) -> None:
        self.route = route
        self.request_id = request_id
        self.steps: dict[str, float] = {}
        self.extra_tags: dict[str, str] | None = None
        self.extra_fields: dict[str, FieldValue] | None = None
        # The status line sent to the client, once a response is prepared (else None).
        self.sent_status: int | None = None
        self.started = 0.0  # perf_counter() when the handler started
        # perf_counter() when the response was ready (0.0: not yet known); execution_time
        # and the Server-Timing total both end there.
        self.ended = 0.0
        self._start_ns = 0  # the point's time (set by the recorder)
        self._token: contextvars.Token[Any] | None = None  # the recorder's, to reset


if TYPE_CHECKING:
    _Fields = _CollectorFields
else:  # the compiled fields when built (made in one call by the recorder: _speedups.begin)
    _core = compiled_speedups()
    _Fields = _core.CollectorCore if _core is not None else _CollectorFields


class RequestCollector(_Fields):
    """Tags, fields and step times of the request being served."""

    __slots__ = ()

    def add_step(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to step ``name`` (a step timed twice is summed), to the ns."""
        steps = self.steps
        total = steps.get(name, 0.0) + seconds
        # Whole nanoseconds (the clock's resolution): the encoder writes them ~20x faster.
        steps[name] = (
            round(total * 1e9) / 1e9 if -NS_EXACT_BELOW < total < NS_EXACT_BELOW else total
        )

    def add_tag(self, key: str, value: str | int | float) -> None:
        """Tag the request's points (both ``request`` and ``error``)."""
        validate_key(key, "tag key")
        text = validate_tag_value(value)
        if self.extra_tags is None:
            self.extra_tags = {}
        if text is None:
            self.extra_tags.pop(key, None)
        else:
            self.extra_tags[key] = text

    def add_field(self, key: str, value: str | int | float | bool) -> None:
        """Add a field to the request's ``request`` point."""
        validate_key(key, "field key")
        checked = validate_field_value(value)
        if self.extra_fields is None:
            self.extra_fields = {}
        if checked is None:
            self.extra_fields.pop(key, None)
        else:
            self.extra_fields[key] = checked

    def __repr__(self) -> str:
        return f"<RequestCollector route={self.route!r} request_id={self.request_id!r}>"


current: Final[ContextVar[RequestCollector | None]] = ContextVar("lunamon_request", default=None)


def current_request() -> RequestCollector | None:
    """The collector of the monitored request being served, ``None`` outside one."""
    return current.get()


def add_tag(key: str, value: str | int | float) -> None:
    """Add a tag to the current request's points; a no-op outside a monitored request.

    Invalid keys raise ``ValueError``/``TypeError`` (a programming error); a value
    InfluxDB cannot store is sanitised, an empty one drops the tag.
    """
    collector = current.get()
    if collector is not None:
        collector.add_tag(key, value)


def add_field(key: str, value: str | int | float | bool) -> None:
    """Add a field to the current request's ``request`` point; a no-op outside one.

    NaN, infinities, ints beyond int64 and ``None`` are omitted (and counted);
    other types raise ``TypeError`` here, not later.
    """
    collector = current.get()
    if collector is not None:
        collector.add_field(key, value)


def run_in_executor(
    executor: Executor | None, func: Callable[..., T], /, *args: Any
) -> asyncio.Future[T]:
    """``loop.run_in_executor(executor, func, *args)`` that carries the request along.

    ``loop.run_in_executor`` runs ``func`` without the caller's context, so
    ``@timed``, ``measure`` and ``add_field`` inside it record nothing; this runs
    it in a copy of the context, as ``asyncio.to_thread`` does (``None``: the
    loop's default executor)::

        faces = await lunamon.run_in_executor(pool, detect_faces, image)
    """
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    return loop.run_in_executor(executor, functools.partial(context.run, func, *args))
