"""Catalogue 25 and 27 end to end: credentials never leak (repr, str, exception text, logs
at any level — structlog, stdlib and aiohttp's loggers, stdout/stderr) across a run where
writes fail and succeed; they travel in headers, not URLs; TLS verification is on by
default (a self-signed certificate is refused, counted, never retried over plain HTTP),
a CA file is accepted; server error bodies are cut to 1 KB before they are logged.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import shutil
import ssl
import tempfile
import traceback
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from _rel_support import (
    ClientFactory,
    assert_invariant,
    assert_served,
    drive,
    eventually,
    fast_policy,
    new_db,
)
from _tcp_spy import TcpSpy, assert_tls_only
from servers import FakeInfluxServer, FakeResponse, InfluxServer, TlsFiles
from structlog.testing import capture_logs

from lunamon import MONITORING_KEY, MonitoringSettings, Point
from lunamon.demo.service import create_app
from lunamon.sinks.influxdb import InfluxDBSink
from lunamon.sinks.influxdb_v2 import InfluxDBV2Sink

WRONG_PASSWORD = "Wr0ng-S3cret-pw-7f3a"
TOKEN = "t0k3n-V2-s3cret-9b1c"


def basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def exception_texts(exc: BaseException) -> str:
    """Everything an exception can show: str, repr, the formatted traceback, and the same
    for every exception chained to it (cause and context, shown or not)."""
    texts = []
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        item = todo.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        texts += [str(item), repr(item), "".join(traceback.format_exception(item))]
        texts += [repr(value) for value in vars(item).values()] if hasattr(item, "__dict__") else []
        todo += [item.__cause__, item.__context__]
    return "\n".join(texts)


class RecordingInfluxDBSink(InfluxDBSink):
    """InfluxDBSink that keeps every exception its writes raised (the flusher sees them)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.errors: list[BaseException] = []

    async def write(self, points: Sequence[Point]) -> None:
        try:
            await super().write(points)
        except BaseException as exc:
            self.errors.append(exc)
            raise


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """stdlib logging at DEBUG everywhere, aiohttp's and asyncio's loggers included."""
    caplog.set_level(logging.DEBUG)
    for name in ("aiohttp", "aiohttp.client", "aiohttp.server", "aiohttp.web", "asyncio"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def assert_nowhere(secrets: Sequence[str], *texts: str) -> None:
    for secret in secrets:
        for text in texts:
            assert secret not in text


# --------------------------------------------------------------------------- 25: credentials


async def test_25_credentials_never_leak_while_writes_fail_and_succeed(
    aiohttp_client: ClientFactory,
    influxd_auth: InfluxServer,
    all_logs: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    db = new_db()
    admin, admin_password = str(influxd_auth.admin_user), str(influxd_auth.admin_password)
    good = RecordingInfluxDBSink(
        influxd_auth.host,
        influxd_auth.port,
        db,
        username=admin,
        password=admin_password,
        name="good",
    )
    bad = RecordingInfluxDBSink(
        influxd_auth.host,
        influxd_auth.port,
        db,
        username=admin,
        password=WRONG_PASSWORD,
        name="bad",
    )
    app = create_app(sinks=[good, bad], **fast_policy(batch_size=10))
    monitoring = app[MONITORING_KEY]
    with capture_logs() as logs:
        client = await aiohttp_client(app)
        answers = await drive(client, 40, monitoring=monitoring)
        await eventually(
            lambda: (
                monitoring.stats()["good"]["written"] == 40
                and monitoring.stats()["bad"]["dropped"]["rejected"] == 40
            ),
            what="written and rejected",
        )
        await client.close()
    assert_served(answers)
    stats = monitoring.stats()
    assert_invariant(stats)
    assert bad.errors
    assert all(getattr(e, "status", None) == 401 for e in bad.errors)
    assert not good.errors
    assert any(e["event"] == "batch_rejected" and e["sink"] == "bad" for e in logs)
    assert any(e["event"] == "influxdb_create_database_failed" for e in logs)

    captured = capsys.readouterr()
    secrets = [
        WRONG_PASSWORD,
        admin_password,
        basic(admin, WRONG_PASSWORD),
        basic(admin, admin_password),
    ]
    assert_nowhere(
        secrets,
        repr(logs),
        "\n".join(f"{r.getMessage()} {r.args!r} {r.exc_text}" for r in all_logs.records),
        all_logs.text,
        captured.out,
        captured.err,
        *(exception_texts(e) for e in bad.errors),
        repr(good),
        str(good),
        repr(bad),
        str(bad),
        repr(vars(bad)),
        repr(monitoring),
        repr(stats),
    )


def test_25_settings_with_secrets_never_show_them(tmp_path: Path) -> None:
    settings = MonitoringSettings.from_mapping(
        {
            "service": "svc",
            "sinks": [
                {"type": "influxdb", "host": "127.0.0.1", "username": "u", "password": "Pw-x1"},
                {"type": "influxdb_v2", "url": "http://127.0.0.1:1", "org": "o", "bucket": "b",
                 "token": TOKEN},
            ],
        }
    )  # fmt: skip
    sinks = settings.build_sinks()
    texts = [repr(settings), str(settings), *map(repr, sinks), *map(str, sinks)]
    assert_nowhere(["Pw-x1", TOKEN], *texts)
    refused = MonitoringSettings.from_mapping(
        {"service": "svc", "sinks": [{"type": "influxdb", "password": "Pw-x1"}]}
    )  # a password without a username
    with pytest.raises(ValueError, match="username") as caught:
        refused.build_sinks()
    assert_nowhere(["Pw-x1"], exception_texts(caught.value))
    # credentials over plain HTTP to another host: refused unless explicitly allowed
    remote = {"type": "influxdb", "host": "10.1.2.3", "username": "u", "password": "Pw-x1"}
    plain = MonitoringSettings.from_mapping({"service": "svc", "sinks": [remote]})
    with pytest.raises(ValueError, match="allow_plain_credentials") as caught:
        plain.build_sinks()
    assert_nowhere(["Pw-x1"], exception_texts(caught.value))
    allowed = {**remote, "allow_plain_credentials": True}
    (sink,) = MonitoringSettings.from_mapping({"service": "svc", "sinks": [allowed]}).build_sinks()
    assert_nowhere(["Pw-x1"], repr(sink))


async def test_25_credentials_travel_in_headers_never_in_urls(
    aiohttp_client: ClientFactory,
    fake_influx: FakeInfluxServer,
    all_logs: pytest.LogCaptureFixture,
) -> None:
    fake_influx.program(FakeResponse(200, '{"results":[{"statement_id":0}]}'))  # CREATE DATABASE
    password = "H3ader-0nly-pw"
    settings = MonitoringSettings.from_mapping(
        {
            "service": "luna-handlers",
            "flush_interval": 0.05,
            "sinks": [
                {"type": "influxdb", "host": fake_influx.host, "port": fake_influx.port,
                 "database": "db", "username": "luna", "password": password},
                {"type": "influxdb_v2", "url": fake_influx.url, "org": "o", "bucket": "b",
                 "token": TOKEN},
            ],
        }
    )  # fmt: skip
    app = create_app(settings=settings)
    monitoring = app[MONITORING_KEY]
    with capture_logs() as logs:
        client = await aiohttp_client(app)
        answers = await drive(client, 5, monitoring=monitoring)
        await eventually(
            lambda: all(s["written"] == 5 for s in monitoring.stats().values()), what="written"
        )
        await client.close()
    assert_served(answers)
    requests = fake_influx.requests
    assert sorted(r.path for r in requests) == ["/api/v2/write", "/query", "/write"]
    for request in requests:
        assert request.query.keys() <= {"db", "precision", "rp", "org", "bucket"}
        assert_nowhere([password, TOKEN, "luna"], json.dumps(request.query), request.path)
        if request.path == "/api/v2/write":
            assert request.headers["Authorization"] == f"Token {TOKEN}"
        else:
            assert request.headers["Authorization"] == f"Basic {basic('luna', password)}"
            assert password.encode() not in request.body
    assert_nowhere([password, TOKEN, basic("luna", password)], repr(logs), all_logs.text)


async def test_25_v2_token_refused_never_shown(
    aiohttp_client: ClientFactory,
    fake_influx: FakeInfluxServer,
    all_logs: pytest.LogCaptureFixture,
) -> None:
    fake_influx.default = FakeResponse(
        401, f'{{"code":"unauthorized","message":"unauthorized access for Token {TOKEN}"}}'
    )
    sink = InfluxDBV2Sink(fake_influx.url, "o", "b", TOKEN)
    app = create_app(sinks=[sink], **fast_policy())
    monitoring = app[MONITORING_KEY]
    with capture_logs() as logs:
        client = await aiohttp_client(app)
        answers = await drive(client, 5, monitoring=monitoring)
        await eventually(
            lambda: monitoring.stats()["influxdb_v2"]["dropped"]["rejected"] == 5, what="rejected"
        )
        await client.close()
    assert_served(answers)
    rejected = [e for e in logs if e["event"] == "batch_rejected"]
    assert len(rejected) == 1
    assert "unauthorized access for ***" in rejected[0]["error"]  # redacted echo, scheme too
    assert_nowhere([TOKEN], repr(logs), all_logs.text, repr(sink), str(sink))


async def test_25_server_error_bodies_are_cut_to_1_kb_in_logs(
    aiohttp_client: ClientFactory,
    fake_influx: FakeInfluxServer,
    all_logs: pytest.LogCaptureFixture,
) -> None:
    echo = "x" * 20_000
    fake_influx.program(
        FakeResponse(503, f'{{"error":"overloaded: {echo}"}}'),
        FakeResponse(400, f'{{"error":"partial write: unable to parse \'{echo}\'"}}'),
    )
    app = create_app(sinks=[InfluxDBSink(fake_influx.host, fake_influx.port, "db",
                                         create_database=False)],
                     **fast_policy(batch_size=5))  # fmt: skip
    monitoring = app[MONITORING_KEY]
    with capture_logs() as logs:
        client = await aiohttp_client(app)
        answers = await drive(client, 5, monitoring=monitoring)
        await eventually(
            lambda: monitoring.stats()["influxdb"]["dropped"]["rejected"] == 5, what="rejected"
        )
        await client.close()
    assert_served(answers)
    events = [e for e in logs if e["event"] in ("sink_write_failed", "batch_rejected")]
    assert [e["event"] for e in events] == ["sink_write_failed", "batch_rejected"]
    for event in logs:
        for value in event.values():
            assert len(str(value)) <= 1024 + len("...(truncated)")
    assert "x" * 1100 not in all_logs.text


# --------------------------------------------------------------------------- 27: TLS


class HttpsInfluxServer(InfluxServer):
    """influxd serving HTTPS only, with the self-signed certificate of ``tls_cert``."""

    def __init__(self, root: Path, tls: TlsFiles) -> None:
        super().__init__(root)
        self.tls = tls
        self._context = ssl.create_default_context(cafile=tls.cert_file)

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def _write_config(self) -> None:
        super()._write_config()
        text = self.config_path.read_text().replace(
            "[http]\n",
            "[http]\n  https-enabled = true\n"
            f'  https-certificate = "{self.tls.cert_file}"\n'
            f'  https-private-key = "{self.tls.key_file}"\n',
        )
        self.config_path.write_text(text)

    def _open(self, request: urllib.request.Request) -> tuple[int, bytes]:
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=self._context)
        )
        try:
            with opener.open(request, timeout=5.0) as response:
                return int(response.status), bytes(response.read())
        except urllib.error.HTTPError as err:
            with err:
                return int(err.code), bytes(err.read())

    def _ping(self) -> bool:
        return self._open(urllib.request.Request(f"{self.url}/ping"))[0] == 204

    def query(self, q: str, db: str | None = None, **_: Any) -> Any:
        params = {"q": q, "epoch": "ns", **({"db": db} if db else {})}
        data = urllib.parse.urlencode(params).encode()
        status, raw = self._open(urllib.request.Request(f"{self.url}/query", data=data))
        assert status == 200, raw
        return json.loads(raw)


