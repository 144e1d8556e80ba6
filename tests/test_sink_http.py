"""The shared HTTP layer of the InfluxDB sinks: Retry-After, error classification,
timeouts, TLS and secrets, with the fake server for what influxd cannot be made to do."""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import ssl
import time
from typing import Any

import aiohttp
import pytest
from _tcp_spy import TcpSpy, assert_tls_only
from servers import HANG, FakeInfluxServer, FakeResponse, TlsFiles
from structlog.testing import capture_logs
from yarl import URL

from lunamon._secrets import Secret, redact
from lunamon.errors import BatchTooLarge, SinkError
from lunamon.lineprotocol import parse_line_protocol
from lunamon.point import Point
from lunamon.sinks._http import (
    SinkSession,
    classify_exception,
    classify_response,
    error_text,
    is_loopback,
    make_ssl_context,
    parse_retry_after,
    post_body,
    read_error_body,
    refuse_plain_credentials,
    truncate,
)
from lunamon.sinks.influxdb import InfluxDBSink
from lunamon.sinks.influxdb_v2 import InfluxDBV2Sink

NOW = 1_700_000_000.0
POINT = Point("m", 1, {"k": "v"}, {"f": 1.0})


def http_date(seconds: float) -> str:
    return email.utils.formatdate(seconds, usegmt=True)


