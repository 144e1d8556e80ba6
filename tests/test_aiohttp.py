"""The middleware, monitor_request and setup, against a real aiohttp server."""

from __future__ import annotations

import asyncio
import inspect
import json
import random
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, make_mocked_request
from servers import free_port

import lunamon
from lunamon import MONITORING_KEY, MemorySink, Point
from lunamon.demo.service import SUBSTEPS, create_app
from lunamon.point import compiled_speedups
from lunamon.testing import CapturedPoints

ClientFactory = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]

REQUEST_ID = re.compile(
    r"^\d{10},[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
)
SEED_PATHS = {
    "POST:/detector": "/detector",
    "POST:/extractor": "/extractor",
    "POST:/extractor/upgrade": "/extractor/upgrade",
    "POST:/handlers/{handlerId}/events": "/handlers/3fa85f64-5717-4562-b3fc-2c963f66afa6/events",
    "POST:/verifiers/{verifierId}/verifications": "/verifiers/v1/verifications",
}

SECRET = "0123456789abcdef-timing"  # a Server-Timing gate's secret (16+ characters)


async def _points(app: web.Application, sink: MemorySink) -> list[Point]:
    await app[MONITORING_KEY].flush()
    return sink.points


def _one(points: list[Point], series: str) -> Point:
    found = [p for p in points if p.series == series]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("route", sorted(SUBSTEPS))
async def test_every_seed_resource_gives_the_exact_point(
    aiohttp_client: ClientFactory, route: str
) -> None:
    sink = MemorySink()
    app = create_app(sinks=[sink])
    client = await aiohttp_client(app)
    before = time.time_ns()
    response = await client.post(SEED_PATHS[route])
    after = time.time_ns()
    assert response.status in (200, 201)
    points = await _points(app, sink)
    point = _one(points, "request")
    assert not [p for p in points if p.series == "error"]
    expected_tags = {
        "service": "luna-handlers",
        "route": route,
        "status_code": str(response.status),
    }
    if "{handlerId}" in route:
        expected_tags["handler_id"] = "3fa85f64-5717-4562-b3fc-2c963f66afa6"
    if "{verifierId}" in route:
        expected_tags["verifier_id"] = "v1"
    assert dict(point.tags) == expected_tags
    assert set(point.fields) == {"request_id", "execution_time", *SUBSTEPS[route]}
    for name, value in point.fields.items():
        if name == "request_id":
            assert isinstance(value, str)
            assert REQUEST_ID.match(value)
            assert response.headers["Luna-Request-Id"] == value
        else:
            assert type(value) is float, name
            assert value >= 0.0
    steps = [float(v) for k, v in point.fields.items() if k not in ("request_id", "execution_time")]
    assert float(point.fields["execution_time"]) >= max(steps)
    assert before <= point.time_ns <= after


@pytest.mark.parametrize(
    ("fail", "status", "error_code"),
    [
        ("400", 400, "12012"),  # LUNA JSON error body
        ("500", 500, "1"),
        ("luna_exc", 500, "10015"),  # exception carrying error_code
        ("http", 400, "0"),  # web.HTTPException raised
        ("raise", 500, "1"),  # unhandled exception
    ],
)
async def test_failed_requests_give_an_error_point(
    aiohttp_client: ClientFactory, fail: str, status: int, error_code: str
) -> None:
    sink = MemorySink()
    app = create_app(sinks=[sink])
    client = await aiohttp_client(app)
    response = await client.post(f"/handlers/h-1/events?fail={fail}")
    assert response.status == status
    points = await _points(app, sink)
    request, error = _one(points, "request"), _one(points, "error")
    assert request.tags["status_code"] == str(status)
    assert dict(error.tags) == {
        "service": "luna-handlers",
        "route": "POST:/handlers/{handlerId}/events",
        "status_code": str(status),
        "handler_id": "h-1",
        "error_code": error_code,
    }
    assert dict(error.fields) == {"request_id": request.fields["request_id"]}
    assert error.time_ns == request.time_ns
    # Steps that ran before the failure are there; later ones are absent, not 0.
    assert set(request.fields) == {
        "request_id",
        "execution_time",
        "load_images_for_processing_time",
    }


async def test_cancelled_handler_is_recorded_as_499_and_reraised(
    aiohttp_client: ClientFactory,
) -> None:
    sink = MemorySink()
    app = create_app(sinks=[sink])
    seen: list[BaseException] = []

    @web.middleware
    async def outer(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)  # type: ignore[no-any-return]
        except BaseException as exc:
            seen.append(exc)
            raise

    app.middlewares.insert(0, outer)  # outside lunamon's: sees what lunamon lets through
    client = await aiohttp_client(app)
    with pytest.raises(asyncio.TimeoutError):
        await client.post("/detector?fail=hang", timeout=aiohttp.ClientTimeout(total=0.2))
    monitoring = app[MONITORING_KEY]
    deadline = time.monotonic() + 5
    while not any(p.series == "request" for p in sink.points) and time.monotonic() < deadline:
        await monitoring.flush()
        await asyncio.sleep(0.01)
    request = _one(sink.points, "request")
    assert request.tags["status_code"] == "499"
    assert _one(sink.points, "error").tags["error_code"] == "0"
    assert len(seen) == 1
    assert isinstance(seen[0], asyncio.CancelledError)


@pytest.mark.parametrize(
    "path",
    ["/no/such/route", "/evil%0Ainjected%20v=1", "/a=b,c%0D%0Ad", "/handlers/x/events/extra"],
)
async def test_unmatched_route_keeps_user_text_out_of_tags(
    aiohttp_client: ClientFactory, path: str
) -> None:
    sink = MemorySink()
    app = create_app(sinks=[sink])
    client = await aiohttp_client(app)
    response = await client.post(path)
    assert response.status == 404
    points = await _points(app, sink)
    for point in points:
        assert point.tags["route"] == "POST:<unmatched>"
        assert set(point.tags) <= {"service", "route", "status_code", "error_code"}
        assert "\n" not in point.to_line_protocol()


