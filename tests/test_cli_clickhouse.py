"""``--clickhouse`` in ``lunamon demo | report | send``: the same demo data loaded into a file,
influxd and clickhouse-server gives the same report from all three."""

from __future__ import annotations

import json
import math
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from servers import ClickHouseServer, InfluxServer, free_port

from lunamon.cli import main
from lunamon.cli.clickhouse import (
    ClickHouseTarget,
    ClickHouseURLError,
    _point,
    parse_clickhouse_url,
    since_ns,
)
from lunamon.point import Point
from lunamon.sinks.clickhouse import ClickHouseSink

FAST = ["--latency", "0.001", "--no-progress", "--seed", "11"]
STATS_LINE = re.compile(r"^\s+(\S+): ([\d,]+) = ([\d,]+) \+ ([\d,]+) \+ ([\d,]+)  ok", re.M)


@pytest.fixture
def db() -> str:
    return f"cli_{uuid.uuid4().hex[:12]}"


def _same(a: object, b: object) -> bool:
    """Equal, floats to 1e-12 relative (InfluxDB's JSON round-trips float64 exactly)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-12)  # type: ignore[arg-type]
    return a == b


def _report(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["report", *args, "--json"]) == 0
    data: dict[str, Any] = json.loads(capsys.readouterr().out)
    del data["source"]
    return data


def test_the_same_demo_data_gives_the_same_report_from_file_influxdb_and_clickhouse(
    influxd: InfluxServer,
    clickhouse: ClickHouseServer,
    tmp_path: Path,
    db: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "demo.lp"
    assert main(["demo", "--requests", "300", "--out", str(path), *FAST]) == 0
    capsys.readouterr()
    assert main(["send", str(path), "--influx", f"{influxd.url}/{db}", "--no-progress"]) == 0
    house = f"{clickhouse.url}/{db}"
    assert main(["send", str(path), "--clickhouse", house, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"-> ClickHouse {clickhouse.url}/{db}" in out
    (row,) = [m.groups() for m in STATS_LINE.finditer(out) if m[1] == "clickhouse"]
    emitted, written, dropped, buffered = (int(g.replace(",", "")) for g in row[1:])
    assert (written, dropped, buffered) == (emitted, 0, 0)
    assert clickhouse.count(db, "request") == 300
    assert clickhouse.count(db, "request") + clickhouse.count(db, "error") == emitted

    from_file = _report(capsys, str(path))
    from_influx = _report(capsys, "--influx", influxd.url, "--database", db, "--since", "1h")
    from_clickhouse = _report(capsys, "--clickhouse", clickhouse.url, "--database", db)
    assert from_file["requests"] == 300
    assert from_file["errors"] > 0
    # ClickHouse 18.16's JSON float parser is off by an ulp for about 1 value in 500 (37 of
    # 20,000 random doubles below 0.01 read back differently, 51 of 20,000 whole-ns ones):
    # sums and means agree to 1e-12, counts exactly.
    assert _same(from_clickhouse, from_file)
    assert [r["requests"] for r in from_clickhouse["routes"]] == [
        r["requests"] for r in from_file["routes"]
    ]
    assert _same(from_influx, from_file)
    # The database as the URL's path, and --since, read the same rows.
    assert _report(capsys, "--clickhouse", house, "--since", "2h") == from_clickhouse


def test_demo_straight_into_clickhouse(
    clickhouse: ClickHouseServer, db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"{clickhouse.url}/{db}"
    assert main(["demo", "--requests", "120", "--clickhouse", url, *FAST]) == 0
    out = capsys.readouterr().out
    assert f"-> ClickHouse {url}" in out
    stats = {m[1]: m.groups()[1:] for m in STATS_LINE.finditer(out)}
    emitted = int(stats["clickhouse"][0].replace(",", ""))
    assert clickhouse.count(db, "request") == 120
    assert clickhouse.count(db, "request") + clickhouse.count(db, "error") == emitted
    assert "120 requests" in out


def test_report_from_an_unreachable_clickhouse(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["report", "--clickhouse", url]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"lunamon report: error: cannot reach ClickHouse at {url}: ")


def test_report_from_a_missing_database(
    clickhouse: ClickHouseServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", "--clickhouse", f"{clickhouse.url}/no_such_db"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "database 'no_such_db' does not exist" in err


def test_report_with_a_wrong_password_tells_why_without_it(
    clickhouse_auth: ClickHouseServer, capsys: pytest.CaptureFixture[str]
) -> None:
    url = clickhouse_auth.url.replace("://", "://default:Wr0ng-s3cret-pw@")
    assert main(["report", "--clickhouse", url]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "HTTP 401 Code 193 wrong password" in err
    assert "Wr0ng-s3cret-pw" not in err


def test_send_with_the_right_password(
    clickhouse_auth: ClickHouseServer, tmp_path: Path, db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "one.lp"
    point = Point("request", 1, {"route": "POST:/x", "status_code": "200"}, {"execution_time": 1.0})
    path.write_text(point.to_line_protocol() + "\n")
    url = clickhouse_auth.url.replace("://", f"://default:{clickhouse_auth.password}@")
    assert main(["send", str(path), "--clickhouse", f"{url}/{db}", "--no-progress"]) == 0
    assert clickhouse_auth.password not in capsys.readouterr().out
    assert clickhouse_auth.data(db, "request") == [
        (1, {"route": "POST:/x", "status_code": 200, "execution_time": 1.0})
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--clickhouse", "http://127.0.0.1:1", "--influx", "http://127.0.0.1:1/d"], "give either"),
        (["x.lp", "--clickhouse", "http://127.0.0.1:1"], "give either"),
        (["--clickhouse", "http://127.0.0.1:1", "--since", "soon"], "--since"),
        (["--clickhouse", "ftp://127.0.0.1:1"], "expected http://host:8123"),
        (["--clickhouse", "http://u:s3cret-x@ch.example/db"], "over plain HTTP; use https://"),
    ],
)
def test_usage_errors(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert message in err
    assert "s3cret-x" not in err


def test_send_needs_one_destination(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["send", "x.lp"])
    assert caught.value.code == 2
    assert "--influx" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("url", "database", "expected"),
    [
        ("http://127.0.0.1:8123", None, ("http://127.0.0.1:8123", "luna_monitoring", None, None)),
        ("http://localhost/luna", None, ("http://localhost:8123", "luna", None, None)),
        ("https://ch.example", "y", ("https://ch.example:8443", "y", None, None)),
        ("https://ch.example/y", "y", ("https://ch.example:8443", "y", None, None)),
        ("http://u:p%40ss@[::1]:9/d", None, ("http://[::1]:9", "d", "u", "p@ss")),
    ],
)
def test_clickhouse_urls(url: str, database: str | None, expected: tuple[object, ...]) -> None:
    target = parse_clickhouse_url(url, database)
    assert (target.url, target.database, target.username, target.password) == expected
    assert "p@ss" not in repr(target)
    assert "p@ss" not in str(target)


@pytest.mark.parametrize("url", ["http://h/a/b", "http://h:x", "http://h/?q=1", "http://"])
def test_bad_clickhouse_urls(url: str) -> None:
    with pytest.raises(ClickHouseURLError):
        parse_clickhouse_url(url)


def test_the_url_path_names_the_database_as_for_the_sink() -> None:
    """One rule for `lunamon send --clickhouse` and the sink: the path is the database,
    and a database option naming another one is refused, never silently preferred."""
    with pytest.raises(ClickHouseURLError, match="names database 'x' and database is 'y'"):
        parse_clickhouse_url("http://h/x", "y")
    sink = ClickHouseSink("http://127.0.0.1:8123/mydb")
    assert (sink.database, sink.url) == ("mydb", "http://127.0.0.1:8123")
    assert ClickHouseSink("http://127.0.0.1:8123/").database == "luna_monitoring"
    assert ClickHouseSink("http://127.0.0.1:8123", database="d").database == "d"
    assert ClickHouseSink("http://127.0.0.1:8123/d", database="d").database == "d"
    with pytest.raises(ValueError, match="names database 'mydb' and database is 'other'"):
        ClickHouseSink("http://127.0.0.1:8123/mydb", database="other")
    with pytest.raises(ValueError, match="just the database name"):
        ClickHouseSink("http://127.0.0.1:8123/a/b")


def test_since() -> None:
    now = 10**18
    assert since_ns("1h", now) == now - 3600 * 10**9
    assert since_ns("1h30m", now) == now - 5400 * 10**9
    assert since_ns("250ms", now) == now - 250 * 10**6
    with pytest.raises(ValueError, match="not a duration"):
        since_ns("yesterday", now)


def test_rows_become_points_by_the_documented_rule() -> None:
    data = {
        "service": "s",
        "route": "POST:/x",
        "status_code": 201,
        "error_code": 1,
        "request_id": "1536751345,6a5c",
        "execution_time": 1,
        "match_policy_time": 0.5,
        "ratio": 0.25,
        "cached": True,
        "nested": {"a": 1},
    }
    point = _point("request", {"t": "17", "data": json.dumps(data)})
    assert point.time_ns == 17
    assert dict(point.tags) == {
        "service": "s",
        "route": "POST:/x",
        "status_code": "201",
        "error_code": "1",
    }
    assert dict(point.fields) == {
        "request_id": "1536751345,6a5c",
        "execution_time": 1.0,
        "match_policy_time": 0.5,
        "ratio": 0.25,
        "cached": True,
    }
    assert type(point.fields["execution_time"]) is float


def test_target_sink_takes_the_credentials() -> None:
    target = ClickHouseTarget("https://ch.example:8443", "db", "luna", "s3cret-pw")
    sink = target.sink(timeout=3.0)
    assert (sink.url, sink.database, sink.username, sink.timeout) == (
        "https://ch.example:8443",
        "db",
        "luna",
        3.0,
    )
    assert "s3cret-pw" not in repr(target)


def test_sending_the_same_file_twice_stores_each_point_once(
    clickhouse: ClickHouseServer, tmp_path: Path, db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """RELIABILITY.md 37: the second send finds every point in the tables and sends none;
    a file that overlaps the first (half old, half new) adds the new half only."""
    tags = {"route": "POST:/x", "status_code": "200"}
    points = [
        Point(series, 1_700_000_000_000_000_000 + i, tags, {"request_id": f"r{i}"})
        for i in range(700)
        for series in ("request", "error")
    ]
    first, overlap = tmp_path / "first.lp", tmp_path / "overlap.lp"
    first.write_text("".join(p.to_line_protocol() + "\n" for p in points[:1000]))
    overlap.write_text("".join(p.to_line_protocol() + "\n" for p in points[500:]))
    url = f"{clickhouse.url}/{db}"
    for path in (first, first, overlap):
        args = ["send", str(path), "--clickhouse", url, "--no-progress", "--batch-size", "300"]
        assert main(args) == 0
        out = capsys.readouterr().out
        (row,) = [m.groups() for m in STATS_LINE.finditer(out) if m[1] == "clickhouse"]
        emitted, written, dropped, buffered = (int(g.replace(",", "")) for g in row[1:])
        assert (written, dropped, buffered) == (emitted, 0, 0)  # held: counted written
    for series in ("request", "error"):
        times = [int(t) for t in clickhouse.query(f"SELECT time FROM {db}.{series}").split()]
        assert sorted(times) == [1_700_000_000_000_000_000 + i for i in range(700)]