# --------------------------------------------------------------------------- Retry-After


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("   ", None),
        ("0", 0.0),
        ("5", 5.0),
        (" 7 ", 7.0),
        ("2.5", 2.5),
        ("-3", 0.0),
        ("86400000", 86_400_000.0),  # huge: returned as is, the flusher caps it
        ("99999999999999999999999", 1e23),
        (http_date(NOW + 30), 30.0),
        (http_date(NOW - 30), 0.0),  # in the past
        ("Tue, 14 Nov 2023 22:13:50 -0000", 30.0),  # no zone: GMT
        ("soon", None),
        ("1e3", None),
        ("inf", None),
        ("nan", None),
        ("5 seconds", None),
        ("Mon, 99 Foo 2015 07:28:00 GMT", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == expected


def test_parse_retry_after_date_defaults_to_the_wall_clock() -> None:
    result = parse_retry_after(http_date(time.time() + 100))
    assert result is not None
    assert 98 <= result <= 100


# --------------------------------------------------------------------------- classification


@pytest.mark.parametrize(
    ("status", "text", "retryable", "reason"),
    [
        (400, "partial write: field type conflict dropped=1", False, "partial write"),
        (400, "unable to parse 'x': missing fields", False, "bad request"),
        (401, "unable to parse authentication credentials", False, "unauthorized"),
        (403, '"reader" user is not authorized to write to database "db"', False, "forbidden"),
        (404, 'database not found: "db"', False, "database not found"),
        (404, "page not found", False, "not found"),
        (408, "", True, ""),
        (409, "conflict", False, ""),
        (429, "", True, "too many requests"),
        (500, "retention policy not found: rp", False, "retention policy not found"),
        (500, "engine: cache-max-memory-size exceeded", True, ""),
        (502, "<html>bad gateway</html>", True, ""),
        (503, "request throttled, queue full", True, "throttled"),
        (504, "", True, ""),
        (307, "", False, ""),
    ],
)
def test_classify_response(status: int, text: str, retryable: bool, reason: str) -> None:
    error = classify_response(status, text, {"Retry-After": "4"}, what="write to x")
    assert type(error) is SinkError
    assert error.status == status
    assert error.retryable is retryable
    assert error.retry_after == (4.0 if retryable else None)
    assert error.server_text == text
    assert str(error).startswith(f"write to x failed: HTTP {status} {reason}".rstrip())


def test_413_is_batch_too_large() -> None:
    error = classify_response(413, "Request Entity Too Large", None)
    assert isinstance(error, BatchTooLarge)
    assert (error.status, error.retryable) == (413, False)


def test_server_text_is_truncated_and_redacted() -> None:
    error = classify_response(400, "pw=hunter22 " + "x" * 5000, None, secrets=["hunter22"])
    assert len(error.server_text) <= 1024 + len("...(truncated)")
    assert error.server_text.startswith("pw=*** xxx")
    assert "hunter22" not in str(error)


@pytest.mark.parametrize(
    ("body", "headers", "expected"),
    [
        (b'{"error":"database not found: \\"x\\""}\n', {}, 'database not found: "x"'),
        (b'{"code":"invalid","message":"bad line"}', {}, "bad line"),
        (b"plain text\n", {}, "plain text"),
        (b"{not json", {}, "{not json"),
        (b"", {"X-Influxdb-Error": "from the header"}, "from the header"),
        (b"\xff\xfe broken utf-8", {}, "\ufffd\ufffd broken utf-8"),
        (b'{"error": 5}', {}, '{"error": 5}'),  # not a text: the body as it came
        (b'{"error": "", "message": "the message"}', {}, "the message"),
        (b"", {}, ""),  # nothing at all: nothing made up
        (b"  \n", {"X-Influxdb-Error": "header only"}, "header only"),
    ],
)
def test_error_text(body: bytes, headers: dict[str, str], expected: str) -> None:
    assert error_text(body, headers) == expected


def test_classify_exception_is_retryable_and_redacted() -> None:
    error = classify_exception(ConnectionResetError("reset by s3cr3t"), secrets=[Secret("s3cr3t")])
    assert error.retryable
    assert "s3cr3t" not in str(error)
    assert "ConnectionResetError" in str(error)
    assert "timed out" in str(classify_exception(asyncio.TimeoutError()))


def test_redact_and_secret() -> None:
    assert redact("a pass b pass", [None, "", Secret("pass")]) == "a *** b ***"
    assert redact("too short to hide", ["t"]) == "too short to hide"
    secret = Secret("tok")
    assert (repr(secret), str(secret), secret.reveal()) == ("'***'", "'***'", "tok")
    assert not Secret("")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("db.localhost", True),
        ("10.0.0.1", False),
        ("influx.example.com", False),
        ("localhost.example.com", False),
        ("Xlocalhost", False),
        ("[localhost]X", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_ssl_context() -> None:
    strict = make_ssl_context()
    assert strict.verify_mode == ssl.CERT_REQUIRED
    assert strict.check_hostname
    lax = make_ssl_context(verify=False)
    assert lax.verify_mode == ssl.CERT_NONE
    assert not lax.check_hostname
    with pytest.raises(FileNotFoundError):
        make_ssl_context(ca_file="/nonexistent/ca.pem")


# --------------------------------------------------------------------------- through the sinks


def influx_sink(server: FakeInfluxServer, **options: Any) -> InfluxDBSink:
    return InfluxDBSink(server.host, server.port, "db", create_database=False, **options)


async def write_error(sink: InfluxDBSink | InfluxDBV2Sink) -> SinkError:
    try:
        with pytest.raises(SinkError) as caught:
            await sink.write([POINT])
        return caught.value
    finally:
        await sink.close()


async def test_429_with_retry_after_seconds(fake_influx: FakeInfluxServer) -> None:
    fake_influx.program(FakeResponse(429, "", {"Retry-After": "17"}))
    error = await write_error(influx_sink(fake_influx))
    assert (error.status, error.retryable, error.retry_after) == (429, True, 17.0)


async def test_429_with_retry_after_date(fake_influx: FakeInfluxServer) -> None:
    fake_influx.program(
        FakeResponse(429, "slow down", {"Retry-After": http_date(time.time() + 60)})
    )
    error = await write_error(influx_sink(fake_influx))
    assert error.retryable
    assert error.retry_after is not None
    assert 55 <= error.retry_after <= 60
    assert error.server_text == "slow down"


async def test_429_with_garbage_retry_after(fake_influx: FakeInfluxServer) -> None:
    fake_influx.program(FakeResponse(429, "", {"Retry-After": "later, maybe"}))
    error = await write_error(influx_sink(fake_influx))
    assert (error.retryable, error.retry_after) == (True, None)


async def test_503_request_throttled_without_retry_after(fake_influx: FakeInfluxServer) -> None:
    # what influxd 1.x answers when its write queue is full
    fake_influx.program(FakeResponse(503, '{"error":"request throttled, queue full"}\n'))
    error = await write_error(influx_sink(fake_influx))
    assert (error.status, error.retryable, error.retry_after) == (503, True, None)
    assert error.server_text == "request throttled, queue full"


async def test_long_error_body_is_truncated(fake_influx: FakeInfluxServer) -> None:
    fake_influx.program(FakeResponse(400, '{"error":"partial write: ' + "x" * 20_000 + '"}'))
    error = await write_error(influx_sink(fake_influx))
    assert len(error.server_text) <= 1024 + len("...(truncated)")
    assert len(str(error)) < 1300


async def test_redirect_is_not_followed(fake_influx: FakeInfluxServer) -> None:
    fake_influx.program(FakeResponse(307, "", {"Location": "http://127.0.0.1:1/write"}))
    error = await write_error(influx_sink(fake_influx, username="u", password="p"))
    assert (error.status, error.retryable) == (307, False)
    assert len(fake_influx.requests) == 1


@pytest.mark.parametrize("kind", ["v1", "v2"])
async def test_hung_server_times_out_within_the_configured_timeout(
    fake_influx: FakeInfluxServer, kind: str
) -> None:
    fake_influx.program(HANG)
    sink: InfluxDBSink | InfluxDBV2Sink
    if kind == "v1":
        sink = influx_sink(fake_influx, timeout=0.5)
    else:
        sink = InfluxDBV2Sink(fake_influx.url, "o", "b", "t", timeout=0.5)
    started = time.monotonic()
    error = await write_error(sink)
    elapsed = time.monotonic() - started
    assert error.retryable
    assert "timed out" in str(error)
    assert 0.45 <= elapsed < 1.5
    assert len(fake_influx.requests) == 1


async def test_request_shape_basic_auth_in_header_not_url(fake_influx: FakeInfluxServer) -> None:
    password = "B4sic-pw-Xy"
    sink = influx_sink(
        fake_influx, username="luna", password=password, retention_policy="rp1", gzip=True
    )
    try:
        await sink.write([POINT, POINT])
    finally:
        await sink.close()
    (request,) = fake_influx.requests
    assert (request.method, request.path) == ("POST", "/write")
    assert request.query == {"db": "db", "precision": "ns", "rp": "rp1"}
    assert request.headers["Authorization"] == "Basic bHVuYTpCNHNpYy1wdy1YeQ=="
    assert request.headers["Content-Encoding"] == "gzip"
    assert parse_line_protocol(request.body.decode()) == [POINT, POINT]


async def test_create_database_statement_error_is_logged_not_raised(
    fake_influx: FakeInfluxServer,
) -> None:
    fake_influx.program(
        FakeResponse(200, '{"results":[{"statement_id":0,"error":"boom"}]}'), FakeResponse(204)
    )
    sink = InfluxDBSink(fake_influx.host, fake_influx.port, 'odd"name\\')
    try:
        await sink.start()
        await sink.write([POINT])
    finally:
        await sink.close()
    create, write = fake_influx.requests
    assert create.path == "/query"
    assert create.body == b"q=CREATE+DATABASE+%22odd%5C%22name%5C%5C%22"
    assert write.query["db"] == 'odd"name\\'


# --------------------------------------------------------------------------- TLS


async def test_tls_self_signed_fails_without_ca_and_never_falls_back(
    tls_cert: TlsFiles,
) -> None:
    # Through a listener that records every byte (a plain request would show there) to a
    # TLS-only server; create_database=False, so it is the write that is refused.
    async with (
        FakeInfluxServer(ssl_context=tls_cert.server_context()) as server,
        TcpSpy(server.port) as spy,
    ):
        sink = InfluxDBSink(
            "127.0.0.1", spy.port, "db", ssl=True, timeout=2.0, create_database=False
        )
        error = await write_error(sink)
        assert error.retryable  # a transport failure, like any other
        assert "CERTIFICATE_VERIFY_FAILED" in str(error)
        assert_tls_only(spy)
        assert server.requests == []
        trusting = influx_sink(server, ssl=True, ca_file=tls_cert.cert_file)
        try:
            await trusting.write([POINT])
        finally:
            await trusting.close()
        assert [r.path for r in server.requests] == ["/write"]  # what does get through


async def test_tls_with_ca_file_or_verification_off(tls_cert: TlsFiles) -> None:
    async with FakeInfluxServer(ssl_context=tls_cert.server_context()) as server:
        for sink in (
            influx_sink(server, ssl=True, ca_file=tls_cert.cert_file),
            influx_sink(server, ssl=True, verify_ssl=False),
            InfluxDBV2Sink(server.url, "o", "b", "t", ca_file=tls_cert.cert_file),
        ):
            try:
                await sink.write([POINT])
            finally:
                await sink.close()
        assert len(server.requests) == 3


NOT_FOUND = FakeResponse(404, '{"error":"database not found: \\"db\\""}')
CREATED = FakeResponse(200, '{"results":[{"statement_id":0}]}')


@pytest.mark.parametrize(
    ("create_answer", "status", "retryable"),
    [
        (CREATED, None, None),  # created: the batch is written on the retry
        (FakeResponse(503, "down for a moment"), 503, True),  # retry the batch later
        (FakeResponse(403, '{"error":"requires admin privilege"}'), 404, False),  # 404 stands
    ],
)
async def test_404_database_not_found_creates_and_retries_once(
    fake_influx: FakeInfluxServer,
    create_answer: FakeResponse,
    status: int | None,
    retryable: bool | None,
) -> None:
    fake_influx.program(CREATED, NOT_FOUND, create_answer, FakeResponse(204))
    sink = InfluxDBSink(fake_influx.host, fake_influx.port, "db")
    try:
        await sink.start()
        if status is None:
            await sink.write([POINT])
        else:
            with pytest.raises(SinkError) as caught:
                await sink.write([POINT])
            assert (caught.value.status, caught.value.retryable) == (status, retryable)
    finally:
        await sink.close()
    paths = [r.path for r in fake_influx.requests]
    assert paths == ["/query", "/write", "/query", "/write"][: 4 if status is None else 3]


# --------------------------------------------------------------------------- exact texts
# (docs/mutation.md: each test below kills mutants the tests above let through.)


def test_truncate_marks_only_what_it_cuts() -> None:
    assert truncate("x" * 10, 10) == "x" * 10
    assert truncate("x" * 11, 10) == "x" * 10 + "...(truncated)"
    assert truncate("y" * 1025) == "y" * 1024 + "...(truncated)"


def test_retry_after_date_without_a_zone_is_gmt_in_any_local_zone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        assert time.timezone != 0  # the local zone is not GMT here
        assert parse_retry_after("Tue, 14 Nov 2023 22:13:50 -0000", now=NOW) == 30.0
        assert parse_retry_after(http_date(NOW + 30), now=NOW) == 30.0
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize(
    ("status", "text", "message", "retryable"),
    [
        (504, "", "write failed: HTTP 504", True),
        (599, "", "write failed: HTTP 599", True),
        (600, "", "write failed: HTTP 600", False),
        (409, "conflict", "write failed: HTTP 409: conflict", False),
        (409, "throttled", "write failed: HTTP 409: throttled", False),
        (429, "throttled", "write failed: HTTP 429 too many requests: throttled", True),
        (503, "busy", "write failed: HTTP 503: busy", True),
        (503, "throttled", "write failed: HTTP 503 throttled: throttled", True),
        (413, "too big", "write failed: HTTP 413 body too large: too big", False),
    ],
)
def test_classified_response_message_is_exact(
    status: int, text: str, message: str, retryable: bool
) -> None:
    error = classify_response(status, text)
    assert (str(error), error.retryable, error.status, error.server_text) == (
        message,
        retryable,
        status,
        text,
    )


def test_classified_exception_message_is_exact() -> None:
    assert str(classify_exception(asyncio.TimeoutError())) == "write failed: timed out"
    assert str(classify_exception(ConnectionResetError())) == "write failed: ConnectionResetError"
    assert str(classify_exception(ConnectionResetError("reset"), what="x")) == (
        "x failed: ConnectionResetError: reset"
    )


async def test_an_error_body_that_cannot_be_read_is_empty() -> None:
    class Content:
        async def read(self, n: int) -> bytes:
            raise aiohttp.ClientPayloadError("connection cut")

    class Response:
        content = Content()

    assert await read_error_body(Response()) == b""  # type: ignore[arg-type]


async def test_a_transport_failure_names_the_write_and_hides_secrets() -> None:
    class Unreachable:
        def post(self, *args: Any, **kwargs: Any) -> Any:
            raise aiohttp.ClientConnectionError("cannot reach pw-Hidden-42 today")

    with pytest.raises(SinkError) as caught:
        await post_body(
            Unreachable(),  # type: ignore[arg-type]
            URL("http://127.0.0.1:1/write"),
            b"",
            authorization=None,
            gzipped=False,
            what="influxdb write to x",
            secrets=[Secret("pw-Hidden-42")],
        )
    assert str(caught.value) == (
        "influxdb write to x failed: ClientConnectionError: cannot reach *** today"
    )
    assert caught.value.retryable


GZIP_BASE = b"".join(
    b'request,route=POST:/x,status_code=%d execution_time=%f,request_id="1700,%08x" %d\n'
    % (200 + i % 7, i / 7, i, 1_700_000_000_000_000_000 + i)
    for i in range(2000)
)


@pytest.mark.parametrize(("size", "threaded"), [(30_000, False), (65_536, False), (65_537, True)])
@pytest.mark.parametrize("level", [None, 6, 9])
async def test_gzip_is_level_1_unless_told_without_a_time_and_off_the_loop_above_64_kib(
    monkeypatch: pytest.MonkeyPatch, size: int, threaded: bool, level: int | None
) -> None:
    from lunamon.sinks._http import compress

    body = (GZIP_BASE * 3)[:size]
    expected = gzip.compress(body, compresslevel=level or 1, mtime=0)
    others = {gzip.compress(body, compresslevel=n, mtime=0) for n in (1, 6, 9) if n != (level or 1)}
    assert expected not in others  # the level shows
    calls: list[int] = []
    real_to_thread = asyncio.to_thread

    async def recording_to_thread(func: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(args[0]))
        return await real_to_thread(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", recording_to_thread)
    zipped = await (compress(body) if level is None else compress(body, level))
    assert zipped == expected  # the same bytes every time: no timestamp
    assert calls == ([size] if threaded else [])


# --------------------------------------------------------------------------- through a sink


async def sink_error(sink: InfluxDBSink, points: Any = (POINT,)) -> SinkError:
    with pytest.raises(SinkError) as caught:
        await sink.write(list(points))
    return caught.value


async def test_request_shape_user_agent_content_type_and_no_proxy_from_the_environment(
    fake_influx: FakeInfluxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):  # a proxy that is not there
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    sink = influx_sink(fake_influx, ca_file="/nonexistent/ca.pem")  # plain HTTP: unused

    class JsonSink(InfluxDBSink):
        content_type = "application/json"

    other = JsonSink(fake_influx.host, fake_influx.port, "db", create_database=False)
    try:
        await sink.write((POINT, POINT))  # a tuple works as well as a list
        await other.write([POINT])
    finally:
        await sink.close()
        await other.close()
    first, second = fake_influx.requests
    assert first.headers["User-Agent"] == "lunamon"
    assert first.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert "Content-Encoding" not in first.headers
    assert parse_line_protocol(first.body.decode()) == [POINT, POINT]
    assert second.headers["Content-Type"] == "application/json"


@pytest.mark.parametrize(
    ("status", "stored"), [(200, True), (204, True), (299, True), (300, False)]
)
async def test_only_a_2xx_answer_is_a_success(
    fake_influx: FakeInfluxServer, status: int, stored: bool
) -> None:
    fake_influx.program(FakeResponse(status, ""))
    sink = influx_sink(fake_influx)
    try:
        if stored:
            await sink.write([POINT])
        else:
            error = await sink_error(sink)
            assert (error.status, error.retryable) == (status, False)
    finally:
        await sink.close()


async def test_server_errors_name_the_sink_and_never_show_the_password(
    fake_influx: FakeInfluxServer,
) -> None:
    password = "Pw-in-the-echo-77"
    fake_influx.program(
        FakeResponse(400, f'{{"error":"unable to parse {password}"}}'),
        FakeResponse(401, "", {"X-Influxdb-Error": "authorization failed"}),
    )
    sink = influx_sink(fake_influx, username="luna", password=password)
    what = f"influxdb write to http://127.0.0.1:{fake_influx.port} db=db"
    try:
        error = await sink_error(sink)
        assert str(error) == f"{what} failed: HTTP 400 bad request: unable to parse ***"
        error = await sink_error(sink)
        assert str(error) == (
            f"{what} failed: HTTP 401 unauthorized (missing or wrong credentials):"
            " authorization failed"
        )
    finally:
        await sink.close()
    error = await sink_error(sink)
    assert (str(error), error.retryable) == (f"{what} failed: the sink is closed", False)


async def test_a_closed_session_refuses_writes_until_started_again() -> None:
    session = SinkSession(
        what="w", name="n", url="u", timeout=1.0, tls=False, verify_ssl=True, ca_file=None,
        plain_credentials=False,
    )  # fmt: skip
    opened = session.open()
    assert session.open() is opened  # one session, opened on first use
    await session.close()
    with pytest.raises(SinkError) as caught:
        session.open()
    assert (str(caught.value), caught.value.retryable) == ("w failed: the sink is closed", False)
    reopened = session.start()
    assert reopened is not opened
    assert session.open() is reopened
    await session.close()


async def test_plain_credentials_allowed_are_logged_with_sink_and_url() -> None:
    sink = InfluxDBSink(
        "10.20.30.40", username="luna", password="pw-x", create_database=False,
        allow_plain_credentials=True, name="remote",
    )  # fmt: skip
    with capture_logs() as logs:
        await sink.start()
    await sink.close()
    assert logs == [
        {
            "event": "influxdb_plain_credentials",
            "sink": "remote",
            "url": "http://10.20.30.40:8086",
            "detail": "credentials are sent over plain HTTP (allow_plain_credentials=True)",
            "log_level": "warning",
        }
    ]


@pytest.mark.parametrize(
    ("credentials", "tls", "host", "allow", "plain"),
    [
        (True, False, "10.0.0.1", True, True),  # allowed, and to be warned about
        (True, True, "10.0.0.1", False, False),
        (True, False, "127.0.0.1", False, False),
        (True, False, "localhost", False, False),
        (False, False, "10.0.0.1", False, False),
    ],
)
def test_refuse_plain_credentials(
    credentials: bool, tls: bool, host: str, allow: bool, plain: bool
) -> None:
    assert refuse_plain_credentials(credentials, tls, host, allow) is plain


@pytest.mark.parametrize("host", ["10.0.0.1", None])
def test_plain_credentials_to_another_host_are_refused_with_the_way_out(host: str | None) -> None:
    with pytest.raises(ValueError) as caught:  # noqa: PT011 - the message is checked whole
        refuse_plain_credentials(True, False, host, False)
    assert str(caught.value) == (
        f"credentials would go to {host} over plain HTTP: use TLS,"
        " or pass allow_plain_credentials=True to accept that"
    )
