"""The middleware, monitor_request and setup, against a real aiohttp server."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from servers import free_port

import lunamon
from lunamon import MONITORING_KEY, MemorySink, Point
from lunamon.demo.service import SUBSTEPS, create_app
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