@pytest.fixture(scope="module")
def influxd_https(tls_cert: TlsFiles) -> Iterator[HttpsInfluxServer]:
    root = Path(tempfile.mkdtemp(prefix="lunamon-influxd-https-"))
    server = HttpsInfluxServer(root, tls_cert)
    try:
        server.first_start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


async def test_27_self_signed_certificate_refused_by_default_and_counted(
    aiohttp_client: ClientFactory, influxd_https: HttpsInfluxServer
) -> None:
    db = new_db()
    sink = RecordingInfluxDBSink(influxd_https.host, influxd_https.port, db, ssl=True)
    app = create_app(sinks=[sink], **fast_policy(shutdown_timeout=0.3))
    monitoring = app[MONITORING_KEY]
    with capture_logs() as logs:
        client = await aiohttp_client(app)
        answers = await drive(client, 10, monitoring=monitoring)
        await eventually(lambda: monitoring.stats()["influxdb"]["retries"] >= 2, what="retries")
        await client.close()
    assert_served(answers)
    stats = monitoring.stats()["influxdb"]
    assert (stats["written"], stats["dropped"]["shutdown"]) == (0, 10)  # counted, not lost
    assert all("CERTIFICATE_VERIFY_FAILED" in str(e) for e in sink.errors)
    assert any("CERTIFICATE_VERIFY_FAILED" in str(e.get("error")) for e in logs)
    assert db not in influxd_https.databases()  # no database made, nothing written


