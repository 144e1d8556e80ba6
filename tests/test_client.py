"""``client_trace_config``: outgoing calls carry the request id and are timed into a step."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from servers import free_port
from yarl import URL

import lunamon
from lunamon import MONITORING_KEY, MemorySink, Point
from lunamon import client as client_module

Scenario = Callable[[aiohttp.ClientSession, str], Awaitable[Any]]
ServerFactory = Callable[..., Awaitable[TestServer]]
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-01$")
LUNA_ID = "1700000000,6a5c2f3e-1b2c-4d5e-8f90-0123456789ab"

RELEASE = web.AppKey("release", asyncio.Event)


class Clock:
    """The client hooks' clock, set by the test: durations are asserted exactly."""

    def __init__(self) -> None:
        self.now = 1.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(client_module, "perf_counter", fake)
    return fake


async def _echo(request: web.Request) -> web.Response:
    return web.json_response({key.lower(): value for key, value in request.headers.items()})


async def _stream(request: web.Request) -> web.StreamResponse:
    """A body in two parts: the second only once the test releases it."""
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(request)
    await response.write(b"first part;")
    await request.app[RELEASE].wait()
    await response.write(b"second part")
    await response.write_eof()
    return response


async def _hang(request: web.Request) -> web.Response:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


@pytest.fixture
async def downstream(aiohttp_server: ServerFactory) -> AsyncIterator[tuple[str, asyncio.Event]]:
    """An unmonitored service on loopback: ``/echo`` its headers, ``/stream``, ``/hang``."""
    app = web.Application()
    release = asyncio.Event()
    app[RELEASE] = release
    app.router.add_get("/echo", _echo)
    app.router.add_get("/stream", _stream)
    app.router.add_get("/hang", _hang)
    server = await aiohttp_server(app)
    yield str(server.make_url("/")), release
    release.set()


async def _serve(
    aiohttp_server: ServerFactory,
    scenario: Scenario,
    base: str,
    **config: Any,
) -> tuple[Point, Any]:
    """Run ``scenario(session, base)`` inside one monitored request; its point and result."""
    results: list[Any] = []

    async def handler(request: web.Request) -> web.Response:
        async with aiohttp.ClientSession(
            trace_configs=[lunamon.client_trace_config(**config)]
        ) as session:
            results.append(await scenario(session, base))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/up", handler)
    sink = MemorySink()
    lunamon.setup(app, service="upstream", sinks=[sink])
    server = await aiohttp_server(app)
    async with (
        aiohttp.ClientSession() as outer,
        outer.get(server.make_url("/up"), headers={"Luna-Request-Id": LUNA_ID}) as response,
    ):
        assert response.status == 200, await response.text()
    await app[MONITORING_KEY].flush()
    (point,) = (p for p in sink.points if p.series == "request")
    assert point.fields["request_id"] == LUNA_ID
    return point, results[0]


async def _headers(session: aiohttp.ClientSession, url: str, **kw: Any) -> dict[str, str]:
    async with session.get(url, **kw) as response:
        return dict(await response.json())


async def test_calls_carry_the_request_id_and_are_timed(
    aiohttp_server: ServerFactory, downstream: tuple[str, asyncio.Event], clock: Clock
) -> None:
    base, _ = downstream

    async def scenario(session: aiohttp.ClientSession, base: str) -> Any:
        sent = await _headers(session, base + "echo")
        kept = await _headers(session, base + "echo", headers={"Luna-Request-Id": "mine"})
        return sent, kept

    point, (sent, kept) = await _serve(aiohttp_server, scenario, base, step="faces")
    assert sent["luna-request-id"] == LUNA_ID
    assert kept["luna-request-id"] == "mine"  # the caller's own header wins
    assert "traceparent" not in sent
    assert point.fields["faces_time"] == 0.0  # the clock stood still: two calls, summed
    assert type(point.fields["faces_time"]) is float


async def test_a_call_lasts_until_its_streamed_body_is_read(
    aiohttp_server: ServerFactory, downstream: tuple[str, asyncio.Event], clock: Clock
) -> None:
    base, release = downstream

    async def scenario(session: aiohttp.ClientSession, base: str) -> bytes:
        clock.now = 10.0
        async with session.get(base + "stream") as response:  # the headers are in
            clock.now = 20.0
            first = await response.content.readany()
            clock.now = 30.0
            release.set()
            rest = await response.read()
            clock.now = 99.0  # after the body's end: not counted
            return first + rest

    point, body = await _serve(aiohttp_server, scenario, base, step="faces")
    assert body == b"first part;second part"
    assert point.fields["faces_time"] == 20.0  # from 10 (start) to 30 (end of the body)


async def test_a_released_unread_body_ends_the_call(
    aiohttp_server: ServerFactory, downstream: tuple[str, asyncio.Event], clock: Clock
) -> None:
    base, release = downstream

    async def scenario(session: aiohttp.ClientSession, base: str) -> int:
        clock.now = 10.0
        async with session.get(base + "stream") as response:
            clock.now = 15.0
        clock.now = 50.0
        release.set()
        return response.status

    point, status = await _serve(aiohttp_server, scenario, base, step="faces_time")
    assert status == 200
    assert point.fields["faces_time"] == 5.0  # a name ending in _time is taken as it is