async def test_unusual_methods_are_bounded(aiohttp_client: ClientFactory) -> None:
    async def any_method(request: web.Request) -> web.Response:
        return web.Response(text=request.method)

    sink = MemorySink()
    app = web.Application()
    app.router.add_route("*", "/any", any_method)
    monitoring = lunamon.setup(app, service="svc", sinks=[sink])
    client = await aiohttp_client(app)
    for method in ("PROPFIND", "MKCOL", "GET"):
        assert await (await client.request(method, "/any")).text() == method
    await monitoring.flush()
    assert [p.tags["route"] for p in sink.points] == ["OTHER:/any", "OTHER:/any", "GET:/any"]


async def test_concurrent_requests_never_mix_their_steps(aiohttp_client: ClientFactory) -> None:
    sink = MemorySink()
    app = create_app(sinks=[sink], latency=0.002)
    client = await aiohttp_client(app)
    rng = random.Random(7)
    routes = [rng.choice(sorted(SEED_PATHS)) for _ in range(100)]

    async def call(i: int, route: str) -> tuple[str, str]:
        path = SEED_PATHS[route].replace("v1", f"v{i}").replace("3fa85f64", f"{i:08d}")
        response = await client.post(path)
        assert response.status in (200, 201)
        return response.headers["Luna-Request-Id"], path

    results = await asyncio.gather(*(call(i, r) for i, r in enumerate(routes)))
    points = {p.fields["request_id"]: p for p in await _points(app, sink)}
    assert len(points) == 100
    for (request_id, path), route in zip(results, routes, strict=True):
        point = points[request_id]
        assert point.tags["route"] == route
        assert set(point.fields) == {"request_id", "execution_time", *SUBSTEPS[route]}
        if "handler_id" in point.tags:
            assert point.tags["handler_id"] in path
        if "verifier_id" in point.tags:
            assert f"/verifiers/{point.tags['verifier_id']}/" in path
    assert len({p.time_ns for p in points.values()}) == 100


async def test_request_id_header_is_taken_checked_and_echoed(
    aiohttp_client: ClientFactory,
) -> None:
    sink = MemorySink()
    app = create_app(sinks=[sink])
    client = await aiohttp_client(app)
    good = "1700000000,11111111-2222-4333-8444-555555555555"
    r1 = await client.post("/detector", headers={"Luna-Request-Id": good})
    r2 = await client.post("/detector", headers={"Luna-Request-Id": "x" * 129})
    r3 = await client.post("/detector", headers={"Luna-Request-Id": "bad\tid"})
    assert r1.headers["Luna-Request-Id"] == good
    points = await _points(app, sink)
    ids = [p.fields["request_id"] for p in points]
    assert ids[0] == good
    for generated, response in zip(ids[1:], (r2, r3), strict=True):
        assert REQUEST_ID.match(str(generated))
        assert response.headers["Luna-Request-Id"] == generated


async def test_excluded_route_gives_no_point(aiohttp_client: ClientFactory) -> None:
    sink = MemorySink()
    app = create_app(sinks=[sink])
    client = await aiohttp_client(app)
    assert (await client.get("/healthcheck")).status == 204
    assert await _points(app, sink) == []


async def test_handler_tags_and_fields(
    aiohttp_client: ClientFactory, lunamon_points: CapturedPoints
) -> None:
    async def handler(request: web.Request) -> web.Response:
        lunamon.add_tag("account", "acme")
        lunamon.add_field("faces", 3)
        lunamon.add_field("execution_time", "must not override")
        collector = lunamon.current_request()
        assert collector is not None
        return web.json_response({"error_code": 7, "desc": "x"}, status=422)

    app = web.Application()
    app.router.add_post("/things", handler)
    lunamon.setup(app, service="svc", sinks=[MemorySink()])
    client = await aiohttp_client(app)
    await client.post("/things")
    request, error = lunamon_points.series("request")[0], lunamon_points.series("error")[0]
    assert request.tags["account"] == "acme"
    assert error.tags["account"] == "acme"
    assert error.tags["error_code"] == "7"
    assert request.fields["faces"] == 3
    assert type(request.fields["execution_time"]) is float
    assert "faces" not in error.fields


async def test_monitor_request_without_middleware(aiohttp_client: ClientFactory) -> None:
    @lunamon.monitor_request
    async def monitored(request: web.Request) -> web.Response:
        await step()
        return web.Response(text="ok")

    @lunamon.timed("step_time")
    async def step() -> None:
        await asyncio.sleep(0)

    async def plain(request: web.Request) -> web.Response:
        return web.Response(text="plain")

    class ThingView(web.View):
        @lunamon.monitor_request
        async def get(self) -> web.Response:
            await step()
            return web.Response(text="view")

    sink = MemorySink()
    app = web.Application()
    app.router.add_get("/monitored/{handlerId}", monitored)
    app.router.add_get("/plain", plain)
    app.router.add_view("/view", ThingView)
    monitoring = lunamon.setup(app, service="svc", sinks=[sink], middleware=False)
    assert not app.middlewares
    client = await aiohttp_client(app)
    assert await (await client.get("/monitored/h7")).text() == "ok"
    assert await (await client.get("/plain")).text() == "plain"
    assert await (await client.get("/view")).text() == "view"
    await monitoring.flush()
    routes = [(p.tags["route"], p.tags.get("handler_id"), set(p.fields)) for p in sink.points]
    assert routes == [
        ("GET:/monitored/{handlerId}", "h7", {"request_id", "execution_time", "step_time"}),
        ("GET:/view", None, {"request_id", "execution_time", "step_time"}),
    ]


def test_monitor_request_is_a_coroutine_function_bound_as_a_method() -> None:
    """What aiohttp (a coroutine function, or it wraps the handler), ``@timed`` and
    ``inspect.signature`` read, compiled or not."""

    @lunamon.monitor_request
    async def handler(request: web.Request, suffix: str = "") -> web.Response:
        """The doc."""
        return web.Response(text=suffix)

    class ThingView(web.View):
        @lunamon.monitor_request
        async def get(self) -> web.Response:
            return web.Response()

    compiled = compiled_speedups() is not None
    assert (type(handler).__name__ == "MonitoredHandler") is compiled
    assert inspect.iscoroutinefunction(handler)
    assert asyncio.iscoroutinefunction(handler)
    assert inspect.iscoroutinefunction(lunamon.timed("step_time")(handler))
    assert inspect.iscoroutinefunction(ThingView.get)
    assert (handler.__name__, handler.__qualname__, handler.__doc__) == (
        "handler",
        "test_monitor_request_is_a_coroutine_function_bound_as_a_method.<locals>.handler",
        "The doc.",
    )
    assert str(inspect.signature(handler)) == str(inspect.signature(handler.__wrapped__))
    view = ThingView(make_mocked_request("GET", "/"))
    assert view.get.__self__ is view
    assert view.get.__func__ is ThingView.__dict__["get"]


