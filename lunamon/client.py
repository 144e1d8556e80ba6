"""Outgoing calls of a monitored request: its id travels with them, their time is a step.

``client_trace_config()`` gives an :class:`aiohttp.TraceConfig` for
``aiohttp.ClientSession(trace_configs=[...])``. A call made while a monitored request
is served carries the request's id in the request-id header (and, opt-in, a W3C
``traceparent``), and its duration, from the start of the call until the response
body has been read or released, is added to the request's ``<step>_time``. aiohttp's
``on_request_end`` fires when the headers arrive; the body's end is seen through the
connection's release callback, which aiohttp runs when the body is read to its end,
or the response released or closed (``async with`` does either). A call that fails
(refused, timed out) is timed up to its failure and the error propagates unchanged.
Outside a monitored request the hooks read one context variable and return.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, Final

import aiohttp
from multidict import istr
from yarl import URL

from lunamon._validation import validate_key
from lunamon.collector import RequestCollector, current

__all__ = ["DEFAULT_REQUEST_ID_HEADER", "StepNamer", "client_trace_config", "traceparent"]

# The configured default of ``[monitoring] request_id_header`` (LUNA's header).
DEFAULT_REQUEST_ID_HEADER: Final = "Luna-Request-Id"
# A name of the step, or a function of the call's (method, url) naming it (None: untimed).
StepNamer = Callable[[str, URL], "str | None"]

_current_get = current.get
_TRACEPARENT: Final = istr("traceparent")
_MAX_NAMES: Final = 1000
# The clock; tests replace it with a counter to assert exact durations.
perf_counter: Callable[[], float] = time.perf_counter


class _CallContext(SimpleNamespace):
    """What one outgoing call keeps between aiohttp's hooks (its ``trace_config_ctx``)."""

    __slots__ = ("collector", "done", "field", "start", "trace_request_ctx")

    def __init__(self, trace_request_ctx: Any = None) -> None:
        self.trace_request_ctx = trace_request_ctx
        self.collector: RequestCollector | None = None
        self.field = ""
        self.start = 0.0
        self.done = False

    def finish(self) -> None:
        """Add the call's time to its step, once (release callbacks may come twice)."""
        collector = self.collector
        if collector is not None and not self.done:
            self.done = True
            collector.add_step(self.field, perf_counter() - self.start)


def _field(name: str) -> str:
    """The field of step ``name``: ``<name>_time`` (a name ending in ``_time`` as it is)."""
    field = name if name.endswith("_time") else f"{name}_time"
    validate_key(field, "step name")
    return field


def traceparent(request_id: str) -> str:
    """A W3C ``traceparent`` for a call made inside request ``request_id``.

    The trace id is derived from the request id, so every service of one request
    (each deriving it from the same id) names the same trace: the 32 hex digits of a
    LUNA id's uuid (``"<seconds>,<uuid4>"``), else the first 16 bytes of the id's
    BLAKE2b hash. The span id is random, fresh for each call; flags ``01`` (sampled:
    lunamon records every request).
    """
    return f"00-{_trace_id(request_id)}-{random.getrandbits(64) or 1:016x}-01"


_trace_ids: dict[str, str] = {}


def _trace_id(request_id: str) -> str:
    found = _trace_ids.get(request_id)
    if found is not None:
        return found
    tail = request_id.rpartition(",")[2].strip().lower()
    hexdigits = tail.replace("-", "")
    if len(tail) == 36 and len(hexdigits) == 32 and _is_hex(hexdigits) and hexdigits.strip("0"):
        trace_id = hexdigits
    else:
        trace_id = hashlib.blake2b(request_id.encode(), digest_size=16).hexdigest()
        if not trace_id.strip("0"):  # all zeros is no trace id
            trace_id = "0" * 31 + "1"
    if len(_trace_ids) >= _MAX_NAMES:
        _trace_ids.clear()
    _trace_ids[request_id] = trace_id
    return trace_id


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True


def client_trace_config(
    step: str | StepNamer | None = "http_client",
    *,
    traceparent: bool = False,
    header: str | None = None,
) -> aiohttp.TraceConfig:
    """An :class:`aiohttp.TraceConfig` that ties outgoing calls to the monitored request.

    Inside a monitored request, each call made through a session created with
    ``trace_configs=[client_trace_config(...)]``:

    - carries the request's id in ``header`` (default ``Luna-Request-Id``, the default of
      ``[monitoring] request_id_header``: pass yours when you changed it), unless the
      call sets that header itself;
    - with ``traceparent=True``, carries a W3C ``traceparent`` (see :func:`traceparent`)
      unless the call sets one;
    - is timed into the request's ``<step>_time`` field, from the start of the call until
      its response body has been read to the end or the response released or closed
      (several calls are summed, as every step). ``step`` is a name (``"faces"`` gives
      ``faces_time``; a name ending in ``_time`` is taken as it is), a callable
      ``(method, url) -> name | None`` (``None``: the call is not timed), or ``None``
      (no call is timed). A call that fails is timed up to its failure, and the
      exception reaches the caller unchanged. A response whose body is never read nor
      released is not timed (aiohttp warns about it as an unclosed connection).

    Outside a monitored request it does nothing.
    """
    if step is not None and not isinstance(step, str) and not callable(step):
        raise TypeError("step= takes a step name, a callable (method, url) -> name, or None")
    fixed = _field(step) if isinstance(step, str) else None
    namer = step if callable(step) else None
    id_header = istr(header if header is not None else DEFAULT_REQUEST_ID_HEADER)
    if not id_header:
        raise ValueError("header= must be a header name")
    with_traceparent = bool(traceparent)
    fields: dict[str, str] = {}

    def field_of(method: str, url: URL) -> str | None:
        if fixed is not None or namer is None:
            return fixed
        name = namer(method, url)
        if name is None:
            return None
        found = fields.get(name)
        if found is None:
            found = _field(name)
            if len(fields) < _MAX_NAMES:
                fields[name] = found
        return found

    async def on_request_start(
        session: aiohttp.ClientSession,
        ctx: Any,  # a _CallContext
        params: aiohttp.TraceRequestStartParams,
    ) -> None:
        collector = _current_get()
        if collector is None:
            return
        headers = params.headers
        if id_header not in headers:
            headers[id_header] = collector.request_id
        if with_traceparent and _TRACEPARENT not in headers:
            headers[_TRACEPARENT] = _traceparent(collector.request_id)
        field = field_of(params.method, params.url)
        if field is not None:
            ctx.field = field
            ctx.collector = collector
            ctx.start = perf_counter()

    async def on_request_end(
        session: aiohttp.ClientSession,
        ctx: Any,  # a _CallContext
        params: aiohttp.TraceRequestEndParams,
    ) -> None:
        if ctx.collector is None:
            return
        response = params.response
        connection = response.connection
        # No connection left: the body is read already (or there was none). A 101 keeps
        # its connection for a websocket's whole life: the call ends at the upgrade.
        if connection is None or response.closed or response.status == 101:
            ctx.finish()
        else:
            connection.add_callback(ctx.finish)

    async def on_request_exception(
        session: aiohttp.ClientSession,
        ctx: Any,  # a _CallContext
        params: aiohttp.TraceRequestExceptionParams,
    ) -> None:
        ctx.finish()

    config = aiohttp.TraceConfig(trace_config_ctx_factory=_CallContext)
    config.on_request_start.append(on_request_start)
    config.on_request_end.append(on_request_end)
    config.on_request_exception.append(on_request_exception)
    return config


_traceparent = traceparent
