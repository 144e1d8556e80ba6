"""RELIABILITY.md 31: an ``https`` sink never sends a byte over plain HTTP, whatever fails.

The earlier TLS tests could not see a fallback: they never reached the write path
(``create_database=True`` stopped at ``CREATE DATABASE``), and a TLS-only server cannot
record a plain request, it just drops it. Here the sink talks to a plain TCP listener
that records every byte of every connection and relays them to a TLS-only server with a
self-signed certificate: a fallback to ``http://`` on the same host and port would reach
the listener in clear text and be seen. A second spy records every request the sinks'
aiohttp sessions make. (The mutant this kills: on a TLS error, retry the same request
over ``http://`` with its ``Authorization`` header.)
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from _tcp_spy import TcpSpy, assert_tls_only
from servers import FakeInfluxServer, TlsFiles
from yarl import URL

from lunamon.errors import SinkError
from lunamon.flusher import Flusher
from lunamon.point import Point
from lunamon.settings import MonitoringSettings
from lunamon.sinks.influxdb import InfluxDBSink
from lunamon.sinks.influxdb_v2 import InfluxDBV2Sink

PASSWORD = "Tls-0nly-pw-4e1d"
TOKEN = "Tls-0nly-t0ken-8c2f"
POINT = Point("m", 1_700_000_000_000_000_000, {"k": "v"}, {"f": 1.0})
BASIC = base64.b64encode(f"luna:{PASSWORD}".encode()).decode()
SECRETS = [PASSWORD, TOKEN, BASIC]


@pytest.fixture
def session_requests(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, URL]]:
    """Every (method, URL) any aiohttp session of this test is asked for."""
    seen: list[tuple[str, URL]] = []
    original = aiohttp.ClientSession._request

    def spy(self: aiohttp.ClientSession, method: str, str_or_url: Any, **kwargs: Any) -> Any:
        seen.append((method, URL(str_or_url)))
        return original(self, method, str_or_url, **kwargs)

    monkeypatch.setattr(aiohttp.ClientSession, "_request", spy)
    return seen


@pytest.fixture
async def tls_server(tls_cert: TlsFiles) -> AsyncIterator[FakeInfluxServer]:
    """A TLS-only fake InfluxDB with a self-signed certificate."""
    async with FakeInfluxServer(ssl_context=tls_cert.server_context()) as server:
        yield server


@pytest.fixture
async def spy(tls_server: FakeInfluxServer) -> AsyncIterator[TcpSpy]:
    """The recording listener, in front of the TLS-only server."""
    async with TcpSpy(tls_server.port) as tcp:
        yield tcp


def make_sink(kind: str, port: int) -> InfluxDBSink | InfluxDBV2Sink:
    if kind == "v1-write":  # the write path first: no CREATE DATABASE
        return InfluxDBSink(
            "127.0.0.1", port, "db", "luna", PASSWORD, ssl=True, timeout=3.0, create_database=False
        )
    if kind == "v1-create":
        return InfluxDBSink("127.0.0.1", port, "db", "luna", PASSWORD, ssl=True, timeout=3.0)
    return InfluxDBV2Sink(f"https://127.0.0.1:{port}", "org", "bucket", TOKEN, timeout=3.0)


@pytest.mark.parametrize("kind", ["v1-write", "v1-create", "v2"])
async def test_https_sink_sends_nothing_in_clear_when_tls_fails(
    spy: TcpSpy, session_requests: list[tuple[str, URL]], kind: str
) -> None:
    sink = make_sink(kind, spy.port)
    try:
        await sink.start()
        for _ in range(3):  # each attempt fails the same way, and only that way
            with pytest.raises(SinkError) as caught:
                await sink.write([POINT])
            assert caught.value.retryable
            assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)
    finally:
        await sink.close()
    assert_tls_only(spy, SECRETS)
    # Every request the sessions were asked for is https, to the configured port; with
    # create_database=False they are the writes themselves (the write path was reached).
    assert {(url.scheme, url.port) for _, url in session_requests} == {("https", spy.port)}
    assert [url.path for _, url in session_requests] == {
        "v1-write": ["/write"] * 3,
        "v1-create": ["/query"] * 4,  # at start, then before each write: never the write
        "v2": ["/api/v2/write"] * 3,
    }[kind]


async def test_https_sink_under_the_flusher_retries_over_tls_only(
    spy: TcpSpy, session_requests: list[tuple[str, URL]]
) -> None:
    settings = MonitoringSettings(
        batch_size=5, retry_base_delay=0.01, retry_max_delay=0.02, shutdown_timeout=0.5
    )
    sink = make_sink("v1-write", spy.port)
    flusher = Flusher([sink], settings.flush_policy())
    for i in range(5):
        flusher.emit(Point("m", POINT.time_ns + i, {"k": "v"}, {"f": float(i)}))
    for _ in range(3):
        await flusher.flush()
    stats = flusher.stats()["influxdb"]
    assert (stats["retries"], stats["written"], stats["buffered"]) == (3, 0, 5)
    await flusher.close()
    assert flusher.stats()["influxdb"]["dropped"]["shutdown"] == 5
    assert_tls_only(spy, SECRETS)
    assert {url.scheme for _, url in session_requests} == {"https"}
    assert [url.path for _, url in session_requests][:3] == ["/write"] * 3


async def test_the_spy_sees_clear_text_and_relays_tls(
    spy: TcpSpy, tls_server: FakeInfluxServer, tls_cert: TlsFiles
) -> None:
    # The spy can fail: a plain request through the listener is seen in clear, and
    # a sink that trusts the certificate writes through it to the TLS server.
    plain = InfluxDBSink(
        "127.0.0.1", spy.port, "db", "luna", PASSWORD, timeout=3.0, create_database=False
    )
    try:
        with pytest.raises(SinkError):  # the TLS server drops a plain request
            await plain.write([POINT])
    finally:
        await plain.close()
    with pytest.raises(AssertionError):
        assert_tls_only(spy, SECRETS)
    assert tls_server.requests == []
    spy.connections.clear()
    trusting = InfluxDBSink(
        "127.0.0.1", spy.port, "db", "luna", PASSWORD, ssl=True, ca_file=tls_cert.cert_file,
        timeout=3.0, create_database=False,
    )  # fmt: skip
    try:
        await trusting.write([POINT])
    finally:
        await trusting.close()
    assert_tls_only(spy, SECRETS)
    (request,) = tls_server.requests
    assert (request.method, request.path) == ("POST", "/write")
    assert request.headers["Authorization"] == f"Basic {BASIC}"
