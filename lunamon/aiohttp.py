"""aiohttp integration: ``setup``, the middleware and ``monitor_request``.

Both entry points share one :class:`RequestRecorder`: it resolves the route
template, takes or makes the request id, runs the handler with a
:class:`~lunamon.collector.RequestCollector` in context, and turns the outcome
into a ``request`` point (and an ``error`` point for a failed request).
Everything that depends only on the route (its tag, exclusion, which path
parameters become tags) is computed once per route and cached.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import os
import random
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
)
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web
from multidict import istr

from lunamon._log import RateLimitedLogger
from lunamon.collector import RequestCollector, current
from lunamon.flusher import FlushPolicy
from lunamon.monitoring import Monitoring
from lunamon.point import FieldValue, Point, TagSet, sanitize_tag_value
from lunamon.sinks.base import Sink

if TYPE_CHECKING:
    from lunamon.settings import MonitoringSettings

__all__ = [
    "DEFAULT_PATH_TAGS",
    "MONITORING_KEY",
    "RequestRecorder",
    "monitor_request",
    "new_request_id",
    "setup",
]

MONITORING_KEY: Final = web.AppKey("lunamon_monitoring", Monitoring)

DEFAULT_PATH_TAGS: Final[Mapping[str, str]] = {
    "handlerId": "handler_id",
    "verifierId": "verifier_id",
}
DEFAULT_FAILED_STATUS_CODES: Final = frozenset(range(400, 600))
UNMATCHED: Final = "<unmatched>"
STATUS_CLIENT_CLOSED: Final = 499
_KNOWN_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"}
)
MAX_REQUEST_ID_LENGTH: Final = 128
_MAX_TAG_SETS: Final = 4096  # per route: beyond it (many handler ids), dicts are not shared

ErrorCodeGetter = Callable[[web.Request, "web.StreamResponse | BaseException"], "int | None"]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# ----------------------------------------------------------------------- request ids

_wall_time = time.time
_id_prefix = ""
_id_counter: Iterator[int] = iter(())


def _new_id_source() -> None:
    """A fresh random uuid4 prefix and counter start: at import, and in a forked child."""
    global _id_prefix, _id_counter
    rng = random.Random()
    h = f"{rng.getrandbits(80):020x}"
    variant = "89ab"[int(h[16], 16) & 3]
    _id_prefix = f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-"
    _id_counter = itertools.count(rng.getrandbits(47))


_new_id_source()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_id_source)


def new_request_id(seconds: int | None = None) -> str:
    """A request id in LUNA's format: ``"<unix seconds>,<uuid4>"``.

    The uuid4 (version and variant bits as ``uuid.uuid4()``) is 74 random bits
    drawn once per process (again after ``fork``) and a 48-bit counter: unique
    within the process by construction and across processes by the random part,
    at one string format per request. Ids must be unique, not secret.
    """
    if seconds is None:
        seconds = int(_wall_time())
    return f"{seconds},{_id_prefix}{next(_id_counter) & 0xFFFFFFFFFFFF:012x}"


def _plausible_request_id(value: str) -> bool:
    return 0 < len(value) <= MAX_REQUEST_ID_LENGTH and value.isascii() and value.isprintable()


# ----------------------------------------------------------------------- recorder


class _Route:
    """What the recorder needs of one (method, resource) pair, computed once."""

    __slots__ = ("excluded", "name", "params", "path_tags", "service", "tag_sets")

    def __init__(
        self, name: str, service: str, excluded: bool, path_tags: tuple[tuple[str, str], ...]
    ) -> None:
        self.name = name
        self.service = service
        self.excluded = excluded
        self.path_tags = path_tags
        self.params = tuple(param for param, _ in path_tags)
        # Tag dicts shared by every point with the same status (and path-tag values):
        # no dict per request, and a buffered point costs only its fields.
        self.tag_sets: dict[object, TagSet] = {}

    def tags(self, status: int, request: web.Request) -> TagSet:
        """The tags of a point of this route; shared, never to be mutated."""
        key: object = status
        if self.path_tags:
            key = (status, *map(request.match_info.get, self.params))
        tags = self.tag_sets.get(key)
        if tags is None:
            tags = TagSet(service=self.service, route=self.name, status_code=str(status))
            if self.path_tags:
                for (_, tag), value in zip(self.path_tags, key[1:], strict=True):  # type: ignore[index]
                    text = sanitize_tag_value(value) if value else ""
                    if text:
                        tags[tag] = text
            if len(self.tag_sets) < _MAX_TAG_SETS:
                self.tag_sets[key] = tags
        return tags


class RequestRecorder:
    """Runs a handler as a monitored request and emits its points."""

    def __init__(
        self,
        monitoring: Monitoring,
        *,
        request_id_header: str = "Luna-Request-Id",
        exclude: Iterable[str] = (),
        path_tags: Mapping[str, str] | None = None,
        failed_status_codes: Collection[int] = DEFAULT_FAILED_STATUS_CODES,
        error_code: ErrorCodeGetter | None = None,
    ) -> None:
        self.monitoring = monitoring
        self.service = sanitize_tag_value(monitoring.service) or "unknown"
        # A pre-built case-insensitive key: multidict skips folding it on every lookup.
        self.request_id_header = istr(request_id_header)
        self.exclude = frozenset(exclude)
        self.path_tags = dict(DEFAULT_PATH_TAGS if path_tags is None else path_tags)
        self.failed_status_codes = frozenset(failed_status_codes)
        self.error_code_getter = error_code
        self._routes: dict[tuple[str, object], _Route] = {}
        self._last_ns = 0
        self._log = RateLimitedLogger()

    def _route(self, method: str, resource: Any) -> _Route:
        if method not in _KNOWN_METHODS:
            method = "OTHER"
        key = (method, resource)
        route = self._routes.get(key)
        if route is None:
            if resource is None:
                name = f"{method}:{UNMATCHED}"
                params: tuple[tuple[str, str], ...] = ()
            else:
                canonical: str = resource.canonical
                name = sanitize_tag_value(f"{method}:{canonical}")
                params = tuple((p, t) for p, t in self.path_tags.items() if "{" + p in canonical)
            route = _Route(name, self.service, name in self.exclude, params)
            if len(self._routes) < 10_000:
                self._routes[key] = route
        return route

    async def run(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Serve ``request`` with ``handler`` as a monitored request.

        Also the middleware itself (``setup`` installs this bound method).
        """
        method = request.method
        resource = request.match_info.route.resource
        route = self._routes.get((method, resource))
        if route is None:
            route = self._route(method, resource)
        if route.excluded:
            return await handler(request)
        start_ns = time.time_ns()
        if start_ns <= self._last_ns:  # unique per process: same-tag points never overwrite
            start_ns = self._last_ns + 1
        self._last_ns = start_ns
        header = self.request_id_header
        request_id = request.headers.get(header)
        if request_id is None or not _plausible_request_id(request_id):
            request_id = new_request_id(start_ns // 1_000_000_000)
        collector = RequestCollector(route.name, request_id)
        token = current.set(collector)
        start = time.perf_counter()
        status = 500
        outcome: web.StreamResponse | BaseException | None = None
        try:
            response = await handler(request)
            status = response.status
            outcome = response
            if not response.prepared:
                response.headers[header] = request_id
            return response
        except web.HTTPException as exc:
            status = exc.status
            outcome = exc
            exc.headers[header] = request_id
            raise
        except asyncio.CancelledError as exc:
            status = STATUS_CLIENT_CLOSED
            outcome = exc
            raise
        except Exception as exc:
            outcome = exc
            raise
        finally:
            elapsed = time.perf_counter() - start
            current.reset(token)
            try:
                self._record(request, route, collector, start_ns, elapsed, status, outcome)
            except Exception as exc:  # monitoring never breaks the request
                self._log.log("error", "record_failed", key="record", error=repr(exc)[:1024])

    def _record(
        self,
        request: web.Request,
        route: _Route,
        collector: RequestCollector,
        start_ns: int,
        elapsed: float,
        status: int,
        outcome: web.StreamResponse | BaseException | None,
    ) -> None:
        tags: dict[str, str] = route.tags(status, request)
        if collector.extra_tags:
            tags = dict(tags)  # the shared TagSet stays as it is
            for key, value in collector.extra_tags.items():
                tags.setdefault(key, value)
        fields: dict[str, FieldValue] = {
            "request_id": collector.request_id,
            "execution_time": elapsed,
        }
        if collector.steps:
            fields.update(collector.steps)
        if collector.extra_fields:
            for key, field in collector.extra_fields.items():
                fields.setdefault(key, field)
        emit = self.monitoring.emit
        emit(_new_point(Point, ("request", start_ns, tags, fields)))
        if status in self.failed_status_codes or (
            not isinstance(outcome, web.StreamResponse)
            and isinstance(outcome, Exception)
            and not isinstance(outcome, web.HTTPException)
        ):
            error_tags = dict(tags)
            error_tags["error_code"] = str(self._error_code(request, status, outcome))
            emit(Point.trusted("error", start_ns, error_tags, {"request_id": collector.request_id}))

    def _error_code(
        self,
        request: web.Request,
        status: int,
        outcome: web.StreamResponse | BaseException | None,
    ) -> int:
        code = _int_or_none(getattr(outcome, "error_code", None))
        if code is None and isinstance(outcome, web.Response):
            code = _error_code_from_body(outcome)
        if code is None and self.error_code_getter is not None and outcome is not None:
            try:
                code = _int_or_none(self.error_code_getter(request, outcome))
            except Exception as exc:
                self._log.log("error", "error_code_getter_failed", key="ec", error=repr(exc)[:512])
        if code is None:
            code = 1 if status >= 500 else 0
        return code


# aiohttp's marker of a new-style middleware, on the function: the bound method has it.
RequestRecorder.run.__middleware_version__ = 1  # type: ignore[attr-defined]
RECORDER_KEY: Final = web.AppKey("lunamon_recorder", RequestRecorder)
# Point.trusted without the classmethod call: the recorder's parts are valid by construction.
_new_point = tuple.__new__


def _int_or_none(value: object) -> int | None:
    if type(value) is int:
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def _error_code_from_body(response: web.Response) -> int | None:
    """The ``error_code`` of a JSON error body (LUNA: ``{"error_code", "desc", ...}``)."""
    if response.content_type != "application/json":
        return None
    body = response.body
    if not isinstance(body, (bytes, bytearray)) or len(body) > 65536:
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return _int_or_none(data.get("error_code")) if isinstance(data, dict) else None


# ----------------------------------------------------------------------- entry points


def _middleware(recorder: RequestRecorder) -> Any:
    # The bound method is the middleware: no coroutine of ours between aiohttp and it.
    return recorder.run


def _find_recorder(request: web.Request) -> RequestRecorder | None:
    recorder = request.app.get(RECORDER_KEY)
    if recorder is None:
        recorder = request.config_dict.get(RECORDER_KEY)
    return recorder


_current_get = current.get


def _monitored(func: Callable[..., Awaitable[web.StreamResponse]]) -> Any:
    """``func`` (a handler function or a ``web.View`` method) run as a monitored request."""

    @functools.wraps(func)
    async def monitored_handler(*args: Any, **kwargs: Any) -> web.StreamResponse:
        first = args[0] if args else kwargs.get("request")
        request = first.request if isinstance(first, web.View) else first
        plain_call = request is first and len(args) == 1 and not kwargs  # handler(request)
        if not isinstance(request, web.Request) or _current_get() is not None:
            return await func(*args, **kwargs)
        recorder = _find_recorder(request)
        if recorder is None:
            return await func(*args, **kwargs)
        if plain_call:
            return await recorder.run(request, func)
        return await recorder.run(request, lambda _request: func(*args, **kwargs))

    return monitored_handler


def monitor_request(func: Any = None) -> Any:
    """Monitor one route handler (a function, or a ``web.View`` method).

    For services that monitor only some routes, or that skip aiohttp's
    middleware machinery (``setup(..., middleware=False)``). Inside a request
    already monitored by the middleware it only calls through.
    """
    if func is None:
        return _monitored
    return _monitored(func)


def setup(
    app: web.Application,
    *,
    service: str | None = None,
    settings: MonitoringSettings | None = None,
    sinks: Iterable[Sink] | None = None,
    middleware: bool = True,
    exclude: Iterable[str] | None = None,
    request_id_header: str | None = None,
    path_tags: Mapping[str, str] | None = None,
    failed_status_codes: Collection[int] | None = None,
    error_code: ErrorCodeGetter | None = None,
    policy: FlushPolicy | None = None,
) -> Monitoring:
    """Monitor every request of ``app`` (or, with ``middleware=False``, the handlers
    decorated with :func:`monitor_request`).

    Arguments override ``settings`` (the ``monitoring`` section of a config
    file). Without ``sinks`` and without sinks in ``settings`` points go to an
    InfluxDB 1.x at ``localhost:8086``, database ``luna_monitoring`` (LUNA's default).
    Starts the sinks on app startup and drains them on cleanup.
    """
    if not isinstance(app, web.Application):
        raise TypeError(f"setup() needs an aiohttp.web.Application, not {type(app).__name__}")
    if MONITORING_KEY in app:
        raise RuntimeError("lunamon.setup() was already called for this application")
    enabled = settings.enabled if settings is not None else True
    if service is None:
        service = settings.service if settings is not None else None
    if not service:
        raise ValueError("setup() needs a service name: service='luna-handlers'")
    if policy is None and settings is not None:
        policy = settings.flush_policy()
    if sinks is not None:
        sink_list = list(sinks)
    elif settings is not None and settings.sinks:
        sink_list = settings.build_sinks(app) if enabled else []
    elif enabled:
        from lunamon.sinks.influxdb import InfluxDBSink

        sink_list = [InfluxDBSink()]
    else:
        sink_list = []
    for sink in sink_list:
        if not isinstance(sink, Sink):
            raise TypeError(f"{type(sink).__name__} is not a Sink (async start/write/close)")
    monitoring = Monitoring(service, sink_list, policy, enabled=enabled)
    app[MONITORING_KEY] = monitoring
    if not enabled:
        return monitoring
    recorder = RequestRecorder(
        monitoring,
        request_id_header=request_id_header
        or (settings.request_id_header if settings else "Luna-Request-Id"),
        exclude=exclude if exclude is not None else (settings.exclude if settings else ()),
        path_tags=path_tags
        if path_tags is not None
        else (settings.path_tags if settings else None),
        failed_status_codes=failed_status_codes
        if failed_status_codes is not None
        else (settings.failed_status_codes if settings else DEFAULT_FAILED_STATUS_CODES),
        error_code=error_code,
    )
    app[RECORDER_KEY] = recorder
    if middleware:
        app.middlewares.insert(0, _middleware(recorder))

    async def lunamon_lifecycle(_app: web.Application) -> AsyncIterator[None]:
        await monitoring.start()
        yield
        await monitoring.close()

    app.cleanup_ctx.append(lunamon_lifecycle)
    return monitoring