async def test_27_no_fallback_to_plain_http(
    aiohttp_client: ClientFactory, tls_cert: TlsFiles
) -> None:
    # The sink reaches the TLS-only server through a plain TCP listener that records every
    # byte (_tcp_spy): a request retried over http:// on the same port would be seen there
    # in clear. create_database=False: the writes themselves are attempted, and retried.
    async with (
        FakeInfluxServer(ssl_context=tls_cert.server_context()) as server,
        TcpSpy(server.port) as spy,
    ):
        sink = InfluxDBSink(
            "127.0.0.1", spy.port, "db", ssl=True, username="u", password="p1-Plain-x",
            create_database=False,
        )  # fmt: skip
        app = create_app(sinks=[sink], **fast_policy(shutdown_timeout=0.2))
        monitoring = app[MONITORING_KEY]
        client = await aiohttp_client(app)
        answers = await drive(client, 5, monitoring=monitoring)
        await eventually(lambda: monitoring.stats()["influxdb"]["retries"] >= 2, what="retries")
        await client.close()
        assert len(spy.connections) >= 3  # every attempt reached the listener, over TLS only
        assert_tls_only(spy, ["p1-Plain-x", basic("u", "p1-Plain-x")])
        assert server.requests == []  # and none got through the TLS server
        # ... which records what does get through: the same path with the CA trusted.
        trusting = InfluxDBSink(
            "127.0.0.1", spy.port, "db", ssl=True, username="u", password="p1-Plain-x",
            create_database=False, ca_file=tls_cert.cert_file,
        )  # fmt: skip
        try:
            await trusting.write([Point("m", 1, None, {"f": 1.0})])
        finally:
            await trusting.close()
        assert [(r.path, r.headers["Authorization"]) for r in server.requests] == [
            ("/write", f"Basic {basic('u', 'p1-Plain-x')}")
        ]
    assert_served(answers)
    stats = monitoring.stats()["influxdb"]
    assert (stats["written"], stats["dropped"]["shutdown"]) == (0, 5)


