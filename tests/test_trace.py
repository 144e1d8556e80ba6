"""One request across three real services, and ``lunamon trace`` showing it whole.

Three aiohttp services on loopback, each monitored by lunamon into a real store: the
api-like one calls the handlers-like one, which calls the faces-like one, through
``client_trace_config``. api and handlers write line-protocol files, faces writes
into influxd.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from servers import ClickHouseServer, InfluxServer

import lunamon
from lunamon import MONITORING_KEY, InfluxDBSink, LineProtocolFileSink, Point
from lunamon.cli import main
from lunamon.cli.trace import TraceBuilder, format_trace, trace_html
from lunamon.lineprotocol import parse_line_protocol

DB = "lunamon_trace_test"
GIVEN_OK = "1700000000,0b6f8e2a-3c4d-4e5f-9a7b-8c9d0e1f2a04"
GIVEN_FAILED = "1700000001,e5d4c3b2-a1f0-4e9d-8c7b-6a5f4e3d2c05"
NEXT = web.AppKey("next", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)


@lunamon.timed("detect_time")
async def detect() -> None:
    await asyncio.sleep(0)


async def faces(request: web.Request) -> web.Response:
    await detect()
    if request.query.get("fail"):
        return web.json_response({"error_code": 11, "desc": "simulated"}, status=500)
    return web.json_response({"faces": [1, 2]})


async def _call_next(request: web.Request) -> web.Response:
    """Call the next service with the query as it came; its failure becomes a 502."""
    session = request.app[SESSION]
    async with session.post(request.app[NEXT], params=request.query) as answer:
        body = await answer.read()
    if answer.status >= 400:
        return web.json_response({"error_code": 22, "desc": "downstream failed"}, status=502)
    return web.Response(body=body, content_type="application/json")


def _app(service: str, sink: lunamon.Sink, next_url: str | None, step: str) -> web.Application:
    app = web.Application()
    if next_url is None:
        app.router.add_post("/faces", faces)
    else:
        app[NEXT] = next_url
        app.router.add_route("*", "/call", _call_next)

        async def client(app: web.Application) -> AsyncIterator[None]:
            trace_config = lunamon.client_trace_config(step=step)
            async with aiohttp.ClientSession(trace_configs=[trace_config]) as session:
                app[SESSION] = session
                yield

        app.cleanup_ctx.append(client)
    lunamon.setup(app, service=service, sinks=[sink])
    return app


@dataclass
class RoundTrip:
    api_file: Path
    handlers_file: Path
    influx_url: str  # http://host:port/db, faces' points
    ids: dict[str, str]  # "ok", "failed", "made" -> the id the api answered with


async def _round_trip(tmp: Path, influxd: InfluxServer) -> RoundTrip:
    runners: list[web.AppRunner] = []

    async def serve(app: web.Application) -> str:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    api_file, handlers_file = tmp / "api.lp", tmp / "handlers.lp"
    faces_app = _app("svc-faces", InfluxDBSink(influxd.host, influxd.port, DB), None, "")
    faces_url = await serve(faces_app)
    handlers_app = _app(
        "svc-handlers",
        LineProtocolFileSink(handlers_file, fsync=False),
        faces_url + "/faces",
        "faces",
    )
    handlers_url = await serve(handlers_app)
    api_app = _app(
        "svc-api", LineProtocolFileSink(api_file, fsync=False), handlers_url + "/call", "handlers"
    )
    api_url = await serve(api_app)
    ids: dict[str, str] = {}
    try:
        async with aiohttp.ClientSession() as session:
            for name, headers, params in (
                ("ok", {"Luna-Request-Id": GIVEN_OK}, {}),
                ("failed", {"Luna-Request-Id": GIVEN_FAILED}, {"fail": "1"}),
                ("made", {}, {}),
            ):
                async with session.get(api_url + "/call", headers=headers, params=params) as r:
                    await r.read()
                    assert r.status == (502 if params else 200)
                    ids[name] = r.headers["Luna-Request-Id"]
        for app in (api_app, handlers_app, faces_app):
            await app[MONITORING_KEY].flush()
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
    return RoundTrip(api_file, handlers_file, f"{influxd.url}/{DB}", ids)


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory: pytest.TempPathFactory, influxd: InfluxServer) -> RoundTrip:
    return asyncio.run(_round_trip(tmp_path_factory.mktemp("trace"), influxd))


def _request_points(points: list[Point], request_id: str) -> list[Point]:
    return [p for p in points if p.series == "request" and p.fields["request_id"] == request_id]


def test_one_id_in_all_three_services_and_callers_time_their_callees(
    round_trip: RoundTrip, influxd: InfluxServer
) -> None:
    api = parse_line_protocol(round_trip.api_file.read_text())
    handlers = parse_line_protocol(round_trip.handlers_file.read_text())
    rows = influxd.rows('SELECT * FROM "request"', DB)
    assert round_trip.ids["ok"] == GIVEN_OK
    assert round_trip.ids["made"] not in (GIVEN_OK, GIVEN_FAILED)
    for request_id in round_trip.ids.values():
        (a,) = _request_points(api, request_id)
        (b,) = _request_points(handlers, request_id)
        (c,) = [row for row in rows if row["request_id"] == request_id]
        assert b.fields["execution_time"] <= a.fields["handlers_time"]  # type: ignore[operator]
        assert c["execution_time"] <= b.fields["faces_time"]
        assert a.time_ns < b.time_ns < c["time"]  # one process: its clock orders them
        assert "detect_time" in c
    errors = influxd.rows('SELECT * FROM "error"', DB)
    assert [row["request_id"] for row in errors] == [GIVEN_FAILED]


def _trace_out(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["trace", *argv]) == 0
    return capsys.readouterr().out


def test_trace_prints_the_waterfall_across_sources(
    round_trip: RoundTrip, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _trace_out(
        capsys,
        GIVEN_OK,
        str(round_trip.api_file),
        str(round_trip.handlers_file),
        "--influx",
        round_trip.influx_url,
    )
    assert out.startswith(f"request {GIVEN_OK}: 3 points from 3 services")
    rows = [line for line in out.splitlines() if line.lstrip().startswith("svc-")]
    assert [re.match(r"^( *)(\S+) (\S+) +(\d+) +\+([\d.]+)", row).groups()[:4] for row in rows] == [  # type: ignore[union-attr]
        ("", "svc-api", "GET:/call", "200"),
        ("  ", "svc-handlers", "POST:/call", "200"),
        ("    ", "svc-faces", "POST:/faces", "200"),
    ]
    assert rows[0].split()[3] == "+0.000"  # the earliest start
    assert all("|" in row and "#" in row for row in rows)
    assert re.search(r"^ {4}step handlers_time +[\d.]+$", out, re.M)
    assert re.search(r"^ {6}step faces_time +[\d.]+$", out, re.M)
    assert re.search(r"^ {8}step detect_time +[\d.]+$", out, re.M)
    assert "error" not in out
    assert f"{round_trip.api_file} (1 point)" in out
    assert f"InfluxDB {round_trip.influx_url} (1 point)" in out


def test_trace_shows_the_error_points(
    round_trip: RoundTrip, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _trace_out(
        capsys,
        GIVEN_FAILED,
        str(round_trip.handlers_file),
        str(round_trip.api_file),
        "--influx",
        round_trip.influx_url,
    )
    statuses = re.findall(r"^ *svc-\S+ \S+ +(\d+)", out, re.M)
    assert statuses == ["502", "502", "500"]
    codes = re.findall(r"^ *error: error_code (\d+)$", out, re.M)
    assert codes == ["22", "22", "11"]


def test_trace_from_one_file_nests_nothing_it_cannot_see(
    round_trip: RoundTrip, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _trace_out(capsys, round_trip.ids["made"], str(round_trip.handlers_file))
    assert "1 point from 1 service," in out
    assert re.search(r"^svc-handlers POST:/call +200 +\+0\.000 ", out, re.M)


def test_trace_of_an_unknown_id_or_without_sources_is_one_line(
    round_trip: RoundTrip, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["trace", "1700000000,nobody", str(round_trip.api_file)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "no request or error point with request_id '1700000000,nobody'" in err
    assert main(["trace", GIVEN_OK]) == 2
    assert "give at least one SOURCE" in capsys.readouterr().err
    assert main(["trace", GIVEN_OK, str(round_trip.api_file) + ".missing"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_trace_from_clickhouse(
    round_trip: RoundTrip, clickhouse: ClickHouseServer, capsys: pytest.CaptureFixture[str]
) -> None:
    house = f"{clickhouse.url}/lunamon_trace"
    assert (
        main(["send", str(round_trip.handlers_file), "--clickhouse", house, "--no-progress"]) == 0
    )
    capsys.readouterr()
    out = _trace_out(
        capsys,
        GIVEN_FAILED,
        str(round_trip.api_file),
        "--clickhouse",
        house,
        "--influx",
        round_trip.influx_url,
    )
    statuses = re.findall(r"^ *svc-\S+ \S+ +(\d+)", out, re.M)
    assert statuses == ["502", "502", "500"]
    assert f"ClickHouse {clickhouse.url}/lunamon_trace (2 points)" in out  # request + error


# --------------------------------------------------------------------------- nesting


def _point(service: str, start_ms: float, took_ms: float, **fields: Any) -> Point:
    return Point(
        "request",
        1_700_000_000_000_000_000 + round(start_ms * 1e6),
        {"service": service, "route": "GET:/x", "status_code": "200"},
        {"request_id": "r1", "execution_time": took_ms / 1000, **fields},
    )


def test_spans_nest_by_time_siblings_stay_siblings() -> None:
    builder = TraceBuilder("r1")
    builder.add_points(
        [
            _point("a", 0, 100, b_time=0.09),
            _point("b1", 10, 30),  # two calls one after the other: siblings under a
            _point("c", 15, 5),  # inside b1
            _point("b2", 50, 40),
            _point("other", 0, 500, request_id="r2"),  # another request
            Point(
                "error",
                1_700_000_000_050_000_000,
                {"service": "b2", "route": "GET:/x", "status_code": "500", "error_code": "7"},
                {"request_id": "r1"},
            ),
            Point(
                "error",
                1_700_000_000_990_000_000,
                {"service": "z", "route": "GET:/y", "status_code": "503", "error_code": "9"},
                {"request_id": "r1"},
            ),
        ],
        "memory",
    )
    trace = builder.build()
    assert trace is not None
    assert [(span.service, depth) for span, depth in trace.walk()] == [
        ("a", 0),
        ("b1", 1),
        ("c", 2),
        ("b2", 1),
    ]
    b2 = trace.roots[0].children[1]
    assert b2.error_code == "7"
    assert [p.tags["service"] for p in trace.orphan_errors] == ["z"]
    assert trace.sources == {"memory": 6}
    text = format_trace(trace)
    assert "z GET:/y error point only: error_code 9" in text
    assert "5 points from 4 services" not in text  # the orphan error is not a service's point
    assert TraceBuilder("nothing").build() is None


def test_html_escapes_what_it_shows() -> None:
    builder = TraceBuilder("r1")
    builder.add_points([_point("<script>alert(1)</script>", 0, 1)], "a&b")
    trace = builder.build()
    assert trace is not None
    page = trace_html(trace)
    assert "<script>" not in page
    assert "&lt;script&gt;" in page
    assert "a&amp;b" in page


# --------------------------------------------------------------------------- HTML in a browser


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_trace_html_renders_in_headless_chromium(
    round_trip: RoundTrip, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    browser = _chromium()
    # `make test` installs Debian's chromium: its absence is a broken setup, not a skip.
    assert browser is not None, "chromium is not installed (Debian: apt-get install chromium)"
    page = tmp_path / "trace.html"
    out = _trace_out(
        capsys,
        GIVEN_FAILED,
        str(round_trip.api_file),
        str(round_trip.handlers_file),
        "--influx",
        round_trip.influx_url,
        "--html",
        str(page),
    )
    assert f"HTML trace: {page}" in out
    html = page.read_text()
    assert "<script" not in html
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", html)  # nothing fetched
    done = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1000,400",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert dom.count('<tr class="span">') == 3
    assert dom.count('<rect class="failed"') == 3
    assert len(re.findall(r'<tr class="error">', dom)) == 3
    assert "svc-faces" in dom
    assert "POST:/faces" in dom
