"""The request-scoped collector and add_tag / add_field."""

from __future__ import annotations

import math
from typing import Any

import pytest

from lunamon import RequestCollector, add_field, add_tag, current_request
from lunamon.collector import current


def test_steps_are_summed_to_the_nanosecond_and_odd_values_kept() -> None:
    collector = RequestCollector("GET:/", "id")
    collector.add_step("a_time", 0.1)
    collector.add_step("a_time", 0.2)
    assert collector.steps["a_time"] == 0.3  # not 0.30000000000000004
    collector.add_step("b_time", 1.0000000004)
    assert collector.steps["b_time"] == 1.0
    collector.add_step("c_time", 5e6 + 1e-9)  # beyond 4e6 s: as it is
    assert collector.steps["c_time"] == 5e6 + 1e-9
    collector.add_step("d_time", -4e6 - 1)
    assert collector.steps["d_time"] == -4e6 - 1
    collector.add_step("e_time", float("inf"))
    assert collector.steps["e_time"] == float("inf")
    collector.add_step("f_time", -3.0000000004)
    assert collector.steps["f_time"] == -3.0


def test_outside_a_request_everything_is_a_no_op() -> None:
    assert current_request() is None
    add_tag("k", "v")
    add_field("k", 1.0)


def test_add_tag_and_field_validate_at_record_time() -> None:
    c = RequestCollector("GET:/x", "rid")
    token = current.set(c)
    try:
        assert current_request() is c
        add_tag("customer", "acme corp")
        add_tag("line", "a\nb")
        add_tag("empty", "")
        add_field("items", 3)
        add_field("nan", math.nan)
        with pytest.raises(TypeError, match="field value"):
            add_field("obj", object())  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="reserved"):
            add_tag("time", "x")
        with pytest.raises(TypeError):
            add_tag(1, "x")  # type: ignore[arg-type]
    finally:
        current.reset(token)
    assert c.extra_tags == {"customer": "acme corp", "line": "a b"}
    assert c.extra_fields == {"items": 3}
    assert "GET:/x" in repr(c)


async def test_run_in_executor_carries_the_request_and_the_plain_call_is_counted(
    aiohttp_client: Any, lunamon_points: Any
) -> None:
    import asyncio

    from aiohttp import web
    from structlog.testing import capture_logs

    import lunamon
    from lunamon.timing import unattributed_steps

    @lunamon.timed("carried_time")
    def carried() -> int:
        lunamon.add_field("in_thread", True)
        return 1

    @lunamon.timed("lost_time")
    def lost() -> int:
        return 2

    async def handler(request: web.Request) -> web.Response:
        loop = asyncio.get_running_loop()
        assert await lunamon.run_in_executor(None, carried) == 1
        assert await loop.run_in_executor(None, lost) == 2  # no context: not recorded
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", handler)
    lunamon.setup(app, service="svc", sinks=[lunamon.MemorySink()])
    client = await aiohttp_client(app)
    before = unattributed_steps().get("lost_time", 0)
    with capture_logs() as logs:
        assert (await client.get("/")).status == 200
    (point,) = lunamon_points.series("request")
    assert type(point.fields["carried_time"]) is float
    assert point.fields["in_thread"] is True
    assert "lost_time" not in point.fields
    assert unattributed_steps()["lost_time"] == before + 1
    if not before:  # logged the first time only
        hints = [e for e in logs if e["event"] == "step_outside_request"]
        assert hints[0]["step"] == "lost_time"
        assert "run_in_executor" in hints[0]["hint"]
