"""The shared HTTP layer of the InfluxDB sinks: Retry-After, error classification,
timeouts, TLS and secrets, with the fake server for what influxd cannot be made to do."""

from __future__ import annotations

import asyncio
import email.utils
import ssl
import time
from typing import Any

import pytest
from servers import HANG, FakeInfluxServer, FakeResponse, TlsFiles

from lunamon._secrets import Secret, redact
from lunamon.errors import BatchTooLarge, SinkError
from lunamon.lineprotocol import parse_line_protocol
from lunamon.point import Point
from lunamon.sinks._http import (
    classify_exception,
    classify_response,
    error_text,
    is_loopback,
    make_ssl_context,
    parse_retry_after,
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
    async with FakeInfluxServer(ssl_context=tls_cert.server_context()) as server:
        error = await write_error(influx_sink(server, ssl=True, timeout=2.0))
        assert error.retryable  # a transport failure, like any other
        assert "CERTIFICATE_VERIFY_FAILED" in str(error)
        assert server.requests == []


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