async def test_monitor_request_calls_the_middleware_itself_once_it_knows_the_app(
    aiohttp_client: ClientFactory,
) -> None:
    """With the extension built, ``handler(request)`` for the app the handler last served
    is the middleware's own awaitable, no coroutine of lunamon's between; every other call
    (another app, more arguments, a request monitored already) is the reference's."""

    @lunamon.monitor_request
    async def hello(request: web.Request, suffix: str = "") -> web.Response:
        return web.Response(text="hi" + suffix)

    coroutines: list[bool] = []

    async def probe(request: web.Request) -> web.StreamResponse:
        awaitable: Awaitable[web.StreamResponse] = hello(request)
        coroutines.append(inspect.iscoroutine(awaitable))
        return await awaitable

    async def suffixed(request: web.Request) -> web.StreamResponse:
        awaitable: Awaitable[web.StreamResponse] = hello(request, suffix="!")
        coroutines.append(inspect.iscoroutine(awaitable))
        return await awaitable

    @lunamon.monitor_request
    async def outer(request: web.Request) -> web.StreamResponse:
        response: web.StreamResponse = await hello(request)  # monitored already: as outer
        return response

    sink = MemorySink()
    app = web.Application()
    app.router.add_get("/probe", probe)
    app.router.add_get("/hello", hello)
    app.router.add_get("/suffixed", suffixed)
    app.router.add_get("/outer", outer)
    monitoring = lunamon.setup(app, service="svc", sinks=[sink], middleware=False)
    client = await aiohttp_client(app)
    texts = [await (await client.get(path)).text() for path in ("/probe", "/hello", "/probe")]
    texts += [await (await client.get(path)).text() for path in ("/suffixed", "/outer")]
    assert texts == ["hi", "hi", "hi", "hi!", "hi"]
    compiled = compiled_speedups() is not None
    assert coroutines == [True, not compiled, True]
    await monitoring.flush()
    routes = ["probe", "hello", "probe", "suffixed", "outer"]
    assert [p.tags["route"] for p in sink.points] == [f"GET:/{route}" for route in routes]
    assert {p.tags["status_code"] for p in sink.points} == {"200"}


async def test_one_monitored_handler_in_two_apps_records_into_each_apps_own(
    aiohttp_client: ClientFactory,
) -> None:
    name_key = web.AppKey("name", str)

    @lunamon.monitor_request
    async def shared(request: web.Request) -> web.Response:
        return web.Response(text=request.app[name_key])

    sinks, clients, monitorings = [], [], []
    for name in ("a", "b"):
        sink = MemorySink()
        app = web.Application()
        app[name_key] = name
        app.router.add_get("/", shared)
        monitorings.append(lunamon.setup(app, service=name, sinks=[sink], middleware=False))
        sinks.append(sink)
        clients.append(await aiohttp_client(app))
    bare = web.Application()  # no setup(): the handler only calls through
    bare[name_key] = "bare"
    bare.router.add_get("/", shared)
    bare_client = await aiohttp_client(bare)
    texts = [await (await c.get("/")).text() for c in (*clients, *clients, bare_client, clients[0])]
    assert texts == ["a", "b", "a", "b", "bare", "a"]
    for monitoring in monitorings:
        await monitoring.flush()
    assert [[p.tags["service"] for p in sink.points] for sink in sinks] == [["a"] * 3, ["b"] * 2]


async def test_monitor_request_under_the_middleware_records_once(
    aiohttp_client: ClientFactory,
) -> None:
    @lunamon.monitor_request
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    sink = MemorySink()
    app = web.Application()
    app.router.add_get("/x", handler)
    monitoring = lunamon.setup(app, service="svc", sinks=[sink])
    client = await aiohttp_client(app)
    await client.get("/x")
    await monitoring.flush()
    assert len(sink.points) == 1


async def test_failed_status_codes_and_error_code_getter(aiohttp_client: ClientFactory) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["status"]), text="plain text")

    sink = MemorySink()
    app = web.Application()
    app.router.add_get("/status/{status}", handler)
    monitoring = lunamon.setup(
        app,
        service="svc",
        sinks=[sink],
        failed_status_codes=range(500, 600),
        error_code=lambda request, outcome: 42 if request.path.endswith("503") else None,
    )
    client = await aiohttp_client(app)
    for status in (404, 503, 500):
        await client.get(f"/status/{status}")
    await monitoring.flush()
    errors = [(p.tags["status_code"], p.tags["error_code"]) for p in sink.series("error")]
    assert errors == [("503", "42"), ("500", "1")]


async def test_lifecycle_starts_and_drains_the_sinks(aiohttp_client: ClientFactory) -> None:
    sink = MemorySink()
    app = create_app(sinks=[sink])
    client = await aiohttp_client(app)
    assert sink.started
    await client.post("/detector")
    await client.close()  # runs the app's cleanup: drain, then close the sinks
    assert sink.closed
    assert [p.series for p in sink.points] == ["request"]
    stats = app[MONITORING_KEY].stats()["memory"]
    assert stats["emitted"] == stats["written"] == 1


