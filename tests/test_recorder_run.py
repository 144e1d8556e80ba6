"""``RequestRecorder.run`` called directly, as aiohttp calls a middleware: what it records
and when, on each way a handler can end (the mutants `make mutate` found untested)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Final

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from aiohttp.typedefs import Middleware
from multidict import CIMultiDict, CIMultiDictProxy
from structlog.testing import capture_logs

import lunamon
from lunamon import MemorySink, Monitoring, MonitoringSettings, Point, _ids
from lunamon._recorder import RequestRecorder, _to_the_ns

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class LunaError(Exception):
    error_code = 11


class Interrupted(BaseException):
    """Neither an ``Exception`` nor a cancellation: passes every ``except`` of ``run``."""


# Every test of a direct call runs twice: through ``run`` (the Python reference) and through
# ``middleware``, what setup() installs (the compiled Runner when the extension is built).
_WAYS: Final = ("run", "middleware")
_chosen: list[str] = ["run"]


@pytest.fixture(params=_WAYS, autouse=True)
def _both_ways(request: pytest.FixtureRequest) -> Iterator[None]:
    _chosen[0] = request.param
    yield
    _chosen[0] = "run"


def _way(recorder: RequestRecorder) -> Middleware:
    middleware: Middleware = getattr(recorder, _chosen[0])
    return middleware


def _recorder(**options: Any) -> tuple[RequestRecorder, Monitoring, MemorySink]:
    error_code = options.pop("error_code", None)
    settings = MonitoringSettings(service="svc", **options)
    sink = MemorySink()
    monitoring = Monitoring(settings, [sink])
    return RequestRecorder(monitoring, settings, error_code), monitoring, sink


async def _request(headers: dict[str, str] | None = None) -> web.Request:
    """A ``GET /things`` resolved by a real router, as aiohttp hands it to a middleware."""
    app = web.Application()
    app.router.add_get("/things", _unused)
    app.freeze()
    probe = make_mocked_request("GET", "/things", app=app)
    match_info = await app.router.resolve(probe)
    match_info.add_app(app)
    match_info.freeze()
    request = make_mocked_request("GET", "/things", headers=headers or {}, app=app)
    request._match_info = match_info
    return request


async def _unused(request: web.Request) -> web.Response:
    raise AssertionError("never served")


def _emitted(monitoring: Monitoring) -> list[Point]:
    """The points emitted so far (buffered, not yet written): no flush, no task switch."""
    channel = monitoring._flusher._channels[0]
    assert channel.packed == 0  # a few points: never packed
    return [point for point in channel.buffer if isinstance(point, Point)]


async def test_a_response_is_recorded_before_run_returns() -> None:
    recorder, monitoring, _ = _recorder()

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    before = time.perf_counter()
    response = await _way(recorder)(await _request(), ok)
    took = time.perf_counter() - before
    (point,) = _emitted(monitoring)  # not deferred to the end of the request's task
    assert response.headers["Luna-Request-Id"] == point.fields["request_id"]
    assert point.tags["status_code"] == "200"
    assert 0.0 <= point.fields["execution_time"] <= took  # type: ignore[operator]
    seconds = point.fields["execution_time"]
    # whole nanoseconds (k / 1e9 exactly), the encoder's fast path; k * 1e9 need not be exact
    assert round(seconds * 1e9) / 1e9 == seconds  # type: ignore[operator]


async def test_an_http_exception_is_recorded_before_it_leaves_run() -> None:
    recorder, monitoring, _ = _recorder()

    async def missing(request: web.Request) -> web.Response:
        raise web.HTTPNotFound()

    with pytest.raises(web.HTTPNotFound):
        await _way(recorder)(await _request(), missing)
    request, error = _emitted(monitoring)
    assert (request.series, request.tags["status_code"]) == ("request", "404")
    assert (error.series, error.tags["error_code"]) == ("error", "0")


async def test_the_request_id_carries_the_second_of_the_point_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder, monitoring, _ = _recorder()

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    monkeypatch.setattr(time, "time_ns", lambda: 1_000_000_000_999_999_000)
    _ids._set_clock(0)  # the process's clocks share their last time
    await _way(recorder)(await _request(), ok)
    (point,) = _emitted(monitoring)
    assert str(point.fields["request_id"]).startswith("1000000000,")
    assert point.time_ns // 10**9 == 1_000_000_000


async def test_an_exception_keeps_its_error_code() -> None:
    recorder, monitoring, _ = _recorder()

    async def failing(request: web.Request) -> web.Response:
        raise LunaError("no face")

    # Recorded when the request's task is done: aiohttp's 500 is part of its execution.
    served = await _request()

    async def serve() -> web.StreamResponse:  # a task of its own, as aiohttp gives a request
        return await _way(recorder)(served, failing)

    task = asyncio.create_task(serve())
    with pytest.raises(LunaError):
        await task
    await asyncio.sleep(0)  # the task's done callbacks run on the next loop turn
    request, error = _emitted(monitoring)
    assert request.tags["status_code"] == "500"
    assert error.tags["error_code"] == "11"


async def test_a_base_exception_is_recorded_as_a_500_with_the_default_code() -> None:
    # The getter answers for any outcome it is given; none exists for a BaseException
    # that passed every except of run, so it is not asked and the code is the default.
    recorder, monitoring, _ = _recorder(error_code=lambda request, outcome: 42)

    async def interrupted(request: web.Request) -> web.Response:
        raise Interrupted()

    with pytest.raises(Interrupted):
        await _way(recorder)(await _request(), interrupted)
    request, error = _emitted(monitoring)
    assert request.tags["status_code"] == "500"
    assert error.tags["error_code"] == "1"


async def test_a_cancelled_handler_gives_the_getter_its_cancellation() -> None:
    seen: list[object] = []

    def getter(request: web.Request, outcome: object) -> int:
        seen.append(outcome)
        return 77

    recorder, monitoring, _ = _recorder(error_code=getter)

    async def cancelled(request: web.Request) -> web.Response:
        raise asyncio.CancelledError()

    with pytest.raises(asyncio.CancelledError):
        await _way(recorder)(await _request(), cancelled)
    request, error = _emitted(monitoring)
    assert request.tags["status_code"] == "499"  # the client left before any status
    assert error.tags["error_code"] == "77"
    assert [type(outcome) for outcome in seen] == [asyncio.CancelledError]


async def test_server_timing_on_an_http_exception_only_when_asked() -> None:
    secret = "0123456789abcdef-timing"
    recorder, _, _ = _recorder(server_timing=True, server_timing_when=f"X-Debug-Timing: {secret}")

    async def missing(request: web.Request) -> web.Response:
        raise web.HTTPNotFound()

    with pytest.raises(web.HTTPNotFound) as asked:
        await _way(recorder)(await _request({"X-Debug-Timing": secret}), missing)
    assert asked.value.headers["Server-Timing"].startswith("total;dur=")
    with pytest.raises(web.HTTPNotFound) as not_asked:
        await _way(recorder)(await _request(), missing)
    assert "Server-Timing" not in not_asked.value.headers


async def test_a_point_that_cannot_be_emitted_is_logged_and_the_response_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder, monitoring, _ = _recorder()
    broken = RuntimeError("emit broke " + "e" * 2000)  # longer than the 1,024 logged

    def raising_emit(point: Point) -> None:
        raise broken

    monkeypatch.setattr(monitoring, "emit", raising_emit)

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    with capture_logs() as logs:
        response = await _way(recorder)(await _request(), ok)
    assert isinstance(response, web.Response)
    assert response.text == "ok"
    event = {"event": "record_failed", "error": repr(broken)[:1024], "log_level": "error"}
    assert [e for e in logs if e["event"] == "record_failed"] == [event]


# ------------------------------------------------------------------ monitor_request's calls


Inner = Callable[..., Awaitable[web.Response]]


def _monitored_functions() -> tuple[Inner, Callable[..., Awaitable[int]], type[web.View]]:
    """Decorated when a test runs, not at import (``make mutate`` activates its mutants
    only after the import)."""

    @lunamon.monitor_request
    async def inner(request: web.Request, suffix: str = "") -> web.Response:
        """A monitored handler other code calls with more than the request."""
        return web.Response(text=f"{request.match_info['name']}{suffix}")

    @lunamon.monitor_request
    async def helper(value: int, *, more: int) -> int:
        """Monitored by mistake: not a handler at all."""
        return value + more

    class EchoView(web.View):
        @lunamon.monitor_request
        async def get(self) -> web.Response:
            return web.Response(text=self.request.match_info["name"])

    return inner, helper, EchoView


async def test_monitor_request_passes_every_argument_on(aiohttp_client: Any) -> None:
    _inner, _, _EchoView = _monitored_functions()

    async def by_keyword(request: web.Request) -> web.Response:
        return await _inner(request=request, suffix="!")

    async def with_keyword(request: web.Request) -> web.Response:
        return await _inner(request, suffix="?")

    async def positional(request: web.Request) -> web.Response:
        return await _inner(request, ".")

    sink = MemorySink()
    app = web.Application()
    app.router.add_get("/keyword/{name}", by_keyword)
    app.router.add_get("/with/{name}", with_keyword)
    app.router.add_get("/positional/{name}", positional)
    app.router.add_view("/view/{name}", _EchoView)
    monitoring = lunamon.setup(app, service="svc", sinks=[sink], middleware=False)
    client = await aiohttp_client(app)
    texts = [
        await (await client.get(path)).text()
        for path in ("/keyword/a", "/with/b", "/positional/c", "/view/d")
    ]
    assert texts == ["a!", "b?", "c.", "d"]
    await monitoring.flush()
    assert [(p.tags["route"], p.tags["status_code"]) for p in sink.points] == [
        ("GET:/keyword/{name}", "200"),
        ("GET:/with/{name}", "200"),
        ("GET:/positional/{name}", "200"),
        ("GET:/view/{name}", "200"),
    ]


async def test_monitor_request_on_something_else_only_calls_it() -> None:
    _inner, _helper, _ = _monitored_functions()
    assert await _helper(1, more=2) == 3
    assert _inner.__name__ == "inner"
    assert _inner.__doc__ == "A monitored handler other code calls with more than the request."


async def test_monitor_request_without_setup_passes_every_argument_on(
    aiohttp_client: Any,
) -> None:
    _inner, _, _ = _monitored_functions()

    async def by_keyword(request: web.Request) -> web.Response:
        return await _inner(request=request, suffix="!")

    async def positional(request: web.Request) -> web.Response:
        return await _inner(request, ".")

    app = web.Application()  # no lunamon.setup: the wrapper finds no recorder
    app.router.add_get("/keyword/{name}", by_keyword)
    app.router.add_get("/positional/{name}", positional)
    client = await aiohttp_client(app)
    assert await (await client.get("/keyword/a")).text() == "a!"
    assert await (await client.get("/positional/b")).text() == "b."


# ------------------------------------------------------------------ found by make mutate


async def _request_seen_by(recorder: RequestRecorder) -> web.Request:
    """A ``GET /things`` whose app has the recorder's prepare hook, as ``setup`` installs it:
    a response the handler prepares is seen there."""
    app = web.Application()
    app.router.add_get("/things", _unused)
    app.on_response_prepare.append(recorder.prepare_hook)
    app.freeze()
    match_info = await app.router.resolve(make_mocked_request("GET", "/things", app=app))
    match_info.add_app(app)
    match_info.freeze()
    request = make_mocked_request("GET", "/things", app=app)
    request._match_info = match_info
    return request


async def _ok(request: web.Request) -> web.Response:
    return web.Response()


async def test_a_tag_alone_added_by_the_handler_is_on_its_point() -> None:
    recorder, monitoring, _ = _recorder()

    async def tagged(request: web.Request) -> web.Response:
        lunamon.add_tag("tenant", "t1")  # no field: the tags alone leave the common point
        return web.Response()

    request = await _request()  # one app, one route: its shared tags are made by the first
    await _way(recorder)(request, _ok)
    await _way(recorder)(request, tagged)
    plain, point = _emitted(monitoring)
    assert "tenant" not in plain.tags
    assert point.tags["tenant"] == "t1"


async def test_a_stream_that_fails_after_its_status_went_out_is_an_error_too() -> None:
    recorder, monitoring, _ = _recorder()

    async def breaks(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        raise LunaError("the body broke off")

    served = await _request_seen_by(recorder)  # one route: its shared tags made by the first
    await _way(recorder)(served, _ok)
    with pytest.raises(LunaError):
        await _way(recorder)(served, breaks)
    _, request, error = _emitted(monitoring)
    assert (request.series, request.tags["status_code"]) == ("request", "200")  # as sent
    assert (error.series, error.tags["error_code"]) == ("error", "11")


async def test_a_stream_is_timed_to_its_handler_end_not_to_its_status_line() -> None:
    recorder, monitoring, _ = _recorder()

    async def streams(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await asyncio.sleep(0.02)  # the body's work, after the status line went out
        return response

    await _way(recorder)(await _request_seen_by(recorder), streams)
    (point,) = _emitted(monitoring)
    assert point.fields["execution_time"] >= 0.02  # type: ignore[operator]


async def test_a_timing_gate_value_that_is_not_utf8_only_shows_nothing() -> None:
    secret = "0123456789abcdef-timing"
    recorder, monitoring, _ = _recorder(
        server_timing=True, server_timing_when=f"X-Debug-Timing: {secret}"
    )
    request = await _request()
    # aiohttp's parser reads a header's bytes that are not UTF-8 as surrogates (which
    # make_mocked_request cannot encode): the gate compares them as those bytes again
    request._headers = CIMultiDictProxy(CIMultiDict({"X-Debug-Timing": "\udcff" + secret}))
    response = await _way(recorder)(request, _ok)
    assert "Server-Timing" not in response.headers
    (point,) = _emitted(monitoring)
    assert point.tags["status_code"] == "200"


def test_execution_times_are_kept_to_the_nanosecond_at_any_size() -> None:
    assert _to_the_ns(1000.000000123) == 1000.000000123
    assert _to_the_ns(3.0000000005) == 3.0  # half a nanosecond, rounded to even
    beyond = math.nextafter(4.1e6, math.inf)  # beyond 4e6 s a double holds parts of a ns
    assert _to_the_ns(beyond) == beyond  # kept as it is