@pytest.mark.parametrize("how", ["argument", "settings"])
async def test_27_ca_file_accepted_points_stored(
    aiohttp_client: ClientFactory, influxd_https: HttpsInfluxServer, tls_cert: TlsFiles, how: str
) -> None:
    db = new_db()
    if how == "argument":
        sink = InfluxDBSink(
            influxd_https.host, influxd_https.port, db, ssl=True, ca_file=tls_cert.cert_file
        )
        app = create_app(sinks=[sink], **fast_policy())
    else:
        settings = MonitoringSettings.from_mapping(
            {
                "service": "luna-handlers",
                "flush_interval": 0.05,
                "sinks": [{"type": "influxdb", "host": influxd_https.host,
                           "port": influxd_https.port, "database": db, "ssl": True,
                           "ca_file": tls_cert.cert_file}],
            }
        )  # fmt: skip
        app = create_app(settings=settings)
    monitoring = app[MONITORING_KEY]
    client = await aiohttp_client(app)
    answers = await drive(client, 10, monitoring=monitoring)
    await eventually(lambda: monitoring.stats()["influxdb"]["written"] == 10, what="written")
    await client.close()
    assert_served(answers)
    result = await asyncio.to_thread(influxd_https.query, 'SELECT "request_id" FROM "request"', db)
    values = result["results"][0]["series"][0]["values"]
    assert sorted(v[1] for v in values) == sorted(a.request_id for a in answers)
