"""The request recorder: one monitored request in, a ``request`` point (and an
``error`` point for a failed one) out.

The middleware and ``monitor_request`` share it. Everything that depends only
on the route (its tag, exclusion, which path parameters become tags) is worked
out once per route and cached; per request it reads the clock, takes or makes
the request id, runs the handler with a collector in context, and emits.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import re
import time
from collections.abc import Awaitable, Callable, Generator
from contextvars import ContextVar
from typing import Any, Final, cast

from aiohttp import web
from aiohttp.typedefs import Middleware
from multidict import istr

from lunamon import _ids
from lunamon._ids import PointClock, plausible_request_id
from lunamon._ids import point_time as _point_time
from lunamon._ids import request_id as _request_id
from lunamon._log import RateLimitedLogger
from lunamon._secrets import Secret
from lunamon._validation import sanitize_tag_value
from lunamon.collector import NS_EXACT_BELOW, RequestCollector, current
from lunamon.errors import SettingsError
from lunamon.monitoring import Monitoring
from lunamon.point import FieldValue, Point, TagSet
from lunamon.settings import MIN_TIMING_SECRET, MonitoringSettings

ErrorCodeGetter = Callable[[web.Request, "web.StreamResponse | BaseException"], "int | None"]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

UNMATCHED: Final = "<unmatched>"
STATUS_CLIENT_CLOSED: Final = 499
_KNOWN_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"}
)
_MAX_ROUTES: Final = 10_000
_MAX_TAG_SETS: Final = 4096  # per route: beyond it (many handler ids), dicts are not shared

_point = Point.trusted  # the recorder's parts are valid by construction
_current_get = current.get
# The collector of a request whose handler has returned or raised, for the prepare
# hook aiohttp runs afterwards in the same task (see RequestRecorder.run).
_finished: Final[ContextVar[RequestCollector | None]] = ContextVar("lunamon_finished", default=None)
_finished_get = _finished.get
_EXPECT: Final = istr("Expect")


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
        settings: MonitoringSettings,
        error_code: ErrorCodeGetter | None = None,
        server_timing_allow: Callable[[web.Request], object] | None = None,
    ) -> None:
        self.monitoring = monitoring
        self.service = settings.service
        # A pre-built case-insensitive key: multidict skips folding it on every lookup.
        self.request_id_header = istr(settings.request_id_header)
        self.exclude = frozenset(settings.exclude)
        self.path_tags = dict(settings.path_tags)
        self.failed_status_codes = settings.failed_status_codes
        self.error_code_getter = error_code
        self._routes: dict[tuple[str, object], _Route] = {}
        self._clock = PointClock(settings.slot_dir, settings.instance)
        self.server_timing = settings.server_timing
        name, _, value = settings.server_timing_when.partition(":")
        self._timing_header = istr(name.strip()) if name.strip() else None
        if settings.server_timing and settings.server_timing_secret_file:
            value = _read_timing_secret(settings.server_timing_secret_file)
        # The value the gating header must carry, compared in constant time.
        self._timing_secret = Secret(value.strip()) if value.strip() else None
        self._timing_allow = server_timing_allow
        self._log = RateLimitedLogger()
        # What setup() installs as the middleware and @monitor_request calls: run, or its
        # compiled twin when the extension is built (it reads the settings above once).
        self.middleware: Middleware = self.run
        # And the on_response_prepare receiver: compiled, it answers at once where there is
        # nothing to do (most responses), and calls on_response_prepare otherwise.
        self.prepare_hook: Callable[[web.Request, web.StreamResponse], Any] = (
            self.on_response_prepare
        )
        if _compiled is not None:
            self.middleware = _compiled.Runner(
                self, RequestCollector, current, _finished, _EXPECT, web.Response, Point, time
            )
            self.prepare_hook = _compiled.PrepareGate(
                self.on_response_prepare, current, _finished, _EXPECT
            )

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
                canonical: str = resource.canonical or "/"  # static files mounted at "/"
                name = sanitize_tag_value(f"{method}:{canonical}")
                params = tuple((p, t) for p, t in self.path_tags.items() if "{" + p in canonical)
            route = _Route(name, self.service, name in self.exclude, params)
            if len(self._routes) < _MAX_ROUTES:
                self._routes[key] = route
        return route

    async def run(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Serve ``request`` with ``handler`` as a monitored request.

        Also the middleware itself: ``setup`` installs this bound method, so no
        coroutine of lunamon's stands between aiohttp and the recorder. The status
        recorded is the status line the client received (:meth:`on_response_prepare`
        sees it), 499 only when the client left before any was sent.
        """
        method = request.method
        resource = request.match_info.route.resource
        route = self._routes.get((method, resource))
        if route is None:
            route = self._route(method, resource)
        if route.excluded or _current_get() is not None:  # excluded, or monitored already
            return await handler(request)
        # The point's time, the request id, the collector, set in `current`: one call.
        collector = _begin(
            RequestCollector,
            route.name,
            request.headers.get(self.request_id_header),
            time.time_ns(),
            current,
        )
        try:
            response = await handler(request)
        except BaseException as exc:
            return self._end(request, route, collector, None, exc)
        return self._end(request, route, collector, response, None)

    # aiohttp's own marking, applied by a call rather than as a decorator: mutmut (make
    # mutate) leaves decorated functions alone, and this is the heart of the recorder.
    run = web.middleware(run)

    def _end(
        self,
        request: web.Request,
        route: _Route,
        collector: RequestCollector,
        response: web.StreamResponse | None,
        error: BaseException | None,
    ) -> web.StreamResponse:
        """The rest of :meth:`run` once the handler returned ``response`` or raised ``error``
        (raised again here): the status, the echoed id, the point. The compiled runner
        (``lunamon._speedups.Runner``) does the common case itself and calls this for
        every other."""
        header = self.request_id_header
        request_id = collector.request_id
        start_ns = collector._start_ns
        token = collector._token
        start = collector.started
        status = 500
        outcome: web.StreamResponse | BaseException | None = None
        raised = False  # the handler failed (not an HTTPException, not the client leaving)
        after = False  # aiohttp prepares a response after the handler: see it there
        try:
            if error is not None:
                raise error
            # A handler that returned something else (None) fails below, as it would have.
            response = cast(web.StreamResponse, response)
            outcome = response
            if response.prepared:  # a stream or a websocket: its status went out already
                status = collector.sent_status or response.status
            else:
                status = response.status
                response.headers[header] = request_id
                # A FileResponse (static files too) decides its status in prepare().
                after = type(response) is not web.Response
                if self.server_timing or after:
                    collector.ended = time.perf_counter()
                    if self.server_timing:
                        self._add_server_timing(request, response.headers, collector, True)
            return response
        except web.HTTPException as exc:
            outcome = exc
            status = collector.sent_status or exc.status
            exc.headers[header] = request_id
            if self.server_timing:
                collector.ended = time.perf_counter()
                self._add_server_timing(request, exc.headers, collector, True)
            raise
        except asyncio.CancelledError as exc:
            outcome = exc
            status = collector.sent_status or STATUS_CLIENT_CLOSED
            raise
        except Exception as exc:
            outcome = exc
            if _client_gone(request, exc):  # not a server error, whatever it raised
                status = collector.sent_status or STATUS_CLIENT_CLOSED
            else:
                raised = True
                # Nothing sent: aiohttp answers 500, and the prepare hook echoes the id.
                status = collector.sent_status or 500
                after = collector.sent_status is None
            raise
        finally:
            elapsed = (collector.ended or time.perf_counter()) - start
            current.reset(token)  # type: ignore[arg-type]  # set by _begin
            if after or _EXPECT in request.headers:
                # Never reset: it lives and dies with this request's task (aiohttp runs
                # each request in a task of its own), where finish_response prepares.
                # (With Expect, it also tells the prepare hook this request was seen.)
                _finished.set(collector)
            try:
                if after:  # recorded when the task is done, with the status sent
                    task = asyncio.current_task()
                    assert task is not None
                    task.add_done_callback(
                        functools.partial(
                            self._record_after,
                            request,
                            route,
                            collector,
                            start_ns,
                            elapsed,
                            outcome,
                            raised,
                        )
                    )
                elif (
                    raised
                    or collector.extra_tags
                    or collector.extra_fields
                    or status in self.failed_status_codes
                    or (
                        point := _request_point(
                            Point,
                            route.tag_sets,
                            route.params,
                            request.match_info,
                            status,
                            start_ns,
                            request_id,
                            elapsed,
                            collector.steps,
                        )
                    )
                    is None
                ):
                    self._record(
                        request, route, collector, start_ns, elapsed, status, outcome, raised
                    )
                else:  # the common case, with no call of lunamon's own in Python: the route's
                    # shared tags, fields of lunamon's own, one point
                    self.monitoring.emit(point)
            except Exception as exc:  # monitoring never breaks the request
                self._record_failed(exc)

    def _record_failed(self, exc: BaseException) -> None:
        """A request whose record failed: logged (rate-limited); the request goes on."""
        self._log.log("error", "record_failed", key="record", error=repr(exc)[:1024])

    def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> Any:
        """aiohttp's ``on_response_prepare`` hook: the status about to be sent, and the
        request id echoed on any response whose headers are still unsent."""
        collector = _current_get()
        inside = collector is not None  # a stream or websocket the handler prepares
        if collector is None:
            collector = _finished_get()
            if collector is None:
                if _EXPECT in request.headers:
                    self._record_expect_answer(request, response)
                return _READY
        if collector.sent_status is None:
            collector.sent_status = response.status
            if not inside and not collector.ended:
                # aiohttp's answer to an unhandled exception (it logs the exception first):
                # the request's execution ends when that answer is ready.
                collector.ended = time.perf_counter()
            headers = response.headers
            if self.request_id_header not in headers:
                headers[self.request_id_header] = collector.request_id
            if self.server_timing and "Server-Timing" not in headers:
                self._add_server_timing(request, headers, collector, not inside)
        return _READY

    def _add_server_timing(
        self, request: web.Request, headers: Any, collector: RequestCollector, total: bool
    ) -> None:
        """``Server-Timing: <step>;dur=<ms>, ..., total;dur=<ms>`` (browsers' devtools show it),
        only for a request that passes the gate; ``Vary`` names the gating header on every
        response, so that no cache hands a timed response to other clients."""
        header = self._timing_header
        if header is not None:
            _add_vary(headers, header)
            value = request.headers.get(header)
            secret = self._timing_secret
            if value is None or secret is None:
                return
            if not hmac.compare_digest(
                value.encode("utf-8", "surrogateescape"), secret.reveal().encode()
            ):
                return
        if self._timing_allow is not None:
            try:
                if not self._timing_allow(request):
                    return
            except Exception as exc:  # a failing gate shows nothing, and breaks nothing
                self._log.log(
                    "error", "server_timing_allow_failed", key="sta", error=repr(exc)[:512]
                )
                return
        parts = [
            f"{_timing_name(name)};dur={seconds * 1000:.3f}"
            for name, seconds in collector.steps.items()
        ]
        if total:  # execution_time itself; a stream's header goes out before it is known
            parts.append(f"total;dur={(collector.ended - collector.started) * 1000:.3f}")
        if parts:
            headers["Server-Timing"] = ", ".join(parts)

    def _record_expect_answer(self, request: web.Request, response: web.StreamResponse) -> None:
        """A request answered by its route's Expect handler, which aiohttp runs before the
        middlewares: recorded here, with the status sent and no execution time (0.0)."""
        try:
            route = self._route(request.method, request.match_info.route.resource)
            if route.excluded:
                return
            start_ns = _point_time(time.time_ns())
            request_id = request.headers.get(self.request_id_header)
            if request_id is None or not plausible_request_id(request_id):
                request_id = _request_id(start_ns // 1_000_000_000)
            response.headers[self.request_id_header] = request_id
            collector = RequestCollector(route.name, request_id)
            collector.sent_status = response.status
            self._record(request, route, collector, start_ns, 0.0, response.status, response, False)
        except Exception as exc:  # monitoring never breaks the request
            self._record_failed(exc)

    def _record_after(
        self,
        request: web.Request,
        route: _Route,
        collector: RequestCollector,
        start_ns: int,
        elapsed: float,
        outcome: web.StreamResponse | BaseException | None,
        raised: bool,
        _task: object,
    ) -> None:
        """Record a response aiohttp prepared after the handler, once its task is done: a
        ``FileResponse`` and the like, or aiohttp's 500 for an unhandled exception, whose
        execution ends when that answer is ready (see :meth:`on_response_prepare`)."""
        if raised:  # a server error whatever reached the client
            status = collector.sent_status or 500
            if collector.ended:
                elapsed = collector.ended - collector.started
        else:
            status = collector.sent_status or STATUS_CLIENT_CLOSED  # never sent: client left
        try:
            self._record(request, route, collector, start_ns, elapsed, status, outcome, raised)
        except Exception as exc:  # monitoring never breaks the request
            self._record_failed(exc)

    def _record(
        self,
        request: web.Request,
        route: _Route,
        collector: RequestCollector,
        start_ns: int,
        elapsed: float,
        status: int,
        outcome: web.StreamResponse | BaseException | None,
        raised: bool,
    ) -> None:
        tags: dict[str, str] = route.tags(status, request)
        if collector.extra_tags:
            tags = dict(tags)  # the shared TagSet stays as it is
            for key, value in collector.extra_tags.items():
                tags.setdefault(key, value)
        fields: dict[str, FieldValue] = {
            "request_id": collector.request_id,
            "execution_time": _to_the_ns(elapsed),
        }
        if collector.steps:
            fields.update(collector.steps)
        if collector.extra_fields:
            for key, field in collector.extra_fields.items():
                fields.setdefault(key, field)
        emit = self.monitoring.emit
        emit(_point("request", start_ns, tags, fields))
        if raised or status in self.failed_status_codes:
            error_tags = dict(tags)
            error_tags["error_code"] = str(self._error_code(request, status, outcome, raised))
            emit(_point("error", start_ns, error_tags, {"request_id": collector.request_id}))

    def _error_code(
        self,
        request: web.Request,
        status: int,
        outcome: web.StreamResponse | BaseException | None,
        raised: bool,
    ) -> int:
        """The exception's ``error_code``, a JSON body's, the user's getter's, else 1
        (an unhandled exception or a 5xx) or 0."""
        code = _int_or_none(getattr(outcome, "error_code", None))
        if code is None and isinstance(outcome, web.Response):
            code = _error_code_from_body(outcome)
        if code is None and self.error_code_getter is not None and outcome is not None:
            try:
                code = _int_or_none(self.error_code_getter(request, outcome))
            except Exception as exc:
                self._log.log("error", "error_code_getter_failed", key="ec", error=repr(exc)[:512])
        if code is None:
            code = 1 if raised or status >= 500 else 0
        return code


def _to_the_ns(seconds: float) -> float:
    """``seconds`` rounded to whole nanoseconds (see ``RequestCollector.add_step``)."""
    return round(seconds * 1e9) / 1e9 if -NS_EXACT_BELOW < seconds < NS_EXACT_BELOW else seconds


def _py_request_point(
    point_type: type[Point],
    tag_sets: dict[object, TagSet],
    params: tuple[str, ...],
    match_info: Any,
    status: int,
    start_ns: int,
    request_id: str,
    elapsed: float,
    steps: dict[str, float],
) -> Point | None:
    """The ``request`` point of a request with nothing but lunamon's own fields and the
    route's shared tags; None when that tag set is not made yet. ``_speedups.request_point``
    is this, compiled (tests/test_speedups.py compares them)."""
    key = (status, *map(match_info.get, params)) if params else status
    tags = tag_sets.get(key)
    if tags is None:
        return None
    fields: dict[str, FieldValue] = {
        "request_id": request_id,
        "execution_time": _to_the_ns(elapsed),
    }
    if steps:
        fields.update(steps)
    return tuple.__new__(point_type, ("request", start_ns, tags, fields))


def _py_begin(
    collector_type: type[RequestCollector],
    route: str,
    header_value: str | None,
    now_ns: int,
    context_var: ContextVar[RequestCollector | None],
) -> RequestCollector:
    """A monitored request starts: its point time, its id (the client's when plausible,
    else a new one from the point time's second), its collector (``started`` now) set in
    ``context_var``. ``_speedups.begin`` is this, compiled (tests compare them)."""
    start_ns = _point_time(now_ns)
    if header_value is None or not plausible_request_id(header_value):
        header_value = _request_id(start_ns // 1_000_000_000)
    collector = collector_type(route, header_value)
    collector._start_ns = start_ns
    collector._token = context_var.set(collector)
    collector.started = time.perf_counter()
    return collector


_request_point: Callable[..., Point | None] = _py_request_point
_begin: Callable[..., RequestCollector] = _py_begin
# RequestRecorder.run and its prepare hook compiled (Runner, PrepareGate), when built.
_compiled = _ids._core
if _ids._core is not None:
    _request_point = _ids._core.request_point
    _begin = _ids._core.begin


_timing_names: dict[str, str] = {}
_NOT_TOKEN: Final = re.compile(r"[^!#$%&'*+\-.^_`|~0-9A-Za-z]")


def _read_timing_secret(path: str) -> str:
    """The value of ``server_timing_secret_file``; a missing, empty or guessable one is
    refused at setup, naming the setting."""
    try:
        with open(path, encoding="utf-8") as file:
            value = file.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(
            f"monitoring.server_timing_secret_file: cannot read {path!r}: {exc.__class__.__name__}"
        ) from None
    if len(value) < MIN_TIMING_SECRET:
        raise SettingsError(
            f"monitoring.server_timing_secret_file: {path!r} must hold at least"
            f" {MIN_TIMING_SECRET} characters (a secret no client can guess)"
        )
    return value


def _add_vary(headers: Any, name: str) -> None:
    """Add ``name`` to the response's ``Vary`` header (kept as it is when it is ``*`` or
    names it already)."""
    vary = headers.get("Vary")
    if vary is None:
        headers["Vary"] = name
        return
    names = [item.strip().lower() for item in vary.split(",")]
    if "*" not in names and name.lower() not in names:
        headers["Vary"] = f"{vary}, {name}"


def _timing_name(step: str) -> str:
    """A step's field name as a Server-Timing metric name (a header token)."""
    name = _timing_names.get(step)
    if name is None:
        base = step[: -len("_time")] if step.endswith("_time") else step
        name = _NOT_TOKEN.sub("_", base) or "step"
        if len(_timing_names) < 1000:
            _timing_names[step] = name
    return name


def _client_gone(request: web.Request, exc: Exception) -> bool:
    """Whether ``exc`` comes from writing to a client that left (not from the server's work)."""
    if not isinstance(exc, ConnectionError):
        return False
    transport = request.transport
    return transport is None or transport.is_closing()


class _Ready:
    """An awaitable that is already done: the prepare hook's answer, no coroutine made."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return iter(())  # type: ignore[return-value]


_READY: Final = _Ready()


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
