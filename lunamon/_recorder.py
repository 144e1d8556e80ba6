"""The request recorder: one monitored request in, a ``request`` point (and an
``error`` point for a failed one) out.

The middleware and ``monitor_request`` share it. Everything that depends only
on the route (its tag, exclusion, which path parameters become tags) is worked
out once per route and cached; per request it reads the clock, takes or makes
the request id, runs the handler with a collector in context, and emits.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web
from multidict import istr

from lunamon._ids import new_request_id, plausible_request_id
from lunamon._log import RateLimitedLogger
from lunamon._validation import sanitize_tag_value
from lunamon.collector import RequestCollector, current
from lunamon.monitoring import Monitoring
from lunamon.point import FieldValue, Point, TagSet
from lunamon.settings import MonitoringSettings

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
            if len(self._routes) < _MAX_ROUTES:
                self._routes[key] = route
        return route

    @web.middleware
    async def run(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Serve ``request`` with ``handler`` as a monitored request.

        Also the middleware itself: ``setup`` installs this bound method, so no
        coroutine of lunamon's stands between aiohttp and the recorder.
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
        if request_id is None or not plausible_request_id(request_id):
            request_id = new_request_id(start_ns // 1_000_000_000)
        collector = RequestCollector(route.name, request_id)
        token = current.set(collector)
        start = time.perf_counter()
        status = 500
        outcome: web.StreamResponse | BaseException | None = None
        raised = False  # the handler raised something other than an HTTPException
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
            raised = True
            raise
        finally:
            elapsed = time.perf_counter() - start
            current.reset(token)
            try:
                self._record(request, route, collector, start_ns, elapsed, status, outcome, raised)
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
        raised: bool,
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
        emit(_point("request", start_ns, tags, fields))
        if raised or status in self.failed_status_codes:
            error_tags = dict(tags)
            error_tags["error_code"] = str(self._error_code(request, status, outcome))
            emit(_point("error", start_ns, error_tags, {"request_id": collector.request_id}))

    def _error_code(
        self,
        request: web.Request,
        status: int,
        outcome: web.StreamResponse | BaseException | None,
    ) -> int:
        """The exception's ``error_code``, a JSON body's, the user's getter's, else 1 or 0."""
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
