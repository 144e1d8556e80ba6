"""``lunamon send``: a line-protocol file into InfluxDB through lunamon's flusher."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from servers import FakeInfluxServer, FakeResponse, InfluxServer, free_port

from lunamon.cli import main
from lunamon.cli.influxql import parse_influx_url
from lunamon.cli.send import send_points
from lunamon.lineprotocol import parse_line_protocol
from lunamon.point import Point, encode_lines


def make_points(count: int) -> list[Point]:
    start = time.time_ns() - 10**9 * 60
    points = []
    for k in range(count):
        tags = {"service": "luna-handlers", "route": "POST:/detector", "status_code": "201"}
        fields = {"request_id": f"send-{k}", "execution_time": 0.001 * (k % 17 + 1)}
        points.append(Point("request", start + k * 1000, tags, fields))
    return points


def test_send_file_into_influxdb(
    influxd: InfluxServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = "lunamon_cli_send"
    path = tmp_path / "points.lp"
    path.write_bytes(encode_lines(make_points(1234)))
    url = f"{influxd.url}/{db}"
    assert main(["send", str(path), "--influx", url, "--batch-size", "500", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "1,234 points from" in out
    assert "influxdb: 1,234 = 1,234 + 0 + 0  ok; retries 0" in out
    rows = influxd.rows('SELECT count("execution_time") FROM "request"', db)
    assert rows[0]["count"] == 1234
    stored = influxd.rows('SELECT "request_id", "execution_time" FROM "request"', db)
    sent = {
        p.fields["request_id"]: p.fields["execution_time"]
        for p in parse_line_protocol(path.read_text())
    }
    assert {r["request_id"]: r["execution_time"] for r in stored} == sent


async def test_send_retries_like_the_flusher(fake_influx: FakeInfluxServer) -> None:
    """A 503 with Retry-After is retried (and counted); every point arrives once."""
    fake_influx.program(
        FakeResponse(204),  # GET /ping
        FakeResponse(200, '{"results":[{"statement_id":0}]}'),  # CREATE DATABASE
        FakeResponse(503, '{"error":"overloaded"}', {"Retry-After": "0"}),
    )
    points = make_points(10)
    target = parse_influx_url(f"{fake_influx.url}/db")
    progress: list[int] = []
    stats = await send_points(points, target, batch_size=4, on_progress=progress.append)
    (influx,) = stats.values()
    assert influx["written"] == 10
    assert influx["retries"] == 1
    assert sum(influx["dropped"].values()) == 0
    assert influx["buffered"] == 0
    writes = [r for r in fake_influx.requests if r.path == "/write"]
    assert [r.query["db"] for r in writes] == ["db"] * len(writes)
    assert len(writes) == 4  # 3 batches, the first one twice
    assert writes[0].body == writes[1].body
    delivered = b"".join(r.body for r in writes[1:])
    assert delivered == encode_lines(points)
    assert progress[-1] == 10


async def test_send_rejected_batch_is_counted_and_fails(fake_influx: FakeInfluxServer) -> None:
    fake_influx.program(
        FakeResponse(204),
        FakeResponse(200, '{"results":[{"statement_id":0}]}'),
        FakeResponse(400, '{"error":"partial write: field type conflict"}'),
    )
    stats = await send_points(
        make_points(6), parse_influx_url(f"{fake_influx.url}/db"), batch_size=3
    )
    (influx,) = stats.values()
    assert influx["written"] == 3
    assert influx["dropped"]["rejected"] == 3
    assert influx["retries"] == 0


def test_send_to_an_unreachable_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "points.lp"
    path.write_bytes(encode_lines(make_points(3)))
    code = main(["send", str(path), "--influx", f"http://127.0.0.1:{free_port()}/db"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1
    assert "cannot reach InfluxDB" in err


def test_send_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.lp"
    path.write_text("request,route=x status_code=")
    assert main(["send", str(path), "--influx", "http://127.0.0.1:1/db"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"lunamon send: error: {path}: line 1")


@pytest.mark.parametrize(
    ("url", "database", "expected"),
    [
        ("http://127.0.0.1:8086/luna", None, ("127.0.0.1", 8086, "luna", False, None, None)),
        ("http://localhost/luna", None, ("localhost", 8086, "luna", False, None, None)),
        ("https://db.example:443/x", "y", ("db.example", 443, "y", True, None, None)),
        ("http://u:p%40ss@127.0.0.1:1/d", None, ("127.0.0.1", 1, "d", False, "u", "p@ss")),
    ],
)
def test_influx_urls(url: str, database: str | None, expected: tuple[object, ...]) -> None:
    target = parse_influx_url(url, database)
    got = (target.host, target.port, target.database, target.ssl)
    assert (*got, target.username, target.password) == expected
    assert "p@ss" not in repr(target)
    assert "p@ss" not in str(target)


def test_credentials_over_plain_http_to_a_remote_host_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "points.lp"
    path.write_bytes(encode_lines(make_points(1)))
    url = "http://user:s3cret@influx.example:8086/db"
    assert main(["send", str(path), "--influx", url]) == 2
    err = capsys.readouterr().err
    assert "over plain HTTP; use https://" in err
    assert "s3cret" not in err