def test_setup_rejects_bad_arguments() -> None:
    app = web.Application()
    with pytest.raises(TypeError, match="Application"):
        lunamon.setup(object(), service="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="service"):
        lunamon.setup(app, sinks=[])
    with pytest.raises(TypeError, match="not a Sink"):
        lunamon.setup(app, service="x", sinks=[object()])  # type: ignore[list-item]
    lunamon.setup(app, service="x", sinks=[])
    with pytest.raises(RuntimeError, match="already"):
        lunamon.setup(app, service="x", sinks=[])


async def test_setup_from_a_config_file(aiohttp_client: ClientFactory, tmp_path: Any) -> None:
    config = tmp_path / "handlers.toml"
    out = tmp_path / "points.lp"
    config.write_text(
        "[monitoring]\n"
        'service = "luna-handlers"\n'
        "flush_interval = 0.5\n"
        'exclude = ["POST:/detector"]\n'
        "[[monitoring.sinks]]\n"
        'type = "file"\n'
        f'path = "{out}"\n'
    )
    settings = lunamon.MonitoringSettings.load(config, env={})
    app = create_app(settings=settings, exclude=None)
    assert app[MONITORING_KEY].policy.flush_interval == 0.5
    client = await aiohttp_client(app)
    await client.post("/detector")
    await client.post("/extractor")
    await client.close()
    (point,) = lunamon.parse_line_protocol(out.read_text())
    assert point.tags["route"] == "POST:/extractor"


async def test_disabled_settings_make_monitoring_a_no_op(
    aiohttp_client: ClientFactory, lunamon_points: CapturedPoints
) -> None:
    settings = lunamon.MonitoringSettings.from_mapping(
        {"enabled": False, "service": "svc", "sinks": [{"type": "memory"}]}
    )
    app = create_app(settings=settings)
    assert not app.middlewares
    client = await aiohttp_client(app)
    assert (await client.post("/detector")).status == 201
    assert lunamon_points == []
    assert app[MONITORING_KEY].stats() == {}


async def test_a_sink_never_reached_does_not_hold_up_the_shutdown(
    aiohttp_client: ClientFactory,
) -> None:
    """An app whose InfluxDB has nothing listening: close() does not wait out
    shutdown_timeout retrying a server it never reached; the points are counted."""
    app = web.Application()
    app.router.add_get("/", _ok)
    sink = lunamon.InfluxDBSink("127.0.0.1", free_port(), timeout=1.0)
    monitoring = lunamon.setup(app, service="svc", sinks=[sink], shutdown_timeout=5.0)
    client = await aiohttp_client(app)
    assert (await client.get("/")).status == 200
    started = time.monotonic()
    await monitoring.close()
    assert time.monotonic() - started < 2.5  # not the 5 s deadline
    stats = monitoring.stats()["influxdb"]
    assert stats["dropped"]["shutdown"] == 1


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def test_error_code_precedence_exception_then_body_then_getter_then_default(
    aiohttp_client: ClientFactory,
) -> None:
    # README: the exception's `error_code`, else the JSON body's, else the `error_code=`
    # callable's, else 1 for 5xx (or a raised exception) and 0 otherwise. Mutant killed:
    # the callable consulted first (or whenever it answers), overriding the other two.
    class LunaError(Exception):
        error_code = 11

    async def handler(request: web.Request) -> web.StreamResponse:
        case = request.match_info["case"]
        if case == "exception":
            raise LunaError("carries its code")
        if case == "raise":
            raise RuntimeError("no code anywhere")
        if case == "body":
            return web.json_response({"error_code": 22, "desc": "luna error"}, status=400)
        if case == "http":
            raise web.HTTPConflict(text="plain")
        return web.Response(status=int(case[-3:]), text="plain text")

    seen: list[tuple[str, str]] = []

    def getter(request: web.Request, outcome: web.StreamResponse | BaseException) -> int | None:
        seen.append((request.match_info["case"], type(outcome).__name__))
        return None if request.match_info["case"].startswith("none") else 77

    sink = MemorySink()
    app = web.Application()
    app.router.add_get("/{case}", handler)
    monitoring = lunamon.setup(app, service="svc", sinks=[sink], error_code=getter)
    client = await aiohttp_client(app)
    cases = ["exception", "body", "raise", "http", "text503", "text404", "none503", "none404"]
    for case in cases:
        await client.get(f"/{case}")
    await monitoring.flush()
    assert len(sink.series("error")) == len(cases)
    assert {p.tags["status_code"] for p in sink.series("error")} == {
        "500", "400", "409", "503", "404"
    }  # fmt: skip
    assert [p.fields["request_id"] for p in sink.series("error")] == [
        p.fields["request_id"] for p in sink.series("request")
    ]
    by_case = dict(zip(cases, (p.tags["error_code"] for p in sink.series("error")), strict=True))
    assert by_case == {
        "exception": "11",  # the exception's attribute wins over the callable
        "body": "22",  # the JSON body wins over the callable
        "raise": "77",  # neither: the callable, given the exception
        "http": "77",  # an HTTPException without a code: the callable
        "text503": "77",
        "text404": "77",
        "none503": "1",  # the callable has no answer: 1 for a 5xx
        "none404": "0",  # and 0 otherwise
    }
    # The callable is asked only when neither the exception nor the body had a code.
    assert seen == [
        ("raise", "RuntimeError"),
        ("http", "HTTPConflict"),
        ("text503", "Response"),
        ("text404", "Response"),
        ("none503", "Response"),
        ("none404", "Response"),
    ]


# ------------------------------------------------------------------------ the recorder, in detail
# (docs/mutation.md: each test below kills mutants of lunamon/_recorder.py the tests above
# let through.)


def _recorder_app(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    *paths: str,
    method: str = "GET",
    **options: Any,
) -> tuple[web.Application, MemorySink]:
    sink = MemorySink()
    app = web.Application()
    for path in paths:
        app.router.add_route(method, path, handler)
    lunamon.setup(app, service="svc", sinks=[sink], **options)
    return app, sink


async def test_points_of_a_route_and_status_share_one_tags_dict(
    aiohttp_client: ClientFactory,
) -> None:
    # The route's tag dicts are made once per status (and path-tag values), not per request
    # (architecture.md, "Everything that depends on the route is computed once").
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app, sink = _recorder_app(handler, "/a", "/handlers/{handlerId}", method="*")
    client = await aiohttp_client(app)
    for path, method in [("/a", "GET"), ("/a", "GET"), ("/handlers/h1", "GET")] * 2 + [
        ("/a", "PROPFIND"),
        ("/a", "PROPFIND"),
    ]:
        assert (await client.request(method, path)).status == 200
    await app[MONITORING_KEY].flush()
    tags = [p.tags for p in sink.points]
    assert tags[0] is tags[1] is tags[3] is tags[4]
    assert tags[2] is tags[5]
    assert tags[2] == {"service": "svc", "route": "GET:/handlers/{handlerId}",
                       "status_code": "200", "handler_id": "h1"}  # fmt: skip
    assert tags[6] is tags[7]  # an unusual method is folded into OTHER, once
    assert tags[6]["route"] == "OTHER:/a"


async def test_the_route_and_tag_caches_stay_within_their_bounds(
    aiohttp_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lunamon._recorder
    from lunamon.aiohttp import RECORDER_KEY

    monkeypatch.setattr(lunamon._recorder, "_MAX_ROUTES", 2)
    monkeypatch.setattr(lunamon._recorder, "_MAX_TAG_SETS", 2)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app, sink = _recorder_app(handler, "/a", "/b", "/c", "/handlers/{handlerId}")
    client = await aiohttp_client(app)
    for path in ["/handlers/h1", "/handlers/h2", "/handlers/h3", "/handlers/h3", "/a", "/b", "/c"]:
        assert (await client.get(path)).status == 200
    await app[MONITORING_KEY].flush()
    recorder = app[RECORDER_KEY]
    assert len(recorder._routes) == 2
    (handlers_route,) = [r for r in recorder._routes.values() if "handlers" in r.name]
    assert len(handlers_route.tag_sets) == 2
    assert [p.tags.get("handler_id") for p in sink.points[:4]] == ["h1", "h2", "h3", "h3"]
    assert [p.tags["route"] for p in sink.points[4:]] == ["GET:/a", "GET:/b", "GET:/c"]


async def test_a_longer_parameter_name_is_not_taken_for_a_path_tag(
    aiohttp_client: ClientFactory,
) -> None:
    # "{handlerIdOld" contains "{handlerId": the route has no handlerId to record.
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app, sink = _recorder_app(handler, "/old/{handlerIdOld}")
    client = await aiohttp_client(app)
    assert (await client.get("/old/x1")).status == 200
    await app[MONITORING_KEY].flush()
    (point,) = sink.points
    assert dict(point.tags) == {"service": "svc", "route": "GET:/old/{handlerIdOld}",
                                "status_code": "200"}  # fmt: skip


async def test_a_response_prepared_after_the_handler_is_recorded_in_full(
    aiohttp_client: ClientFactory, tmp_path: Any
) -> None:
    # A FileResponse decides its status in prepare(), after the handler returned: the
    # point is made when the request's task is done, with everything a handler's point has.
    page = tmp_path / "page.txt"
    page.write_text("hello")
    seen: list[object] = []

    def getter(request: web.Request, outcome: web.StreamResponse | BaseException) -> int:
        seen.append(type(outcome).__name__)
        return 55

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(tmp_path / request.match_info["name"])

    app, sink = _recorder_app(handler, "/handlers/{handlerId}/{name}", error_code=getter)
    client = await aiohttp_client(app)
    before = time.time_ns()
    assert (await client.get("/handlers/h7/page.txt")).status == 200
    assert (await client.get("/handlers/h7/missing.txt")).status == 404
    await app[MONITORING_KEY].flush()
    ok, missing, error = sink.points
    for point, status in [(ok, "200"), (missing, "404")]:
        assert point.series == "request"
        assert dict(point.tags) == {"service": "svc", "route": "GET:/handlers/{handlerId}/{name}",
                                    "status_code": status, "handler_id": "h7"}  # fmt: skip
        assert isinstance(point.time_ns, int)
        assert point.time_ns >= before
        assert type(point.fields["execution_time"]) is float
        assert point.fields["execution_time"] >= 0.0
    assert (error.series, error.tags["error_code"], error.time_ns) == (
        "error",
        "55",
        missing.time_ns,
    )
    assert seen == ["FileResponse"]  # the getter is given the response


async def test_a_point_that_cannot_be_recorded_is_logged_once_per_interval(
    aiohttp_client: ClientFactory, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from structlog.testing import capture_logs

    (tmp_path / "f.txt").write_text("x")
    broken = RuntimeError("emit broke " + "e" * 2000)

    async def plain(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def file(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(tmp_path / "f.txt")

    sink = MemorySink()
    app = web.Application()
    app.router.add_get("/plain", plain)
    app.router.add_get("/file", file)
    monitoring = lunamon.setup(app, service="svc", sinks=[sink])

    def raising_emit(point: Point) -> None:
        raise broken

    monkeypatch.setattr(monitoring, "emit", raising_emit)
    client = await aiohttp_client(app)
    event = {"event": "record_failed", "error": repr(broken)[:1024], "log_level": "error"}
    with capture_logs() as logs:
        assert (await client.get("/file")).status == 200  # recorded after the response
        await asyncio.sleep(0.05)
    assert [e for e in logs if e["event"] == "record_failed"] == [event]
    with capture_logs() as logs:
        assert (await client.get("/file")).status == 200
        assert (await client.get("/plain")).status == 200  # recorded by the middleware
        await asyncio.sleep(0.05)
    assert [e for e in logs if e["event"] == "record_failed"] == []  # one rate limit for both


async def test_a_failing_error_code_getter_is_logged_and_the_default_used(
    aiohttp_client: ClientFactory,
) -> None:
    from structlog.testing import capture_logs

    broken = ValueError("getter bug " + "g" * 1000)

    def getter(request: web.Request, outcome: web.StreamResponse | BaseException) -> int:
        raise broken

    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=503, text="busy")

    app, sink = _recorder_app(handler, "/busy", error_code=getter)
    client = await aiohttp_client(app)
    with capture_logs() as logs:
        assert (await client.get("/busy")).status == 503
    await app[MONITORING_KEY].flush()
    assert [p.tags.get("error_code") for p in sink.points] == [None, "1"]
    assert [e for e in logs if e["event"] == "error_code_getter_failed"] == [
        {"event": "error_code_getter_failed", "error": repr(broken)[:512], "log_level": "error"}
    ]


async def test_a_connection_error_of_the_handler_itself_is_a_server_error(
    aiohttp_client: ClientFactory,
) -> None:
    # The client is still there: the handler's own connection failed (a database down).
    async def handler(request: web.Request) -> web.Response:
        raise ConnectionRefusedError("database down")

    app, sink = _recorder_app(handler, "/db")
    client = await aiohttp_client(app)
    assert (await client.get("/db")).status == 500
    await app[MONITORING_KEY].flush()
    request_point, error = sink.points
    assert (request_point.tags["status_code"], error.tags["error_code"]) == ("500", "1")


@pytest.mark.parametrize(
    ("code", "recorded"),
    [("-5", "-5"), (" 12 ", "12"), ("12", "12"), ("X5", "1"), ("5-", "1"), (12.0, "1")],
)
async def test_an_error_code_given_as_text_is_read_as_an_integer(
    aiohttp_client: ClientFactory, code: object, recorded: str
) -> None:
    class LunaError(Exception):
        error_code = code

    async def handler(request: web.Request) -> web.Response:
        raise LunaError("failed")

    app, sink = _recorder_app(handler, "/fail")
    client = await aiohttp_client(app)
    assert (await client.get("/fail")).status == 500
    await app[MONITORING_KEY].flush()
    assert [p.tags.get("error_code") for p in sink.points] == [None, recorded]


class _LunaConflict(web.HTTPConflict):
    """A LUNA-style HTTPException: a code of its own and a JSON error body with another."""

    error_code: object = 33

    def __init__(self, body_code: object = 44) -> None:
        super().__init__(
            text=json.dumps({"error_code": body_code, "desc": "conflict"}),
            content_type="application/json",
        )


async def test_an_http_exceptions_own_error_code_beats_its_json_bodys(
    aiohttp_client: ClientFactory,
) -> None:
    # Mutant killed: the body read first (an HTTPException is a web.Response in aiohttp 3).
    async def handler(request: web.Request) -> web.Response:
        raise _LunaConflict()

    app, sink = _recorder_app(handler, "/conflict", error_code=lambda request, outcome: 77)
    client = await aiohttp_client(app)
    response = await client.get("/conflict")
    assert response.status == 409
    assert (await response.json())["error_code"] == 44  # the body the client got
    await app[MONITORING_KEY].flush()
    assert [p.tags.get("error_code") for p in sink.points] == [None, "33"]


@pytest.mark.parametrize(
    ("own", "body", "getter", "recorded"),
    [
        (True, 44, None, "44"),  # not a code: the body's
        (True, True, 77, "77"),  # neither is: the getter's
        (True, True, True, "0"),  # nor the getter's: the default of a 4xx
        (False, 44, None, "44"),
        (1, True, None, "1"),  # the int 1 is a code (True == 1, yet not a code)
    ],
)
async def test_a_boolean_error_code_is_not_a_code_and_falls_through(
    aiohttp_client: ClientFactory, own: object, body: object, getter: object, recorded: str
) -> None:
    class Conflict(_LunaConflict):
        error_code = own

    async def handler(request: web.Request) -> web.Response:
        raise Conflict(body)

    app, sink = _recorder_app(handler, "/c", error_code=lambda request, outcome: getter)
    client = await aiohttp_client(app)
    assert (await client.get("/c")).status == 409
    await app[MONITORING_KEY].flush()
    assert [p.tags.get("error_code") for p in sink.points] == [None, recorded]


@pytest.mark.parametrize("given", ["given-id-18", None])
@pytest.mark.parametrize("exception", [web.HTTPNotFound, web.HTTPConflict, _LunaConflict])
async def test_the_request_id_is_echoed_on_a_raised_http_exception(
    aiohttp_client: ClientFactory, given: str | None, exception: type[web.HTTPException]
) -> None:
    async def handler(request: web.Request) -> web.Response:
        raise exception()

    app, sink = _recorder_app(handler, "/x")
    client = await aiohttp_client(app)
    response = await client.get("/x", headers={"Luna-Request-Id": given} if given else {})
    assert response.status == exception.status_code
    await app[MONITORING_KEY].flush()
    recorded = {p.fields["request_id"] for p in sink.points}
    assert recorded == {response.headers.get("Luna-Request-Id")}
    if given is not None:
        assert recorded == {given}


def _json_body(size: int) -> bytes:
    head = b'{"error_code": 7, "pad": "'
    body = head + b"x" * (size - len(head) - 2) + b'"}'
    assert len(body) == size
    return body


@pytest.mark.parametrize(
    ("case", "recorded"),
    [
        ("64k", "7"),  # a JSON error body up to 64 KiB is read
        ("64k+1", "0"),  # a bigger one is not
        ("list", "0"),  # JSON, but not an object
        ("stream", "0"),  # not bytes: never read (nor consumed)
        ("text", "0"),  # not JSON
    ],
)
async def test_which_error_bodies_are_read_for_an_error_code(
    aiohttp_client: ClientFactory, case: str, recorded: str
) -> None:
    import io

    async def handler(request: web.Request) -> web.Response:
        if case == "64k":
            return web.Response(status=400, body=_json_body(65536), content_type="application/json")
        if case == "64k+1":
            return web.Response(status=400, body=_json_body(65537), content_type="application/json")
        if case == "list":
            return web.json_response([{"error_code": 7}], status=400)
        if case == "stream":
            body = io.BytesIO(b'{"error_code": 7}')
            return web.Response(status=400, body=body, content_type="application/json")
        return web.Response(status=400, text='{"error_code": 7}')

    app, sink = _recorder_app(handler, "/fail")
    client = await aiohttp_client(app)
    response = await client.get("/fail")
    assert response.status == 400
    if case == "stream":
        assert await response.read() == b'{"error_code": 7}'
    await app[MONITORING_KEY].flush()
    assert [p.tags.get("error_code") for p in sink.points] == [None, recorded]


# ------------------------------------------------------------------------ setup(), in detail
# (docs/mutation.md: mutants of lunamon/aiohttp.py.)


async def test_lunamon_is_the_first_middleware_and_sees_what_others_answer(
    aiohttp_client: ClientFactory,
) -> None:
    @web.middleware
    async def auth(request: web.Request, handler: Any) -> web.StreamResponse:
        if "Authorization" not in request.headers:
            return web.Response(status=401, text="who are you")
        return await handler(request)  # type: ignore[no-any-return]

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    sink = MemorySink()
    app = web.Application(middlewares=[auth])
    app.router.add_get("/x", handler)
    lunamon.setup(app, service="svc", sinks=[sink])
    assert app.middlewares[1] is auth  # lunamon first, the app's own after it
    client = await aiohttp_client(app)
    assert (await client.get("/x")).status == 401
    await app[MONITORING_KEY].flush()
    assert [(p.series, p.tags["status_code"]) for p in sink.points] == [
        ("request", "401"),
        ("error", "401"),
    ]


async def test_monitor_request_in_a_sub_application_finds_the_parent_recorder(
    aiohttp_client: ClientFactory,
) -> None:
    @lunamon.monitor_request
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    sink = MemorySink()
    app, sub = web.Application(), web.Application()
    sub.router.add_get("/x", handler)
    app.router.add_get("/top", handler)
    app.add_subapp("/sub", sub)
    lunamon.setup(app, service="svc", sinks=[sink], middleware=False)
    client = await aiohttp_client(app)
    assert (await client.get("/sub/x")).status == 200
    assert (await client.get("/top")).status == 200
    await app[MONITORING_KEY].flush()
    assert [p.tags["route"] for p in sink.points] == ["GET:/sub/x", "GET:/top"]


def test_setup_refusals_say_exactly_what_is_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    from lunamon import SettingsError

    monkeypatch.delenv("LUNAMON_SERVICE", raising=False)
    with pytest.raises(SettingsError) as caught:
        lunamon.setup(web.Application(), sinks=[])
    error = caught.value
    assert (str(error), error.key, error.source) == (
        "setup(): service: a service name is needed: setup(app, service='luna-handlers')",
        "service",
        "setup()",
    )
    with pytest.raises(TypeError) as type_error:
        lunamon.setup(object(), service="s")  # type: ignore[arg-type]
    assert str(type_error.value) == "setup() needs an aiohttp.web.Application, not object"
    app = web.Application()
    lunamon.setup(app, service="s", sinks=[])
    with pytest.raises(RuntimeError) as twice:
        lunamon.setup(app, service="s", sinks=[])
    assert str(twice.value) == "lunamon.setup() was already called for this application"
    with pytest.raises(TypeError) as not_callable:
        lunamon.setup(web.Application(), service="s", sinks=[], error_code=5)  # type: ignore[arg-type]
    assert str(not_callable.value) == (
        "error_code= takes a callable (request, response_or_exception) -> int"
    )
    with pytest.raises(TypeError) as bad_settings:
        lunamon.setup(web.Application(), settings=["service"], sinks=[])  # type: ignore[arg-type]
    assert str(bad_settings.value) == (
        "settings= takes a MonitoringSettings (MonitoringSettings.load('monitoring.toml'))"
        " or a mapping shaped like the [monitoring] section, not list"
    )
    with pytest.raises(TypeError) as bad_sink:
        lunamon.setup(web.Application(), service="s", sinks=[object()])  # type: ignore[list-item]
    assert str(bad_sink.value) == "object is not a Sink (async start/write/close)"


def test_settings_given_as_a_mapping_read_the_environment_and_are_named_in_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lunamon import SettingsError

    monkeypatch.setenv("LUNAMON_FLUSH_INTERVAL", "0.25")
    monkeypatch.setenv("MEMORY_SINK_NAME", "from-env")
    monitoring = lunamon.setup(
        web.Application(),
        settings={"service": "s", "sinks": [{"type": "memory", "name_env": "MEMORY_SINK_NAME"}]},
    )
    assert monitoring.settings.flush_interval == 0.25
    assert list(monitoring.stats()) == ["from-env"]
    with pytest.raises(SettingsError) as caught:
        lunamon.setup(web.Application(), settings={"service": "s", "batch_size": "many"})
    assert (caught.value.source, caught.value.key) == (
        "setup(settings=...)",
        "monitoring.batch_size",
    )
    table = {"type": "influxdb", "password": "p"}  # refused when the sink is built
    with pytest.raises(SettingsError) as caught:
        lunamon.setup(web.Application(), settings={"service": "s", "sinks": [table]})
    assert (caught.value.source, caught.value.key) == (
        "setup(settings=...)",  # the mapping's sinks, not setup()'s own sinks=
        "monitoring.sinks[0].password",
    )


def test_without_any_sink_points_go_to_influxdb_on_localhost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lunamon.sinks.influxdb import InfluxDBSink

    monitoring = lunamon.setup(web.Application(), service="s")
    (sink,) = monitoring.sinks
    assert isinstance(sink, InfluxDBSink)
    assert (sink.url, sink.database, list(monitoring.stats())) == (
        "http://localhost:8086",
        "luna_monitoring",
        ["influxdb"],
    )


async def test_configured_plugins_are_given_the_application(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    from lunamon.sinks.plugin import BaseRequestMonitoringPlugin

    class AppPlugin(BaseRequestMonitoringPlugin):
        async def flushPointToMonitoring(self, point: Point, logger: Any) -> None:
            pass

    monkeypatch.setattr(sys.modules[__name__], "AppPlugin", AppPlugin, raising=False)
    app = web.Application()
    monitoring = lunamon.setup(
        app, settings={"service": "s", "sinks": [{"type": f"{__name__}:AppPlugin"}]}
    )
    (sink,) = monitoring.sinks
    plugin = sink.plugin  # type: ignore[attr-defined]
    assert plugin.app is app


# ------------------------------------------------------------------- Server-Timing and Expect


def _fixed_clocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every timed step lasts 0.25 s; a request's total is 0.125 s when its header is made."""
    import itertools
    from types import SimpleNamespace

    import lunamon._recorder
    import lunamon.timing

    steps = itertools.cycle([10.0, 10.25])
    monkeypatch.setattr(lunamon.timing, "perf_counter", lambda: next(steps))
    calls = itertools.count()
    monkeypatch.setattr(
        lunamon._recorder,
        "time",
        SimpleNamespace(
            time_ns=time.time_ns, perf_counter=lambda: 100.0 if next(calls) == 0 else 100.125
        ),
    )


async def test_server_timing_of_a_streamed_response_is_exact(
    aiohttp_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A response prepared by the handler gets its header in the prepare hook, with the
    # steps so far and no total: execution_time is not known before the body is sent.
    async def stream(request: web.Request) -> web.StreamResponse:
        for name in ("decode", "a b_time", "_time"):
            with lunamon.measure(name):
                pass
        response = web.StreamResponse()
        if request.query.get("own"):
            response.headers["Server-Timing"] = "app;dur=1"
        await response.prepare(request)
        await response.write(b"x")
        return response

    for enabled in (True, False):
        _fixed_clocks(monkeypatch)
        app, _ = _recorder_app(stream, "/s", server_timing=enabled)
        client = await aiohttp_client(app)
        response = await client.get("/s")
        assert response.status == 200
        header = response.headers.get("Server-Timing")
        if enabled:
            assert header == "decode;dur=250.000, a_b;dur=250.000, step;dur=250.000"
            response = await client.get("/s?own=1")
            assert response.headers.getall("Server-Timing") == ["app;dur=1"]  # left alone
        else:
            assert header is None
        await client.close()
        monkeypatch.undo()


async def test_server_timing_only_for_requests_that_ask_as_configured(
    aiohttp_client: ClientFactory,
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def stream(request: web.Request) -> web.StreamResponse:
        with lunamon.measure("decode_time"):  # a stream's header has its steps, no total
            pass
        response = web.StreamResponse()
        await response.prepare(request)  # the header goes out through the prepare hook
        return response

    app, _ = _recorder_app(
        handler, "/", server_timing=True, server_timing_when=f"X-Debug:on:{SECRET}"
    )
    app.router.add_get("/stream", stream)
    client = await aiohttp_client(app)
    for path in ("/", "/stream"):
        for sent, shown in [
            ({"X-Debug": f"on:{SECRET}"}, True),
            ({"X-Debug": "on"}, False),
            ({}, False),
        ]:
            response = await client.get(path, headers=sent)
            assert response.status == 200
            assert ("Server-Timing" in response.headers) is shown, (path, sent)


def test_server_timing_names_are_cached_within_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    import lunamon._recorder

    names: dict[str, str] = {"cached_time": "from-the-cache"}
    monkeypatch.setattr(lunamon._recorder, "_timing_names", names)
    assert lunamon._recorder._timing_name("cached_time") == "from-the-cache"
    assert lunamon._recorder._timing_name("match_policy_time") == "match_policy"
    assert names["match_policy_time"] == "match_policy"
    for i in range(1200):
        lunamon._recorder._timing_name(f"step{i}_time")
    assert len(names) == 1000


async def test_an_expect_handler_answer_is_recorded_like_any_response(
    aiohttp_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    import lunamon._ids
    import lunamon._recorder

    # Requests start in 2001 here: a generated id carries the start's seconds, not "now".
    start = 1_000_000_000_123_456_000
    lunamon._ids._set_clock(0)  # the process's clock went back
    monkeypatch.setattr(
        lunamon._recorder,
        "time",
        SimpleNamespace(time_ns=lambda: start, perf_counter=time.perf_counter),
    )

    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error_code": 9, "desc": "too big"}, status=417)

    async def upload(request: web.Request) -> web.Response:
        return web.Response(text="stored")

    sink = MemorySink()
    app = web.Application()
    app.router.add_post("/handlers/{handlerId}/upload", upload, expect_handler=refuse)
    lunamon.setup(app, service="svc", sinks=[sink])
    client = await aiohttp_client(app)
    for headers in ({"Luna-Request-Id": "given-id-7"}, {}):
        response = await client.post(
            "/handlers/h9/upload", data=b"x", headers={"Expect": "100-continue", **headers}
        )
        assert response.status == 417
    await app[MONITORING_KEY].flush()
    given, made = sink.series("request")
    assert given.fields == {"request_id": "given-id-7", "execution_time": 0.0}
    assert str(made.fields["request_id"]).startswith("1000000000,")
    assert REQUEST_ID.match(str(made.fields["request_id"]))
    assert made.fields["execution_time"] == 0.0
    for point in (given, made):
        assert dict(point.tags) == {"service": "svc", "route": "POST:/handlers/{handlerId}/upload",
                                    "status_code": "417", "handler_id": "h9"}  # fmt: skip
        # The start's 10 µs quantum (then the next ones), made unique by the process's slot.
        assert start - start % 10_000 <= point.time_ns < start + 10**6
    assert [e.tags["error_code"] for e in sink.series("error")] == ["9", "9"]  # from the body


async def test_an_expect_answer_that_cannot_be_recorded_is_logged_in_the_shared_limit(
    aiohttp_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from structlog.testing import capture_logs

    broken = RuntimeError("emit broke " + "e" * 2000)

    async def echo(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app, _ = _recorder_app(echo, "/echo", method="POST")

    def raising_emit(point: Point) -> None:
        raise broken

    monkeypatch.setattr(app[MONITORING_KEY], "emit", raising_emit)
    client = await aiohttp_client(app)
    event = {"event": "record_failed", "error": repr(broken)[:1024], "log_level": "error"}
    with capture_logs() as logs:
        response = await client.post("/echo", data=b"x", headers={"Expect": "x"})
        assert response.status == 417  # aiohttp's own answer to an unknown expectation
    assert [e for e in logs if e["event"] == "record_failed"] == [event]
    with capture_logs() as logs:
        assert (await client.post("/echo", data=b"x")).status == 200
    assert [e for e in logs if e["event"] == "record_failed"] == []  # one rate limit for both


# ------------------------------------------------------------------------ /metrics wiring


async def test_without_metrics_there_is_no_metrics_route(aiohttp_client: ClientFactory) -> None:
    monitoring = lunamon.setup(app := web.Application(), service="s", sinks=[])
    assert monitoring.metrics is None
    client = await aiohttp_client(app)
    assert (await client.get("/metrics")).status == 404


def test_the_metrics_sink_is_the_one_monitoring_exposes() -> None:
    monitoring = lunamon.setup(web.Application(), service="s", sinks=[], metrics={"enabled": True})
    assert monitoring.metrics is not None
    assert monitoring.sinks == [monitoring.metrics]


def test_metrics_without_prometheus_client_say_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "lunamon.metrics", None)  # as if it could not be imported
    with pytest.raises(ImportError) as caught:
        lunamon.setup(web.Application(), service="s", sinks=[], metrics={"enabled": True})
    assert str(caught.value).startswith("[monitoring.metrics] needs prometheus_client (")
    assert str(caught.value).endswith("): pip install 'lunamon[metrics]'")


async def test_metrics_port_listens_only_when_enabled_only_on_its_host_and_logs_nothing(
    aiohttp_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.DEBUG, logger="aiohttp.access")
    for enabled in (False, True):
        port = free_port()
        metrics = {"enabled": enabled, "port": port, "host": "127.0.0.2"}
        app = web.Application()
        lunamon.setup(app, service="s", sinks=[], metrics=metrics)
        client = await aiohttp_client(app)
        async with aiohttp.ClientSession() as session:
            for host, listening in (("127.0.0.2", enabled), ("127.0.0.1", False)):
                try:
                    async with session.get(f"http://{host}:{port}/metrics") as response:
                        assert response.status == 200
                        answered = True
                except aiohttp.ClientConnectionError:
                    answered = False
                assert answered is listening, (enabled, host)
        await client.close()
    assert [r for r in caplog.records if r.name == "aiohttp.access"] == []
