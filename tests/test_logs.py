"""The request id in log lines: ``RequestIdFilter``, ``add_request_id`` and lunamon's own log."""

from __future__ import annotations

import io
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs

import lunamon
from lunamon import MONITORING_KEY, MemorySink
from lunamon._log import logger as lunamon_logger
from lunamon.collector import RequestCollector, current

ClientFactory = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
def app_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger whose handler has the filter and a format naming ``%(request_id)s``."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(lunamon.RequestIdFilter())
    handler.setFormatter(logging.Formatter("%(request_id)s %(message)s"))
    log = logging.getLogger("lunamon.tests.app")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield log, stream
    finally:
        log.removeHandler(handler)


def _in_request(request_id: str) -> Any:
    return current.set(RequestCollector("GET:/x", request_id))


def test_filter_sets_a_placeholder_outside_a_request(
    app_log: tuple[logging.Logger, io.StringIO],
) -> None:
    log, stream = app_log
    log.info("outside")
    assert stream.getvalue() == "- outside\n"
    assert lunamon.RequestIdFilter(placeholder="none").filter(_record()) is True


def _record(**extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "message", None, None)
    record.__dict__.update(extra)
    return record


def test_filter_sets_the_id_inside_a_request_and_keeps_one_given() -> None:
    token = _in_request("1700000000,abc")
    try:
        record = _record()
        assert lunamon.RequestIdFilter().filter(record) is True
        assert record.__dict__["request_id"] == "1700000000,abc"
        given = _record(request_id="mine")
        assert lunamon.RequestIdFilter().filter(given) is True
        assert given.__dict__["request_id"] == "mine"
    finally:
        current.reset(token)
    outside = _record()
    lunamon.RequestIdFilter(placeholder="none").filter(outside)
    assert outside.__dict__["request_id"] == "none"


async def test_log_lines_of_a_handler_carry_the_id_it_answers_with(
    aiohttp_client: ClientFactory, app_log: tuple[logging.Logger, io.StringIO]
) -> None:
    log, stream = app_log

    async def handler(request: web.Request) -> web.Response:
        log.info("handling")
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/x", handler)
    sink = MemorySink()
    lunamon.setup(app, service="svc", sinks=[sink])
    client = await aiohttp_client(app)
    given = await client.get("/x", headers={"Luna-Request-Id": "1700000000,given-id"})
    made = await client.get("/x")
    log.info("after")
    await app[MONITORING_KEY].flush()
    made_id = made.headers["Luna-Request-Id"]
    assert given.headers["Luna-Request-Id"] == "1700000000,given-id"
    assert stream.getvalue().splitlines() == [
        "1700000000,given-id handling",
        f"{made_id} handling",
        "- after",
    ]
    assert [p.fields["request_id"] for p in sink.points] == ["1700000000,given-id", made_id]


def test_structlog_processor_adds_the_id_inside_a_request_only() -> None:
    def add(event: dict[str, Any]) -> Any:
        return lunamon.add_request_id(None, "info", event)

    assert add({"event": "outside"}) == {"event": "outside"}
    token = _in_request("1700000000,abc")
    try:
        assert add({"event": "inside"}) == {"event": "inside", "request_id": "1700000000,abc"}
        assert add({"event": "bound", "request_id": "mine"})["request_id"] == "mine"
    finally:
        current.reset(token)


def test_structlog_pipeline_renders_the_id() -> None:
    out = io.StringIO()
    structlog.configure(
        processors=[lunamon.add_request_id, structlog.processors.KeyValueRenderer()],
        logger_factory=structlog.PrintLoggerFactory(out),
    )
    try:
        token = _in_request("1700000000,abc")
        try:
            structlog.get_logger().info("inside")
        finally:
            current.reset(token)
        structlog.get_logger().info("outside")
    finally:
        structlog.reset_defaults()
    assert out.getvalue().splitlines() == [
        "event='inside' request_id='1700000000,abc'",
        "event='outside'",
    ]


def test_lunamons_own_log_lines_carry_the_id(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="lunamon")
    token = _in_request("1700000000,abc")
    try:
        lunamon_logger.warning("inside_event", step="x")
        lunamon_logger.warning("given_event", request_id="other")
    finally:
        current.reset(token)
    lunamon_logger.warning("outside_event")
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "inside_event step='x' request_id='1700000000,abc'",
        "given_event request_id='other'",
        "outside_event",
    ]
    token = _in_request("1700000000,abc")
    try:
        with capture_logs() as events:
            structlog.configure(processors=structlog.get_config()["processors"])
            lunamon_logger.error("structlog_event")
    finally:
        current.reset(token)
        structlog.reset_defaults()
    assert events == [
        {"event": "structlog_event", "request_id": "1700000000,abc", "log_level": "error"}
    ]
