"""``lunamon send``: a line-protocol file into InfluxDB through lunamon's flusher."""

from __future__ import annotations

import asyncio
import io
import itertools
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from servers import (
    ADMIN_PASSWORD,
    ADMIN_USER,
    FakeInfluxServer,
    FakeResponse,
    InfluxServer,
    free_port,
)

from lunamon.cli import main
from lunamon.cli.influxql import parse_influx_url
from lunamon.cli.send import deliver, send_points
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
    # More than a batch and a run wait in the flusher (batches of 500, 3 in flight per
    # connection): the backlog is packed where it can be, the forwarded lines kept whole.
    db = "lunamon_cli_send"
    path = tmp_path / "points.lp"
    path.write_bytes(encode_lines(make_points(12_345)))
    url = f"{influxd.url}/{db}"
    assert main(["send", str(path), "--influx", url, "--batch-size", "500", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "12,345 points from" in out
    assert "influxdb: 12,345 = 12,345 + 0 + 0  ok; retries 0" in out
    rows = influxd.rows('SELECT count("execution_time") FROM "request"', db)
    assert rows[0]["count"] == 12_345
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
        ("https://db.example:443", "y", ("db.example", 443, "y", True, None, None)),
        ("https://db.example:443/y", "y", ("db.example", 443, "y", True, None, None)),
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


# --------------------------------------------------------------------------- streaming


class RecordingSink:
    """Keeps every batch, and how far the reader had gone when it was written."""

    name = "recording"

    def __init__(self, produced: list[int], written: list[int]) -> None:
        self.produced = produced
        self.written = written  # by every sink of the delivery
        self.batches: list[list[Point]] = []
        self.ahead: list[int] = []  # points read but not yet written, at each write

    async def start(self) -> None:
        pass

    async def write(self, points: Sequence[Point]) -> None:
        self.ahead.append(self.produced[0] - self.written[0])
        self.written[0] += len(points)
        self.batches.append(list(points))

    async def close(self) -> None:
        pass


@pytest.mark.parametrize("connections", [1, 2])
async def test_deliver_batches_while_reading(connections: int) -> None:
    """10,007 points, batches of 1,000: every point once and in order, the last short batch
    too; the reader is held back to a window of batches instead of running ahead. Two
    connections get the batches in turn, their stats added up."""
    points = make_points(10_007)
    produced = [0]

    def lazily() -> Iterator[Point]:
        for point in points:
            produced[0] += 1
            yield point

    written = [0]
    sinks = [RecordingSink(produced, written) for _ in range(connections)]
    progress: list[int] = []
    stats = await deliver(lazily(), sinks, batch_size=1000, window=3, on_progress=progress.append)
    batches = [b for pair in itertools.zip_longest(*(s.batches for s in sinks)) for b in pair if b]
    assert [len(b) for b in batches] == [1000] * 10 + [7]
    assert [p for b in batches for p in b] == points
    assert [len(s.batches) for s in sinks] == ([11] if connections == 1 else [6, 5])
    ahead = max(a for s in sinks for a in s.ahead)
    assert ahead <= connections * 3 * 1000 + 1000
    (total,) = stats.values()
    assert total["emitted"] == total["written"] == 10_007
    assert sum(total["dropped"].values()) == total["buffered"] == 0
    assert progress[-1] == 10_007
    assert progress == sorted(progress)


def influx_answers(fake: FakeInfluxServer) -> None:
    """The ping, then CREATE DATABASE of each of send's two connections."""
    created = FakeResponse(200, '{"results":[{"statement_id":0}]}')
    fake.program(FakeResponse(204), created, created)


def written_lines(fake: FakeInfluxServer) -> list[str]:
    return [
        line
        for r in fake.requests
        if r.path == "/write"
        for line in r.body.decode().split("\n")
        if line
    ]


async def test_send_forwards_lines_as_read_and_encodes_the_others(
    fake_influx: FakeInfluxServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The lines of the fast path go out byte for byte (a CR of CRLF dropped), the rest as
    lunamon encodes the exact parser's point; 11 lines in batches of 5 lose none."""
    shaped = encode_lines(make_points(8)).decode().splitlines()
    odd = ["ints,t=1 n=3i,ok=t 1700000000000000009", "esc\\ aped f=1.50 1700000000000000010"]
    text = "\r\n".join(shaped[:4]) + "\r\n# comment\n" + "\n".join([*shaped[4:], *odd]) + "\n"
    path = tmp_path / "mixed.lp"
    path.write_text(text, newline="")
    influx_answers(fake_influx)
    argv = ["send", str(path), "--influx", f"{fake_influx.url}/db", "--batch-size", "5"]
    assert await asyncio.to_thread(main, [*argv, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "10 points from" in out
    assert "influxdb: 10 = 10 + 0 + 0  ok" in out
    expected = [*shaped, *(p.to_line_protocol() for p in parse_line_protocol("\n".join(odd)))]
    assert written_lines(fake_influx) == expected
    writes = [r for r in fake_influx.requests if r.path == "/write"]
    assert [r.body.count(b"\n") for r in writes] == [5, 5]


async def test_send_stops_at_a_bad_line_after_writing_those_before(
    fake_influx: FakeInfluxServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = encode_lines(make_points(30)).decode().splitlines()
    lines[12] = "request,route=x status_code="  # line 13
    path = tmp_path / "bad-later.lp"
    path.write_text("\n".join(lines) + "\n")
    influx_answers(fake_influx)
    argv = ["send", str(path), "--influx", f"{fake_influx.url}/db", "--batch-size", "5"]
    assert await asyncio.to_thread(main, [*argv, "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1
    assert captured.err.startswith(f"lunamon send: error: {path}: line 13: ")
    assert "the 12 points before it were written" in captured.err
    assert "influxdb: 12 = 12 + 0 + 0  ok" in captured.out
    assert written_lines(fake_influx) == lines[:12]


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_send_progress_bar_only_on_a_terminal_stderr(
    fake_influx: FakeInfluxServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "points.lp"
    path.write_bytes(encode_lines(make_points(50)))
    influx_answers(fake_influx)
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    argv = ["send", str(path), "--influx", f"{fake_influx.url}/db", "--batch-size", "20"]
    assert await asyncio.to_thread(main, argv) == 0
    out = capsys.readouterr().out
    assert "sending" in terminal.getvalue()
    assert "sending" not in out
    assert "\x1b[" not in out
    assert "influxdb: 50 = 50 + 0 + 0  ok" in out
    assert len(written_lines(fake_influx)) == 50


def test_credentials_from_the_environment_or_a_file_not_the_url(
    influxd_auth: InfluxServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As influx and clickhouse-client users expect: credentials out of the URL (and `ps`)."""
    user, password = ADMIN_USER, ADMIN_PASSWORD
    path = tmp_path / "points.lp"
    path.write_bytes(encode_lines(make_points(10)))
    url = f"{influxd_auth.url}/lunamon_cli_credentials"
    monkeypatch.delenv("INFLUX_USERNAME", raising=False)
    monkeypatch.delenv("INFLUX_PASSWORD", raising=False)
    assert main(["send", str(path), "--influx", url, "--no-progress", "--max-retries", "0"]) == 1
    assert "10 of 10 points were not written" in capsys.readouterr().err  # 401
    monkeypatch.setenv("INFLUX_USERNAME", user)
    monkeypatch.setenv("INFLUX_PASSWORD", password)
    assert main(["send", str(path), "--influx", url, "--no-progress"]) == 0
    monkeypatch.setenv("INFLUX_PASSWORD", "wrong")
    secret = tmp_path / "password"
    secret.write_text(f"{password}\n")
    args = ["send", str(path), "--influx", url, "--no-progress", "--password-file", str(secret)]
    assert main(args) == 0  # the file wins over the variable
    rows = influxd_auth.rows(
        'SELECT count("execution_time") FROM "request"', "lunamon_cli_credentials"
    )
    assert rows[0]["count"] == 10  # the same points twice: stored once
    out = capsys.readouterr()
    assert password not in out.out + out.err
    url_with = f"http://{user}:{password}@{url.split('://', 1)[1]}"
    assert main(["send", str(path), "--influx", url_with, "--password-file", str(secret)]) == 2
    assert "give one of them" in capsys.readouterr().err


def test_clickhouse_credentials_from_the_environment_default_to_the_default_user(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lunamon.cli import _clickhouse_target

    monkeypatch.delenv("CLICKHOUSE_USER", raising=False)
    monkeypatch.setenv("CLICKHOUSE_PASSWORD", "pw-from-env")
    target = _clickhouse_target("http://127.0.0.1:8123/db")
    assert (target.username, target.password) == ("default", "pw-from-env")
    monkeypatch.setenv("CLICKHOUSE_USER", "luna")
    target = _clickhouse_target("http://127.0.0.1:8123/db")
    assert (target.username, target.password) == ("luna", "pw-from-env")
    target = _clickhouse_target("http://u:p@127.0.0.1:8123/db")  # the URL's win
    assert (target.username, target.password) == ("u", "p")
