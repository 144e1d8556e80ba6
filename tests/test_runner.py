"""The compiled runner (``lunamon._speedups.Runner``, the middleware ``setup`` installs)
against ``RequestRecorder.run``, its Python reference: every way a handler can end, and
the coroutine protocol (a step passed through, a throw, a cancellation, a close)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from test_recorder_run import LunaError, _emitted, _recorder, _request

from lunamon import Point, _speedups
from lunamon._recorder import _EXPECT, _finished
from lunamon.collector import current
from lunamon.point import compiled_speedups

_WAYS = ("run", "middleware")


def test_setup_installs_the_compiled_runner_when_it_is_built() -> None:
    recorder, _, _ = _recorder()
    core = compiled_speedups()
    assert core is not None  # `make test` builds it
    assert type(recorder.middleware) is core.Runner
    assert recorder.middleware.__middleware_version__ == 1  # type: ignore[attr-defined]


def _shape(points: list[Point]) -> list[tuple[str, dict[str, str], list[str]]]:
    """What two ways of running must agree on: series, tags, field names."""
    return [(p.series, dict(p.tags), sorted(p.fields)) for p in points]


class _Awaitable:
    """Not a coroutine: an object with ``__await__``, as some handlers return."""

    def __init__(self, response: web.Response) -> None:
        self.response = response

    def __await__(self) -> Any:
        yield from asyncio.sleep(0).__await__()
        return self.response


def _plain_handlers() -> dict[str, Callable[[web.Request], Any]]:
    async def ok(request: web.Request) -> web.Response:
        await asyncio.sleep(0)  # suspended once: the runner passes the step through
        return web.Response(text="ok", status=201)

    async def failed_status(request: web.Request) -> web.Response:
        return web.json_response({"error_code": 12}, status=500)

    async def extra(request: web.Request) -> web.Response:
        collector = current.get()
        assert collector is not None
        collector.add_tag("tenant", "t1")
        collector.add_field("size", 3)
        return web.Response()

    async def returns_none(request: web.Request) -> None:
        return None

    def not_awaitable(request: web.Request) -> int:
        return 3

    def raises_at_call(request: web.Request) -> web.Response:
        raise LunaError("before any await")

    async def nested(request: web.Request) -> web.StreamResponse:
        return await _recorder()[0].middleware(request, ok)  # monitored already: no point

    return {
        "ok": ok,
        "failed_status": failed_status,
        "extra": extra,
        "returns_none": returns_none,
        "not_awaitable": not_awaitable,
        "raises_at_call": raises_at_call,
        "awaitable": lambda request: _Awaitable(web.Response(text="aw")),
        "nested": nested,
    }


@pytest.mark.parametrize("name", sorted(_plain_handlers()))
async def test_the_compiled_runner_ends_every_way_as_run_does(name: str) -> None:
    outcomes = []
    for way in _WAYS:
        recorder, monitoring, _ = _recorder(failed_status_codes=[500])
        handler = _plain_handlers()[name]
        request = await _request({"Luna-Request-Id": "client-id-1"})

        async def serve() -> object:  # a task of its own, as aiohttp gives each request
            try:
                response = await getattr(recorder, way)(request, handler)  # noqa: B023
            except BaseException as exc:  # the outcome is what is compared
                return type(exc)
            return (response.status, response.headers.get("Luna-Request-Id"))

        outcome = await asyncio.create_task(serve())
        await asyncio.sleep(0)  # a failed handler's point is made when its task is done
        points = _emitted(monitoring)
        assert all(p.fields["request_id"] == "client-id-1" for p in points)
        outcomes.append((outcome, _shape(points)))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][1] or name == "nested"


async def test_a_runner_cancelled_in_its_handler_records_a_499_as_run_does() -> None:
    shapes = []
    for way in _WAYS:
        recorder, monitoring, _ = _recorder()
        started = asyncio.Event()

        async def waits(request: web.Request, started: asyncio.Event = started) -> web.Response:
            started.set()
            await asyncio.Event().wait()
            raise AssertionError("never woken")

        task = asyncio.create_task(getattr(recorder, way)(await _request(), waits))
        await started.wait()
        task.cancel()  # thrown through the runner into the handler
        with pytest.raises(asyncio.CancelledError):
            await task
        assert current.get() is None
        shapes.append(_shape(_emitted(monitoring)))
    assert shapes[0] == shapes[1]
    assert [(series, tags["status_code"]) for series, tags, _ in shapes[0]] == [
        ("request", "499"),
        ("error", "499"),
    ]


async def test_a_runner_closed_unfinished_records_a_500_as_run_does() -> None:
    shapes = []
    for way in _WAYS:
        recorder, monitoring, _ = _recorder()

        async def waits(request: web.Request) -> web.Response:
            await asyncio.Event().wait()
            raise AssertionError("never woken")

        awaitable = getattr(recorder, way)(await _request(), waits)
        iterator = awaitable.__await__()
        next(iterator)  # suspended in the handler
        iterator.close()
        with pytest.raises((RuntimeError, StopIteration)):
            next(iterator)  # finished: nothing runs again
        shapes.append(_shape(_emitted(monitoring)))
    assert shapes[0] == shapes[1]
    assert [(series, tags["status_code"]) for series, tags, _ in shapes[0]] == [
        ("request", "500"),
        ("error", "500"),
    ]


async def test_a_runner_throws_into_its_handler_and_returns_what_it_returns() -> None:
    for way in _WAYS:
        recorder, monitoring, _ = _recorder()

        async def recovers(request: web.Request) -> web.Response:
            try:
                await asyncio.Event().wait()
            except LunaError:
                return web.Response(text="recovered", status=203)
            raise AssertionError("never woken")

        iterator = getattr(recorder, way)(await _request(), recovers).__await__()
        next(iterator)
        with pytest.raises(StopIteration) as stop:
            iterator.throw(LunaError("thrown in"))
        assert stop.value.value.status == 203, way
        ((_, tags, _),) = _shape(_emitted(monitoring))
        assert tags["status_code"] == "203", way


# ------------------------------------------------------------------ the prepare hook


async def test_the_prepare_gate_answers_at_once_only_where_there_is_nothing_to_do() -> None:
    core = compiled_speedups()
    assert core is not None
    recorder, _, _ = _recorder()
    assert type(recorder.prepare_hook) is core.PrepareGate
    called: list[object] = []

    def hook(request: web.Request, response: web.StreamResponse) -> Any:
        called.append(response)
        return core.READY

    gate = _speedups.PrepareGate(hook, current, _finished, _EXPECT)
    plain, expecting = await _request(), await _request({"Expect": "100-continue"})
    response = web.Response()
    assert await gate(plain, response) is None  # nothing to do: the hook is not called
    assert called == []
    await gate(expecting, response)  # an Expect handler's answer: the hook records it
    assert called == [response]
    for var in (current, _finished):
        token = var.set(object())  # type: ignore[arg-type]  # a collector, as far as it looks
        try:
            await gate(plain, response)
        finally:
            var.reset(token)
    assert called == [response] * 3
    assert list(core.READY.__await__()) == []  # done at once, its value None