async def test_step_named_per_call_and_untimed_calls(
    aiohttp_server: ServerFactory, downstream: tuple[str, asyncio.Event], clock: Clock
) -> None:
    base, _ = downstream
    seen: list[tuple[str, URL]] = []

    def step(method: str, url: URL) -> str | None:
        seen.append((method, url))
        return None if url.query.get("untimed") else url.query.get("step", "other")

    readings = iter([0.0, 1.0, 10.0, 12.0, 20.0, 24.0])  # start and end of each timed call
    clock_call = client_module.perf_counter

    async def scenario(session: aiohttp.ClientSession, base: str) -> list[dict[str, str]]:
        client_module.perf_counter = lambda: next(readings)
        try:
            return [
                await _headers(session, base + "echo?step=images"),
                await _headers(session, base + "echo?step=images"),
                await _headers(session, base + "echo?step=faces"),
                await _headers(session, base + "echo?untimed=1"),  # reads no clock
            ]
        finally:
            client_module.perf_counter = clock_call

    point, sent = await _serve(aiohttp_server, scenario, base, step=step)
    assert point.fields["images_time"] == 3.0
    assert point.fields["faces_time"] == 4.0
    assert not any(key.startswith("untimed") for key in point.fields)
    assert all(headers["luna-request-id"] == LUNA_ID for headers in sent)  # untimed too
    assert [method for method, _ in seen] == ["GET"] * 4
    assert seen[0][1].path == "/echo"


async def test_traceparent_is_opt_in_and_derived_from_the_request_id(
    aiohttp_server: ServerFactory, downstream: tuple[str, asyncio.Event], clock: Clock
) -> None:
    base, _ = downstream

    async def scenario(session: aiohttp.ClientSession, base: str) -> list[dict[str, str]]:
        mine = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        return [
            await _headers(session, base + "echo"),
            await _headers(session, base + "echo"),
            await _headers(session, base + "echo", headers={"traceparent": mine}),
        ]

    _, sent = await _serve(
        aiohttp_server, scenario, base, traceparent=True, header="X-Request-Id", step=None
    )
    first, second, third = sent
    assert first["x-request-id"] == LUNA_ID
    assert "luna-request-id" not in first
    match1, match2 = (
        TRACEPARENT.match(first["traceparent"]),
        TRACEPARENT.match(second["traceparent"]),
    )
    assert match1 is not None
    assert match2 is not None
    assert match1[1] == match2[1] == "6a5c2f3e1b2c4d5e8f900123456789ab"  # the id's uuid
    assert match1[2] != match2[2]  # a fresh span id per call
    assert third["traceparent"] == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_trace_id_of_other_ids_is_a_stable_hash() -> None:
    one = client_module.traceparent("req-42")
    again = client_module.traceparent("req-42")
    other = client_module.traceparent("req-43")
    assert TRACEPARENT.match(one)
    assert TRACEPARENT.match(other)
    assert one[3:35] == again[3:35] != other[3:35]
    assert one[3:35] != "0" * 32


async def test_failed_calls_are_timed_and_raise_unchanged(
    aiohttp_server: ServerFactory, downstream: tuple[str, asyncio.Event], clock: Clock
) -> None:
    base, _ = downstream
    closed = f"http://127.0.0.1:{free_port()}/"

    def ticking() -> float:
        clock.now += 1.0
        return clock.now

    async def scenario(session: aiohttp.ClientSession, base: str) -> list[str]:
        raised = []
        clock_call = client_module.perf_counter
        client_module.perf_counter = ticking
        try:
            for url, timeout in ((closed, 5.0), (base + "hang", 0.05)):
                try:
                    async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)):
                        pass
                except (aiohttp.ClientConnectorError, TimeoutError) as exc:
                    raised.append(type(exc).__name__)
        finally:
            client_module.perf_counter = clock_call
        return raised

    point, raised = await _serve(aiohttp_server, scenario, base, step="down")
    assert raised == ["ClientConnectorError", "TimeoutError"]  # as aiohttp raises them
    assert point.fields["down_time"] == 2.0  # each timed: one tick from start to failure


async def test_outside_a_request_nothing_is_added(
    downstream: tuple[str, asyncio.Event], clock: Clock
) -> None:
    base, _ = downstream
    config = lunamon.client_trace_config(step="faces", traceparent=True)
    async with aiohttp.ClientSession(trace_configs=[config]) as session:
        sent = await _headers(session, base + "echo")
    assert "luna-request-id" not in sent
    assert "traceparent" not in sent


def test_bad_arguments_are_refused_at_once() -> None:
    with pytest.raises(TypeError, match="step="):
        lunamon.client_trace_config(step=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="newline"):
        lunamon.client_trace_config(step="bad\nname")
    with pytest.raises(ValueError, match="header="):
        lunamon.client_trace_config(header="")


async def test_a_body_read_that_times_out_is_timed_and_raises(
    aiohttp_server: ServerFactory, downstream: tuple[str, asyncio.Event], clock: Clock
) -> None:
    base, _ = downstream  # never released: the second part of the body never comes

    async def scenario(session: aiohttp.ClientSession, base: str) -> str:
        clock.now = 10.0
        try:
            timeout = aiohttp.ClientTimeout(sock_read=0.05)
            async with session.get(base + "stream", timeout=timeout) as response:
                await response.content.readany()
                clock.now = 25.0
                await response.read()
        except TimeoutError as exc:
            clock.now = 99.0
            return type(exc).__name__
        raise AssertionError("the read did not time out")

    point, raised = await _serve(aiohttp_server, scenario, base, step="faces")
    assert raised == "SocketTimeoutError"
    assert point.fields["faces_time"] == 15.0  # until the response was let go, at 25
