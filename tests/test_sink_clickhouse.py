"""ClickHouseSink against a real clickhouse-server 18.16: LUNA's row format, exact delivery
through ``lunamon.setup``, a server killed mid-run, credentials, bad input read back, and
the classification of ClickHouse's real error answers."""

from __future__ import annotations

import asyncio
import enum
import json
import math
import re
import socket
import struct
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from _rel_support import (
    SEED_PATHS,
    Answer,
    ClientFactory,
    assert_invariant,
    drive,
    eventually,
    fast_policy,
)
from servers import ClickHouseServer, FakeInfluxServer, FakeResponse, free_port
from structlog.testing import capture_logs
from yarl import URL

import lunamon
from lunamon import MONITORING_KEY, Monitoring, MonitoringSettings, Point
from lunamon.demo.service import create_app
from lunamon.errors import BatchTooLarge, SinkError
from lunamon.point import FieldValue
from lunamon.sinks.clickhouse import (
    ClickHouseSink,
    _time_column,
    _TimeColumn,
    classify_clickhouse_response,
    encode_rows,
    exception_code,
    row_data,
)
from lunamon.sinks.registry import create_sink

T0 = 1_700_000_000_123_456_789  # ns precision must survive
FAILING_PATHS = ("/detector?fail=400", "/extractor?fail=500", "/extractor/upgrade?fail=http")
_INTEGER = re.compile(r"0|-?[1-9][0-9]{0,18}")


@pytest.fixture
def db() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def sink_for(
    clickhouse: ClickHouseServer,
) -> AsyncIterator[Callable[..., ClickHouseSink]]:
    """Make ClickHouseSinks (default: the plain server); all are closed after the test."""
    made: list[ClickHouseSink] = []

    def make(
        database: str, server: ClickHouseServer = clickhouse, **options: Any
    ) -> ClickHouseSink:
        options.setdefault("timeout", 5.0)
        sink = ClickHouseSink(server.url, database, **options)
        made.append(sink)
        return sink

    yield make
    for sink in made:
        await sink.close()


def expected_data(point: Point) -> dict[str, Any]:
    """The ``data`` object DESIGN.md §4 asks for, built independently of the sink's code."""
    data: dict[str, Any] = {}
    for key, value in point.tags.items():
        number = int(value) if _INTEGER.fullmatch(value) else None
        in_range = number is not None and -(2**63) <= number < 2**63
        data[key] = number if in_range else value
    data.update(point.fields)
    return data


def typed(data: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """Values with their JSON types (1 == 1.0 == True in Python)."""
    return {key: (type(value).__name__, value) for key, value in data.items()}


async def stored(server: ClickHouseServer, db: str, table: str) -> list[tuple[int, dict[str, Any]]]:
    """``server.data`` in a worker thread: the event loop keeps serving and flushing."""
    return await asyncio.to_thread(server.data, db, table)


async def stored_ids(server: ClickHouseServer, db: str, table: str = "request") -> list[str]:
    return [str(data["request_id"]) for _, data in await stored(server, db, table)]


def stats_of(monitoring: Monitoring, name: str = "clickhouse") -> dict[str, Any]:
    stats = monitoring.stats()
    assert_invariant(stats)
    return dict(stats[name])


def seed_points() -> list[Point]:
    tags = {"service": "luna-events", "route": "POST:/events", "status_code": "204"}
    request = Point("request", T0, tags, {"request_id": "1536751345,6a5c", "execution_time": 1.0})
    error_tags = {**tags, "status_code": "500", "error_code": "1"}
    error = Point("error", T0, error_tags, {"request_id": "1536751345,6a5c"})
    return [request, error]


# --------------------------------------------------------------------------- format


async def test_rows_are_lunas_time_and_data(
    clickhouse: ClickHouseServer,
    sink_for: Callable[..., ClickHouseSink],
    db: str,
    row_path: str,
) -> None:
    sink = sink_for(db)
    await sink.start()
    request, error = seed_points()
    await sink.write([request, error])
    assert await stored(clickhouse, db, "request") == [
        (
            T0,
            {
                "service": "luna-events",
                "route": "POST:/events",
                "status_code": 204,
                "request_id": "1536751345,6a5c",
                "execution_time": 1.0,
            },
        )
    ]
    ((time_ns, data),) = await stored(clickhouse, db, "error")
    assert time_ns == T0
    assert typed(data) == typed(expected_data(error))
    assert data["error_code"] == 1
    # The exact text: compact, execution_time a float even when whole.
    (row,) = clickhouse.rows(f"SELECT data FROM {db}.request")
    assert row["data"] == (
        '{"service":"luna-events","route":"POST:/events","status_code":204,'
        '"request_id":"1536751345,6a5c","execution_time":1.0}'
    )
    schema = clickhouse.query(f"SHOW CREATE TABLE {db}.request")
    assert "time Int64" in schema
    assert "data String" in schema
    assert "MergeTree" in schema


def test_tag_values_that_are_decimal_integers_become_numbers() -> None:
    tags = {
        "status_code": "204",
        "error_code": "0",
        "negative": "-3",
        "int64_max": "9223372036854775807",
        "beyond_int64": "9223372036854775808",
        "leading_zero": "007",
        "minus_zero": "-0",
        "plus": "+3",
        "float": "1.5",
        "exponent": "1e3",
        "spaced": " 1",
        "arabic_digits": "٣",
        "uuid": "3fa85f64-5717-4562-b3fc-2c963f66afa6",
    }
    data = row_data(Point("request", T0, tags, {"f": 1.0}))
    assert data == {
        "status_code": 204,
        "error_code": 0,
        "negative": -3,
        "int64_max": 9223372036854775807,
        "beyond_int64": "9223372036854775808",
        "leading_zero": "007",
        "minus_zero": "-0",
        "plus": "+3",
        "float": "1.5",
        "exponent": "1e3",
        "spaced": " 1",
        "arabic_digits": "٣",
        "uuid": "3fa85f64-5717-4562-b3fc-2c963f66afa6",
        "f": 1.0,
    }
    assert data == expected_data(Point("request", T0, tags, {"f": 1.0}))


def test_int64_bounds_exactly_are_numbers_one_beyond_are_strings(row_path: str) -> None:
    """The audit's planted bug: int64's minimum itself is a number, as its maximum is."""
    tags = {
        "low": "-9223372036854775808",
        "below": "-9223372036854775809",
        "high": "9223372036854775807",
        "above": "9223372036854775808",
    }
    point = Point("request", T0, tags, {"f": 1.5})
    expected = {
        "low": -9223372036854775808,
        "below": "-9223372036854775809",
        "high": 9223372036854775807,
        "above": "9223372036854775808",
        "f": 1.5,
    }
    assert typed(row_data(point)) == typed(expected)
    (line,) = encode_rows([point]).decode().splitlines()
    text = json.loads(line)["data"]
    assert '"low":-9223372036854775808,' in text
    assert typed(json.loads(text)) == typed(expected)


def test_a_field_wins_over_a_tag_of_the_same_key(row_path: str) -> None:
    point = Point("request", T0, {"k": "tag", "t": "1"}, {"k": "field"})
    assert row_data(point) == {"k": "field", "t": 1}
    (line,) = encode_rows([point]).decode().splitlines()
    assert json.loads(line)["data"] == '{"k":"field","t":1}'


def test_field_types_in_data(row_path: str) -> None:
    class Level(enum.IntEnum):
        HIGH = 3

    fields: dict[str, FieldValue] = {
        "f": 1.0,
        "small": 1e-05,
        "i": -7,
        "b": True,
        "s": "x",
        "level": Level.HIGH,
    }
    point = Point.trusted("request", T0, {}, {**fields, "nan": math.nan, "inf": -math.inf})
    (line,) = encode_rows([point]).decode().splitlines()
    data = json.loads(json.loads(line)["data"])
    assert typed(data) == typed({**fields, "level": 3})  # nan/inf have no JSON: omitted
    assert json.loads(line)["data"] == '{"f":1.0,"small":1e-05,"i":-7,"b":true,"s":"x","level":3}'
    # Without them, orjson writes the row; its only difference is a float's spelling.
    (line,) = encode_rows([Point("request", T0, {}, fields)]).decode().splitlines()
    small = "0.00001" if row_path == "orjson" else "1e-05"
    assert json.loads(line)["data"] == (
        '{"f":1.0,"small":' + small + ',"i":-7,"b":true,"s":"x","level":3}'
    )


def test_time_column_encodings() -> None:
    assert _time_column("Int64") == _TimeColumn(None)
    assert _time_column("UInt64") == _TimeColumn(None)
    assert _time_column("DateTime64(9, 'UTC')") == _TimeColumn(9)
    assert _time_column("DateTime64(3)") == _TimeColumn(3)
    assert _time_column("DateTime") == _TimeColumn(0)
    assert _time_column("DateTime('Europe/Moscow')") == _TimeColumn(0)
    assert _TimeColumn(None).encode(T0) == str(T0)
    assert _TimeColumn(9).encode(T0) == '"1700000000.123456789"'
    assert _TimeColumn(3).encode(T0) == '"1700000000.123"'
    assert _TimeColumn(0).encode(T0) == '"1700000000"'
    assert _TimeColumn(9).encode(1_000_000_007) == '"1.000000007"'


async def test_an_existing_datetime_table_gets_seconds(
    clickhouse: ClickHouseServer, sink_for: Callable[..., ClickHouseSink], db: str
) -> None:
    """Tables that exist are used as they are: their time column's type decides."""
    clickhouse.query(f"CREATE DATABASE {db}")
    clickhouse.query(
        f"CREATE TABLE {db}.request (time DateTime, data String) ENGINE = MergeTree() ORDER BY time"
    )
    clickhouse.query(
        f"CREATE TABLE {db}.error (time UInt64, data String) ENGINE = MergeTree() ORDER BY time"
    )
    sink = sink_for(db)
    await sink.start()
    await sink.write(seed_points())
    rows = clickhouse.rows(f"SELECT toUInt32(time) AS s, data FROM {db}.request")
    assert [int(row["s"]) for row in rows] == [T0 // 10**9]
    assert [t for t, _ in clickhouse.data(db, "error")] == [T0]


async def test_gzip_off_and_other_series_get_their_own_tables(
    clickhouse: ClickHouseServer, sink_for: Callable[..., ClickHouseSink], db: str
) -> None:
    sink = sink_for(db, gzip=False)
    await sink.write([Point("cpu", T0, {"host": "a"}, {"usage": 0.5}), *seed_points()])
    assert clickhouse.data(db, "cpu") == [(T0, {"host": "a", "usage": 0.5})]
    assert clickhouse.count(db, "request") == clickhouse.count(db, "error") == 1


# --------------------------------------------------------------------------- bad input


def bad_input_points() -> list[Point]:
    specials = [
        '"',
        "'",
        "\\",
        "\\\\",
        'a"b\\c',
        "trailing \\",
        "\\u0041 is not A",
        "ü€😀 日本",
        "\t\x01\x1f\x7f",
        "`backquote`",
        "</script>",
        '{"k":1}',
        "Code: 62, e.displayText()",
    ]
    points = []
    for index, text in enumerate(specials):
        tags = {"case": str(index), "route": f"POST:/x{text}y", f"k{text}x": "v"}
        fields: dict[str, object] = {
            "s": text,
            "multi": f"line1\n{text}\r\nline3\x00end",
            f"f{text}x": 1.5,
            "execution_time": 0.25,
        }
        points.append(Point("request", T0 + index, tags, fields))
    # Series with specials are tables of their own (backquoted).
    points.append(Point("esc`table\\x y", T0, {"t": "a'b"}, {"v": 1}))
    # Tags built by code (Point.trusted) may hold what Point() would sanitise.
    points.append(Point.trusted("request", T0 + 100, {"nl": "a\nb\rc"}, {"s": "x"}))
    # A lone surrogate cannot be UTF-8: written with \u escapes, read back the same.
    points.append(Point("request", T0 + 101, {"case": "surrogate"}, {"s": "bad \udc80 end"}))
    return points


async def test_bad_input_comes_back_exactly(
    clickhouse: ClickHouseServer,
    sink_for: Callable[..., ClickHouseSink],
    db: str,
    row_path: str,
) -> None:
    points = bad_input_points()
    sink = sink_for(db)
    await sink.write(points)
    for table in ("request", "esc`table\\x y"):
        quoted = "`" + table.replace("\\", "\\\\").replace("`", "\\`") + "`"
        rows = clickhouse.rows(f"SELECT time, data FROM {db}.{quoted} ORDER BY time")
        written = [p for p in points if p.series == table]
        assert [int(row["time"]) for row in rows] == [p.time_ns for p in written]
        for row, point in zip(rows, written, strict=True):
            assert typed(json.loads(row["data"])) == typed(expected_data(point)), point


async def test_visit_param_functions_read_the_data_column(
    clickhouse: ClickHouseServer,
    sink_for: Callable[..., ClickHouseSink],
    db: str,
    row_path: str,
) -> None:
    """The README's 18.16 queries: compact JSON is what visitParamExtract* need."""
    points = [
        Point(
            "request",
            T0 + k,
            {"service": "s", "route": f"POST:/r{k % 2}", "status_code": str(200 + k % 3)},
            {"request_id": f"id-{k}", "execution_time": (k + 1) / 1000},
        )
        for k in range(10)
    ]
    sink = sink_for(db)
    await sink.write(points)
    rows = clickhouse.rows(
        "SELECT visitParamExtractString(data, 'route') AS route, count() AS n,"
        " max(visitParamExtractFloat(data, 'execution_time')) AS slowest,"
        " countIf(visitParamExtractInt(data, 'status_code') = 200) AS ok"
        f" FROM {db}.request GROUP BY route ORDER BY route"
    )
    assert [(r["route"], int(r["n"]), r["slowest"], int(r["ok"])) for r in rows] == [
        ("POST:/r0", 5, 0.009, 2),
        ("POST:/r1", 5, 0.01, 2),
    ]


def test_every_row_is_one_line_of_json(row_path: str) -> None:
    points = bad_input_points()
    body = encode_rows(points)
    lines = body.decode("utf-8").split("\n")
    assert lines[-1] == ""
    assert len(lines) - 1 == len(points)
    for line, point in zip(lines, points, strict=False):
        row = json.loads(line)
        assert row["time"] == point.time_ns
        assert json.loads(row["data"]) == expected_data(point)


# --------------------------------------------------------------------------- delivery


async def test_exact_delivery_through_setup(
    aiohttp_client: ClientFactory, clickhouse: ClickHouseServer, db: str
) -> None:
    """Every request id once in ``request``, every failed one once in ``error``."""
    sink = ClickHouseSink(clickhouse.url, db, timeout=5.0)
    app = create_app(sinks=[sink], **fast_policy(batch_size=37))
    monitoring = app[MONITORING_KEY]
    client = await aiohttp_client(app)
    answers = await drive(client, 150, paths=SEED_PATHS + FAILING_PATHS, monitoring=monitoring)
    await monitoring.flush()
    await eventually(lambda: stats_of(monitoring)["buffered"] == 0, what="all written")
    await client.close()  # drains and closes the monitoring
    stats = stats_of(monitoring)
    failed = [a for a in answers if a.status >= 400]
    assert len(failed) == sum("fail=" in a.path for a in answers) > 0
    assert stats["written"] == stats["emitted"] == len(answers) + len(failed)
    assert sum(stats["dropped"].values()) == 0
    assert sorted(await stored_ids(clickhouse, db)) == sorted(a.request_id for a in answers)
    assert sorted(await stored_ids(clickhouse, db, "error")) == sorted(a.request_id for a in failed)
    rows = await stored(clickhouse, db, "error")
    assert {d["status_code"] for _, d in rows} == {400, 500}
    assert all(type(d["error_code"]) is int for _, d in rows)


async def test_server_killed_and_restarted_mid_run_nothing_lost(
    aiohttp_client: ClientFactory, clickhouse_factory: Callable[..., ClickHouseServer], db: str
) -> None:
    server = clickhouse_factory()
    bound = 500
    sink = ClickHouseSink(server.url, db, timeout=1.0)
    app = create_app(sinks=[sink], **fast_policy(buffer_size=bound, batch_size=50))
    monitoring = app[MONITORING_KEY]
    client = await aiohttp_client(app)
    paths = SEED_PATHS + FAILING_PATHS[:1]
    before = await drive(client, 60, paths=paths, monitoring=monitoring)
    await eventually(lambda: stats_of(monitoring)["buffered"] == 0, what="phase 1 written")

    traffic = asyncio.create_task(
        drive(client, 240, concurrency=2, paths=paths, monitoring=monitoring)
    )
    await eventually(lambda: stats_of(monitoring)["emitted"] >= 100, what="traffic flowing")
    await asyncio.to_thread(server.kill)
    during = await traffic
    assert stats_of(monitoring)["buffered"] > 0
    await eventually(lambda: stats_of(monitoring)["retries"] >= 1, what="retries while down")
    await asyncio.to_thread(server.start)
    after = await drive(client, 60, paths=paths, monitoring=monitoring)
    await eventually(lambda: stats_of(monitoring)["buffered"] == 0, what="all written")
    await client.close()

    answers: list[Answer] = before + during + after
    failed = [a for a in answers if a.status >= 400]
    assert all(a.status in (200, 201, 400) for a in answers)
    stats = stats_of(monitoring)
    assert sum(stats["dropped"].values()) == 0
    assert stats["written"] == stats["emitted"] == len(answers) + len(failed)
    # Nothing lost, nothing foreign. A kill between an INSERT's commit and its answer
    # makes the retry store that write again (plain MergeTree does not deduplicate: the
    # documented at-least-once corner), about one run in fifteen: at most one write.
    for table, sent in (("request", answers), ("error", failed)):
        stored_now = await stored_ids(server, db, table)
        assert sorted(set(stored_now)) == sorted(a.request_id for a in sent)
        assert len(stored_now) - len(sent) <= 50 * 2, table  # one write: a batch, or two


async def test_a_retried_batch_does_not_send_a_stored_table_again(
    fake_influx: FakeInfluxServer,
) -> None:
    """The request INSERT succeeds, the error INSERT fails retryably (refused before it
    ran: no check needed): the error says the error rows only are pending, and the
    flusher's retry sends those; another batch sends both tables."""
    overloaded = (
        "Code: 202, e.displayText() = DB::Exception: Too many simultaneous queries for user"
        " default. Current: 1, maximum: 1, e.what() = DB::Exception\n"
    )
    fake_influx.program(
        FakeResponse(200, "Int64\n"),  # system.columns of request
        FakeResponse(200),  # INSERT request
        FakeResponse(200, "Int64\n"),  # system.columns of error
        FakeResponse(500, overloaded),  # INSERT error
        FakeResponse(200),  # INSERT error, retried
    )
    sink = ClickHouseSink(fake_influx.url, "db", create_tables=False)
    batch = seed_points()
    try:
        with pytest.raises(SinkError) as caught:
            await sink.write(batch)
        assert caught.value.retryable
        assert caught.value.status == 500
        assert "Code 202 too many simultaneous queries" in str(caught.value)
        assert caught.value.pending == [p for p in batch if p.series == "error"]
        await sink.write(caught.value.pending)
        await sink.write(list(batch))  # a new batch: both tables
    finally:
        await sink.close()
    inserts = [r.query["query"] for r in fake_influx.requests if "query" in r.query]
    assert inserts == [
        "INSERT INTO `db`.`request` FORMAT JSONEachRow",
        "INSERT INTO `db`.`error` FORMAT JSONEachRow",
        "INSERT INTO `db`.`error` FORMAT JSONEachRow",
        "INSERT INTO `db`.`request` FORMAT JSONEachRow",
        "INSERT INTO `db`.`error` FORMAT JSONEachRow",
    ]
    request = next(r for r in fake_influx.requests if "query" in r.query)
    assert request.headers["Content-Encoding"] == "gzip"
    assert json.loads(request.body)["time"] == T0


async def test_a_refused_second_table_counts_the_first_as_written(
    clickhouse: ClickHouseServer, sink_for: Callable[..., ClickHouseSink], db: str
) -> None:
    """``pending``: the flusher counts the stored points written, the others rejected."""
    clickhouse.query(f"CREATE DATABASE {db}")
    clickhouse.query(
        f"CREATE TABLE {db}.request (time Int64, data String) ENGINE = MergeTree() ORDER BY time"
    )
    sink = sink_for(db, create_tables=False)
    points = [*seed_points(), *seed_points()[:1]]
    with pytest.raises(SinkError) as caught:
        await sink.write(list(points))
    assert not caught.value.retryable
    assert caught.value.pending == [p for p in points if p.series == "error"]
    assert exception_code(caught.value.server_text) == 60
    assert clickhouse.count(db, "request") == 2

    monitoring = Monitoring(MonitoringSettings(service="t", max_retries=0), [sink])
    await monitoring.start()
    for point in points:
        monitoring.emit(point)
    await monitoring.flush()
    stats = stats_of(monitoring)
    await monitoring.close()
    assert (stats["written"], stats["dropped"]["rejected"], stats["buffered"]) == (2, 1, 0)
    assert clickhouse.count(db, "request") == 4


async def test_database_dropped_while_running_is_created_again(
    clickhouse: ClickHouseServer, sink_for: Callable[..., ClickHouseSink], db: str
) -> None:
    sink = sink_for(db)
    await sink.start()  # creates the database and both tables
    assert set(clickhouse.query(f"SHOW TABLES FROM {db}").split()) == {"request", "error"}
    clickhouse.drop_database(db)
    await sink.write(seed_points())  # 81 -> created -> sent once more
    assert clickhouse.count(db, "request") == clickhouse.count(db, "error") == 1


async def test_no_table_is_created_when_not_allowed(
    clickhouse: ClickHouseServer, sink_for: Callable[..., ClickHouseSink], db: str
) -> None:
    sink = sink_for(db, create_tables=False)
    await sink.start()
    with pytest.raises(SinkError) as caught:
        await sink.write(seed_points())
    assert caught.value.status == 404
    assert not caught.value.retryable
    assert "Code 81 unknown database" in str(caught.value)
    assert db not in clickhouse.query("SHOW DATABASES").split()


async def test_server_down_at_start_tables_created_before_first_write(
    clickhouse_factory: Callable[..., ClickHouseServer], db: str
) -> None:
    server = clickhouse_factory()
    await asyncio.to_thread(server.kill)
    sink = ClickHouseSink(server.url, db, timeout=2.0)
    try:
        with capture_logs() as logs:
            await sink.start()  # must not raise
        assert [e["event"] for e in logs] == ["clickhouse_create_tables_failed"]
        assert logs[0]["will_retry"] is True
        with pytest.raises(SinkError) as caught:
            await sink.write(seed_points())
        assert caught.value.retryable
        await asyncio.to_thread(server.start)
        await sink.write(seed_points())
    finally:
        await sink.close()
    assert server.count(db, "request") == server.count(db, "error") == 1


async def test_write_after_close_is_not_retryable(
    sink_for: Callable[..., ClickHouseSink], db: str
) -> None:
    sink = sink_for(db)
    await sink.start()
    await sink.close()
    with pytest.raises(SinkError) as caught:
        await sink.write(seed_points())
    assert not caught.value.retryable


async def test_connection_refused_is_retryable(db: str) -> None:
    sink = ClickHouseSink(f"http://127.0.0.1:{free_port()}", db, timeout=2.0)
    try:
        with capture_logs() as logs, pytest.raises(SinkError) as caught:
            await sink.write(seed_points())
    finally:
        await sink.close()
    assert caught.value.retryable
    assert caught.value.pending == seed_points()
    # Nothing reached a server: nothing to check before the retry.
    assert "clickhouse_insert_unsure" not in [e["event"] for e in logs]


# --------------------------------------------------------------------------- credentials


async def test_password_in_headers_writes(
    clickhouse_auth: ClickHouseServer, sink_for: Callable[..., ClickHouseSink], db: str
) -> None:
    sink = sink_for(db, server=clickhouse_auth, password=clickhouse_auth.password)
    await sink.start()
    await sink.write(seed_points())
    assert clickhouse_auth.count(db, "request") == 1


async def test_wrong_password_is_rejected_counted_and_never_shown(
    aiohttp_client: ClientFactory, clickhouse_auth: ClickHouseServer, db: str
) -> None:
    password = "Wr0ng-Pa55w0rd-ch9"
    sink = ClickHouseSink(clickhouse_auth.url, db, password=password, timeout=5.0)
    with capture_logs() as logs:
        app = create_app(sinks=[sink], **fast_policy(max_retries=2))
        monitoring = app[MONITORING_KEY]
        client = await aiohttp_client(app)
        answers = await drive(client, 20, monitoring=monitoring)
        await monitoring.flush()
        await eventually(lambda: stats_of(monitoring)["buffered"] == 0, what="refused")
        with pytest.raises(SinkError) as caught:
            await sink.write(seed_points())
        await client.close()
    stats = stats_of(monitoring)
    assert stats["dropped"]["rejected"] == stats["emitted"] == len(answers)
    assert stats["written"] == stats["retries"] == 0
    error = caught.value
    assert error.status == 401
    assert not error.retryable
    assert "Code 193 wrong password" in str(error)
    assert password not in str(error)
    assert password not in repr(error)
    assert password not in "".join(traceback.format_exception(error))
    events = [e["event"] for e in logs]
    assert "clickhouse_create_tables_failed" in events
    assert "batch_rejected" in events
    assert password not in repr(logs)
    assert password not in repr(sink)
    assert password not in repr(vars(sink))


async def test_missing_password_and_unknown_user_are_refused(
    clickhouse_auth: ClickHouseServer, sink_for: Callable[..., ClickHouseSink], db: str
) -> None:
    for options, code in (({}, (193, 194, 516)), ({"username": "nobody"}, (192, 516))):
        sink = sink_for(db, server=clickhouse_auth, create_tables=False, **options)
        with pytest.raises(SinkError) as caught:
            await sink.write(seed_points())
        assert caught.value.status == 401
        assert not caught.value.retryable
        assert exception_code(caught.value.server_text) in code


async def test_read_only_user_creation_and_insert_are_refused(
    clickhouse: ClickHouseServer, sink_for: Callable[..., ClickHouseSink], db: str
) -> None:
    sink = sink_for(
        db,
        username=clickhouse.reader_user,
        password=clickhouse.reader_password,
        allow_plain_credentials=True,
    )
    with capture_logs() as logs:
        await sink.start()  # CREATE refused (164): logged once, not raised
    assert [e["event"] for e in logs] == ["clickhouse_create_tables_failed"]
    assert "Code 164 read-only user" in logs[0]["error"]
    with pytest.raises(SinkError) as caught:
        await sink.write(seed_points())
    assert not caught.value.retryable
    assert exception_code(caught.value.server_text) in (81, 164)


def test_credentials_never_in_urls_repr_or_plain_http_to_another_host() -> None:
    password = "S3cr3t-P4ss-ch"
    sink = ClickHouseSink("https://ch.example:8443", "db", "luna", password)
    for text in (repr(sink), str(sink), repr(vars(sink)), sink.url):
        assert password not in text
    assert "'***'" in repr(sink)
    with pytest.raises(ValueError, match="must not hold credentials") as caught:
        ClickHouseSink(f"http://luna:{password}@127.0.0.1:8123")
    assert password not in str(caught.value)
    with pytest.raises(ValueError, match="plain HTTP"):
        ClickHouseSink("http://ch.example:8123", "db", "luna", password)
    ClickHouseSink("http://ch.example:8123", "db", "luna", password, allow_plain_credentials=True)
    ClickHouseSink("http://127.0.0.1:8123", "db", "luna", password)  # loopback
    with pytest.raises(ValueError, match="http://host:port"):
        ClickHouseSink("ftp://127.0.0.1:8123")
    with pytest.raises(ValueError, match="no query"):
        ClickHouseSink("http://127.0.0.1:8123/?password=x")
    with pytest.raises(ValueError, match="needs a username"):
        ClickHouseSink(username="", password=password)


def test_a_settings_file_table_builds_the_sink(tmp_path: Any) -> None:
    path = tmp_path / "service.toml"
    path.write_text(
        '[monitoring]\nservice = "luna-events"\n\n[[monitoring.sinks]]\ntype = "clickhouse"\n'
        'url = "http://127.0.0.1:8123"\ndatabase = "luna"\nusername = "luna"\n'
        'password_env = "CH_PASSWORD"\ngzip = false\n'
    )
    settings = MonitoringSettings.load(path, env={"CH_PASSWORD": "env-s3cret-pw"})
    (sink,) = settings.build_sinks()
    assert isinstance(sink, lunamon.ClickHouseSink)
    assert (sink.url, sink.database, sink.username, sink.gzip) == (
        "http://127.0.0.1:8123",
        "luna",
        "luna",
        False,
    )
    assert sink._headers() == {"X-ClickHouse-User": "luna", "X-ClickHouse-Key": "env-s3cret-pw"}
    assert "env-s3cret-pw" not in repr(settings)
    assert isinstance(create_sink("clickhouse", {}), ClickHouseSink)


# --------------------------------------------------------------------------- classification


def _slow_query_holder(server: ClickHouseServer) -> threading.Thread:
    thread = threading.Thread(target=server.request, args=("SELECT sleep(2)",), daemon=True)
    thread.start()
    return thread


_URL_SETTINGS = {
    202: {"max_concurrent_queries_for_user": "1"},
    241: {"max_memory_usage": "1"},
}


_INSERT = "INSERT INTO {db}.t FORMAT JSONEachRow"
_SLOW = "SELECT count() FROM system.numbers SETTINGS max_execution_time = 1"
_BIG = "SELECT groupArray(number) FROM numbers(1000)"  # with max_memory_usage=1 in the URL
# (id, sql, body, HTTP status, code, retryable, reason): each answer provoked for real
_REAL_ANSWERS = [
    ("SELEC 1", None, 400, 62, False, "syntax error"),
    ("INSERT INTO nodb_x.t FORMAT JSONEachRow", b"{}", 404, 81, False, "unknown database"),
    ("INSERT INTO {db}.nope FORMAT JSONEachRow", b"{}", 404, 60, False, "unknown table"),
    (_INSERT, b'{"time":"x","data":""}', 500, 27, False, "cannot parse input"),
    (_INSERT, b'{"time":1,"data":5}', 400, 26, False, "cannot parse JSON string"),
    (_INSERT, b'{"time":1,"nope":""}', 500, 117, False, "incorrect data"),
    (_INSERT.replace("JSONEachRow", "JSONEachRo"), b"{}", 404, 73, False, "unknown format"),
    (_SLOW, None, 500, 159, True, "timeout exceeded"),
    (_BIG, None, 500, 241, True, "memory limit exceeded"),
    (_INSERT, b'{"time":1,"data":""}', 500, 164, False, "read-only user"),
    ("SELECT 1", None, 401, 193, False, "wrong password"),
    ("SELECT 1", None, 500, 202, True, "too many simultaneous queries"),
    ("SELECT throwIf(1)", None, 500, 395, True, ""),  # a code in neither list, on a 5xx
]


@pytest.mark.parametrize(
    ("sql", "body", "status", "code", "retryable", "reason"),
    _REAL_ANSWERS,
    ids=[str(case[3]) for case in _REAL_ANSWERS],
)
def test_classification_of_real_answers(
    clickhouse: ClickHouseServer,
    sql: str,
    body: bytes | None,
    status: int,
    code: int,
    retryable: bool,
    reason: str,
) -> None:
    db = "lunamon_classify"
    clickhouse.query(f"CREATE DATABASE IF NOT EXISTS {db}")
    clickhouse.query(
        f"CREATE TABLE IF NOT EXISTS {db}.t (time Int64, data String) ENGINE = MergeTree()"
        " ORDER BY time"
    )
    auth = None
    if code == 193:
        auth = ("default", "not-the-password")  # the plain server's default has none
    if code == 164:
        auth = (clickhouse.reader_user, clickhouse.reader_password)
    holder = _slow_query_holder(clickhouse) if code == 202 else None
    if holder is not None:
        time.sleep(0.3)  # the other query is running
    params = _URL_SETTINGS.get(code)
    answer_status, answer, header_code = clickhouse.request(
        sql.format(db=db), body, auth=auth, params=params
    )
    if holder is not None:
        holder.join()
    text = answer.decode()
    assert answer_status == status, text[:300]
    assert text.startswith(f"Code: {code}, ")
    error = classify_clickhouse_response(answer_status, text, {}, what="write")
    assert error.retryable is retryable
    assert error.status == status
    assert str(error).startswith(f"write failed: HTTP {status} Code {code} {reason}".rstrip())
    assert "DB::Exception" in error.server_text
    assert exception_code(text) == code
    assert header_code in ("", str(code))  # newer servers send X-ClickHouse-Exception-Code


def test_classification_of_answers_the_test_server_cannot_give() -> None:
    replica = (
        "Code: 242. DB::Exception: Table is in readonly mode (replica path: /clickhouse/t)."
        " (TABLE_IS_READ_ONLY) (version 23.8.2.7 (official build))"
    )
    error = classify_clickhouse_response(500, replica, {"X-ClickHouse-Exception-Code": "242"})
    assert error.retryable
    assert "Code 242 table is read-only" in str(error)
    auth = "Code: 516. DB::Exception: luna: Authentication failed. (AUTHENTICATION_FAILED)"
    error = classify_clickhouse_response(401, auth, {"X-ClickHouse-Exception-Code": "516"})
    assert not error.retryable
    assert "authentication failed" in str(error)
    # The header wins over the text (a row's text may hold "Code: 62").
    assert exception_code("Code: 62", {"X-ClickHouse-Exception-Code": "241"}) == 241
    # No code: a proxy's answer, classified like the InfluxDB sinks'.
    assert classify_clickhouse_response(502, "<html>Bad Gateway</html>").retryable
    assert not classify_clickhouse_response(403, "forbidden").retryable
    assert isinstance(classify_clickhouse_response(413, "too large"), BatchTooLarge)
    error = classify_clickhouse_response(503, "busy", {"Retry-After": "7"})
    assert error.retryable
    assert error.retry_after == 7.0
    # An unknown code: the HTTP status decides.
    assert classify_clickhouse_response(500, "Code: 9999, odd").retryable
    assert not classify_clickhouse_response(400, "Code: 9999, odd").retryable
    # Secrets given to the classifier never show.
    error = classify_clickhouse_response(
        401, "Code: 193, Wrong password pw-s3cret-x", secrets=["pw-s3cret-x"]
    )
    assert "pw-s3cret-x" not in str(error)


# --------------------------------------------------------------------------- ambiguous writes
# RELIABILITY.md 35-36: a write whose outcome is unknown (the server paused past the
# sink's timeout, the connection reset or a 5xx after the body went out) is checked
# before it is sent again; a batch stored in part is accounted per table.


def many_points(count: int, start: int = T0, series: tuple[str, ...] = ("request",)) -> list[Point]:
    """``count`` points per series, times unique per series (as a service's are)."""
    tags = {"service": "luna-events", "route": "POST:/events", "status_code": "204"}
    return [
        Point(name, start + i * 1_000, tags, {"request_id": f"{name}-{i}", "execution_time": 1.5})
        for i in range(count)
        for name in series
    ]


def times_of(server: ClickHouseServer, db: str, table: str) -> list[int]:
    return [int(line) for line in server.query(f"SELECT time FROM {db}.{table}").split()]


class FaultyProxy:
    """A TCP proxy on loopback before a real server. Requests pass through; for the next
    ``faults`` INSERTs (into ``table`` when given) it lets the server store the body and
    answer, then, instead of that answer, resets the connection (``mode="reset"``) or
    answers ``502`` (``mode="502"``): the client cannot know the rows are stored. With
    ``mode="503"`` the INSERT never reaches the server: 503, nothing stored."""

    def __init__(self, upstream_port: int, mode: str, faults: int = 1, table: str = "") -> None:
        self.upstream_port = upstream_port
        self.mode = mode
        self.faults = faults
        self.table = table
        self.request_lines: list[str] = []
        self.faulted = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> FaultyProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Every connection closed, to the server too: an idle keep-alive connection left
        # open would hold the server's shutdown until its keep-alive timeout.
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    def _victim(self, line: str) -> bool:
        wanted = "INSERT" in line and (not self.table or f"%60{self.table}%60" in line)
        return wanted and self.faulted < self.faults

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers.update((writer, up_writer))
        current = [""]  # the request line of the request being answered

        async def upstream() -> None:
            while data := await reader.read(65536):
                if data.startswith(b"POST ") or data.startswith(b"GET "):
                    current[0] = data.split(b"\r\n", 1)[0].decode("latin-1")
                    self.request_lines.append(current[0])
                    if self.mode == "503" and self._victim(current[0]):
                        self.faulted += 1
                        writer.write(
                            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n"
                            b"Connection: close\r\n\r\nbusy"
                        )
                        await writer.drain()
                        writer.close()
                        up_writer.close()
                        return
                up_writer.write(data)
                await up_writer.drain()
            up_writer.close()

        task = asyncio.ensure_future(upstream())
        self._tasks.add(task)
        try:
            while data := await up_reader.read(65536):
                if self._victim(current[0]):  # the server stored it and answers now
                    self.faulted += 1
                    if self.mode == "502":
                        writer.write(
                            b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 3\r\n"
                            b"Connection: close\r\n\r\nbad"
                        )
                        await writer.drain()
                    else:
                        # SO_LINGER 0: the close sends a reset, not a FIN.
                        sock = writer.get_extra_info("socket")
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            task.cancel()
            writer.close()
            up_writer.close()
            self._tasks.discard(task)


@pytest.mark.parametrize("mode", ["reset", "502"])
async def test_a_lost_answer_after_the_body_stores_the_batch_once(
    clickhouse: ClickHouseServer, db: str, mode: str
) -> None:
    """The server stores the INSERT, the answer is lost (reset) or replaced (a proxy's
    502): the retry checks the table, finds the rows, sends nothing, counts them written."""
    points = many_points(30)
    async with FaultyProxy(clickhouse.port, mode) as proxy:
        sink = ClickHouseSink(proxy.url, db, timeout=5.0)
        monitoring = Monitoring(
            MonitoringSettings(service="t", batch_size=1000, retry_base_delay=0.01), [sink]
        )
        await monitoring.start()
        with capture_logs() as logs:
            for point in points:
                monitoring.emit(point)
            await monitoring.flush()
            assert stats_of(monitoring)["written"] == 0  # unknown yet: not counted
            await monitoring.flush()
        stats = stats_of(monitoring)
        await monitoring.close()
    assert proxy.faulted == 1
    assert (stats["written"], stats["retries"], stats["buffered"]) == (30, 1, 0)
    assert sorted(times_of(clickhouse, db, "request")) == [p.time_ns for p in points]
    assert [e["query_id"] for e in logs if e["event"] == "clickhouse_insert_unsure"]
    inserts = [line for line in proxy.request_lines if "INSERT" in line]
    assert len(inserts) == 1  # the check found every row: nothing sent again
    assert "query_id=lunamon-" in inserts[0]


async def test_a_refused_connection_leaves_nothing_to_check(
    clickhouse: ClickHouseServer, db: str
) -> None:
    """The server went away between two writes (connection refused): the INSERT never
    left, so its table is not unsure and the next INSERT is not checked."""
    sink = ClickHouseSink(clickhouse.url, db, timeout=5.0)
    try:
        async with FaultyProxy(clickhouse.port, "reset", faults=0) as proxy:
            sink._base = URL(proxy.url)  # the schema is known: the next request is the INSERT
            await sink.write(many_points(1))
        await sink.close()
        await sink.start()
        with capture_logs() as logs, pytest.raises(SinkError) as caught:
            await sink.write(many_points(2))
        assert caught.value.retryable
        assert "clickhouse_insert_unsure" not in [e["event"] for e in logs]
        assert not sink._unsure
    finally:
        await sink.close()


async def test_a_table_dropped_after_an_unsure_insert_is_created_and_written(
    clickhouse: ClickHouseServer, db: str
) -> None:
    """The check meets no table (60/81): it holds none of the points; the INSERT creates it."""
    async with FaultyProxy(clickhouse.port, "reset") as proxy:
        sink = ClickHouseSink(proxy.url, db, timeout=5.0)
        try:
            with pytest.raises(SinkError):
                await sink.write(many_points(3))
            clickhouse.drop_database(db)
            await sink.write(many_points(3))
        finally:
            await sink.close()
    assert sorted(times_of(clickhouse, db, "request")) == [p.time_ns for p in many_points(3)]


async def test_a_check_sends_only_the_rows_missing(clickhouse: ClickHouseServer, db: str) -> None:
    """After an unsure INSERT, the next INSERT into the table sends only what is not there,
    once the unsure INSERT's query_id is held; the INSERT after that is not checked."""
    first, more = many_points(10), many_points(5, start=T0 + 10_000)
    async with FaultyProxy(clickhouse.port, "reset") as proxy:
        sink = ClickHouseSink(proxy.url, db, timeout=5.0)
        try:
            with pytest.raises(SinkError) as caught:
                await sink.write(first)
            assert caught.value.retryable
            assert caught.value.pending == first
            await sink.write([*first, *more])  # the stored ten are left out
            await sink.write(many_points(1, start=T0 + 50_000))
        finally:
            await sink.close()
    assert sorted(times_of(clickhouse, db, "request")) == sorted(
        p.time_ns for p in [*first, *more, *many_points(1, start=T0 + 50_000)]
    )
    lines = [line for line in proxy.request_lines if "query_id=" in line]
    ids = [re.search(r"query_id=([^& ]+)", line)[1] for line in lines]  # type: ignore[index]
    # INSERT, the hold of its id, the check (SELECT), INSERT of the five, INSERT
    assert len(lines) == 5
    assert "INSERT" not in lines[1]
    assert "INSERT" not in lines[2]
    assert ids[0] == ids[1] != ids[2] == ids[3] != ids[4]


async def test_a_check_while_the_unsure_insert_still_runs_is_retried(
    clickhouse: ClickHouseServer, db: str, fake_influx: FakeInfluxServer
) -> None:
    """216 (a query with that id still runs) when the sink tries to hold the unsure
    INSERT's id is retryable and keeps the INSERT unsure: nothing is checked or sent."""
    running = (
        "Code: 216, e.displayText() = DB::Exception: Query with id = x is already running.,"
        " e.what() = DB::Exception\n"
    )
    fake_influx.program(
        FakeResponse(200, "Int64\n"),  # system.columns
        FakeResponse(502, "bad gateway"),  # INSERT: unsure
        *[FakeResponse(500, running)] * 4,  # the hold and its probe, twice
    )
    sink = ClickHouseSink(fake_influx.url, db, create_tables=False)
    points = many_points(3)
    try:
        with pytest.raises(SinkError):
            await sink.write(points)
        for _ in range(2):
            with pytest.raises(SinkError) as caught:
                await sink.write(points)
            assert caught.value.retryable
            assert caught.value.pending == points
            assert "Code 216" in str(caught.value)
    finally:
        await sink.close()
    inserts = [r for r in fake_influx.requests if "INSERT" in r.query.get("query", "")]
    assert len(inserts) == 1  # never sent again while the first may still run
    held = {r.query.get("query_id") for r in fake_influx.requests if b"sleepEachRow" in r.body}
    assert held == {inserts[0].query["query_id"]}


async def test_a_check_waits_for_the_unsure_insert_still_running_on_the_server(
    clickhouse: ClickHouseServer, db: str
) -> None:
    """The real 216: an INSERT slower than the sink's timeout (a materialized view sleeps
    1.5 s) still runs when the retry comes; its check, under the same query_id, is
    refused until it ends, then finds its rows: nothing is sent twice."""
    clickhouse.query(f"CREATE DATABASE {db}")
    clickhouse.query(
        f"CREATE TABLE {db}.request (time Int64, data String) ENGINE = MergeTree() ORDER BY time"
    )
    clickhouse.query(
        f"CREATE MATERIALIZED VIEW {db}.slow ENGINE = Memory AS SELECT sleep(1.5) AS s"
        f" FROM {db}.request"
    )
    points = many_points(5)
    sink = ClickHouseSink(clickhouse.url, db, create_tables=False, timeout=0.5)
    refused: list[str] = []
    try:
        with pytest.raises(SinkError) as caught:
            await sink.write(points)  # times out: stored later
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                await sink.write(caught.value.pending or points)
                break
            except SinkError as exc:
                refused.append(str(exc))
                await asyncio.sleep(0.05)
    finally:
        await sink.close()
    assert any("Code 216" in text for text in refused)
    assert sorted(times_of(clickhouse, db, "request")) == [p.time_ns for p in points]


async def test_a_paused_server_past_the_timeout_stores_every_point_once(
    clickhouse_factory: Callable[..., ClickHouseServer], db: str
) -> None:
    """SIGSTOP under a few batches, longer than the sink's timeout, then SIGCONT: the
    INSERT that timed out is stored when the server resumes; the retry checks first."""
    server = clickhouse_factory()
    sink = ClickHouseSink(server.url, db, timeout=0.5)
    settings = MonitoringSettings(
        service="t",
        batch_size=20,
        flush_interval=0.05,
        retry_base_delay=0.05,
        retry_max_delay=0.2,
        max_retries=1000,
    )
    monitoring = Monitoring(settings, [sink])
    await monitoring.start()
    points = many_points(40, series=("request", "error"))
    try:
        for point in points[:20]:
            monitoring.emit(point)
        await eventually(lambda: stats_of(monitoring)["written"] == 20, what="first batch")
        await asyncio.to_thread(server.pause)
        try:
            with capture_logs() as logs:
                for point in points[20:]:
                    monitoring.emit(point)
                await eventually(lambda: stats_of(monitoring)["retries"] >= 2, what="timeouts")
        finally:
            await asyncio.to_thread(server.resume)
        await eventually(
            lambda: stats_of(monitoring)["written"] == len(points), timeout=20, what="all"
        )
        stats = stats_of(monitoring)
    finally:
        await monitoring.close()
        await asyncio.to_thread(server.resume)
    assert any(e["event"] == "clickhouse_insert_unsure" for e in logs)
    for table in ("request", "error"):
        assert sorted(times_of(server, db, table)) == sorted(
            p.time_ns for p in points if p.series == table
        )
    assert stats["written"] == server.count(db, "request") + server.count(db, "error")


async def test_a_batch_stored_in_part_is_accounted_per_table_until_shutdown(
    clickhouse: ClickHouseServer, db: str
) -> None:
    """The request INSERT is stored, the error INSERT refused (503) every time: the request
    rows are written at once, never sent again; at shutdown only the error rows are
    dropped."""
    points = many_points(10, series=("request", "error"))
    async with FaultyProxy(clickhouse.port, "503", faults=1000, table="error") as proxy:
        sink = ClickHouseSink(proxy.url, db, timeout=5.0)
        settings = MonitoringSettings(
            service="t", batch_size=1000, retry_base_delay=0.01, shutdown_timeout=0.5
        )
        monitoring = Monitoring(settings, [sink])
        await monitoring.start()
        for point in points:
            monitoring.emit(point)
        await monitoring.flush()
        middle = stats_of(monitoring)
        await monitoring.flush()
        await monitoring.close()
        final = stats_of(monitoring)
    assert (middle["written"], middle["buffered"]) == (10, 10)
    assert (final["written"], final["dropped"]["shutdown"]) == (10, 10)
    assert clickhouse.count(db, "request") == 10
    assert clickhouse.count(db, "error") == 0
    assert sum("INSERT" in line and "%60request%60" in line for line in proxy.request_lines) == 1


async def test_a_half_refused_batch_retries_only_the_failed_table(
    clickhouse: ClickHouseServer, db: str
) -> None:
    """The partial-INSERT retry against the real server: error's INSERT fails retryably
    (502, then passed), the retry sends the error rows only: request holds each once."""
    points = many_points(10, series=("request", "error"))
    async with FaultyProxy(clickhouse.port, "502", faults=1, table="error") as proxy:
        sink = ClickHouseSink(proxy.url, db, timeout=5.0)
        monitoring = Monitoring(
            MonitoringSettings(service="t", batch_size=1000, retry_base_delay=0.01), [sink]
        )
        await monitoring.start()
        for point in points:
            monitoring.emit(point)
        await monitoring.flush()
        await monitoring.flush()
        stats = stats_of(monitoring)
        await monitoring.close()
    assert (stats["written"], stats["buffered"]) == (20, 0)
    assert clickhouse.count(db, "request") == clickhouse.count(db, "error") == 10


async def test_a_distributed_table_is_written_synchronously_and_checked(
    clickhouse: ClickHouseServer, db: str
) -> None:
    """DESIGN.md §4b: a Distributed table (over the test server's one-shard cluster) gets
    ``insert_distributed_sync=1``, so that the check after an unsure INSERT sees its rows."""
    clickhouse.query(f"CREATE DATABASE {db}")
    for table in ("request", "error"):
        clickhouse.query(
            f"CREATE TABLE {db}.{table}_local (time Int64, data String)"
            " ENGINE = MergeTree() ORDER BY time"
        )
        clickhouse.query(
            f"CREATE TABLE {db}.{table} (time Int64, data String)"
            f" ENGINE = Distributed(one_shard, {db}, {table}_local, rand())"
        )
    points = many_points(25, series=("request", "error"))
    async with FaultyProxy(clickhouse.port, "reset", faults=2) as proxy:
        sink = ClickHouseSink(proxy.url, db, timeout=5.0)
        monitoring = Monitoring(
            MonitoringSettings(service="t", batch_size=1000, retry_base_delay=0.01), [sink]
        )
        await monitoring.start()
        for point in points:
            monitoring.emit(point)
        for _ in range(3):
            await monitoring.flush()
        stats = stats_of(monitoring)
        await monitoring.close()
    assert proxy.faulted == 2
    assert (stats["written"], stats["buffered"]) == (50, 0)
    # Rows an asynchronous insert queued (files in the Distributed table's folder) arrive
    # later: wait for them, then count.
    queues = [clickhouse.root / "data" / "data" / db / table for table in ("request", "error")]
    await eventually(
        lambda: not [f for q in queues for f in q.rglob("*.bin")], what="distributed queues"
    )
    for table in ("request", "error"):
        assert sorted(times_of(clickhouse, db, f"{table}_local")) == sorted(
            p.time_ns for p in points if p.series == table
        )
    inserts = [line for line in proxy.request_lines if "INSERT" in line]
    assert inserts
    assert all("insert_distributed_sync=1" in line for line in inserts)


async def test_a_coarse_time_column_keys_the_check_on_time_and_data(
    clickhouse: ClickHouseServer, db: str
) -> None:
    """A DateTime ``time`` (seconds): points of one second differ by their ``data``; the
    check leaves out those held (same second, same data) and sends the others."""
    clickhouse.query(f"CREATE DATABASE {db}")
    clickhouse.query(
        f"CREATE TABLE {db}.request (time DateTime, data String) ENGINE = MergeTree() ORDER BY time"
    )
    points = many_points(10)  # all in one second
    sink = ClickHouseSink(clickhouse.url, db, create_tables=False, check_existing=True)
    try:
        await sink.write(points[:4])
        await sink.write(points)  # the first four are there: six sent
        await sink.write(points)  # all there: nothing sent
    finally:
        await sink.close()
    rows = clickhouse.rows(f"SELECT data FROM {db}.request")
    ids = [json.loads(row["data"])["request_id"] for row in rows]
    assert sorted(ids) == sorted(str(p.fields["request_id"]) for p in points)


async def test_points_a_dead_process_may_have_stored_are_checked_once(
    clickhouse: ClickHouseServer, db: str
) -> None:
    """``spool_dir``'s replay marks the points it sends again: the INSERT carrying them
    leaves out those stored already; once checked, they are written as usual."""
    stored, lost = many_points(6), many_points(4, start=T0 + 6 * 10_000)
    before = ClickHouseSink(clickhouse.url, db)  # the process that died after this write
    try:
        await before.write(stored)
    finally:
        await before.close()
    sink = ClickHouseSink(clickhouse.url, db)
    try:
        sink.mark_possibly_stored([*stored, *lost])
        await sink.write([*stored, *lost])
        assert not sink._recheck  # checked: forgotten
        later = many_points(2, start=T0 + 20 * 10_000)
        await sink.write(later)
    finally:
        await sink.close()
    assert sorted(times_of(clickhouse, db, "request")) == sorted(
        p.time_ns for p in [*stored, *lost, *later]
    )


class LateInsertProxy:
    """A TCP proxy before a real ClickHouse that keeps the first INSERT's request (the
    client gets no answer and times out) and delivers it to the server only once the
    client's next INSERT has been answered: an INSERT that reaches the server after the
    check and the re-send, as one queued in a paused server does."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.held: bytes | None = None
        self._taken = False
        self.late_answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> LateInsertProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers.append(up_writer)
        request = [b""]  # the request line of the request being answered

        async def upstream() -> None:
            holding: bytearray | None = None
            while data := await reader.read(65536):
                if holding is not None:  # the rest of the kept INSERT
                    holding += data
                    continue
                if data.startswith(b"POST "):
                    request[0] = data.split(b"\r\n", 1)[0]
                    if not self._taken and b"INSERT" in request[0]:
                        self._taken = True
                        holding = bytearray(data)
                        continue
                up_writer.write(data)
            if holding is not None:  # the client gave up waiting for an answer
                self.held = bytes(holding)
            up_writer.close()

        pump = asyncio.ensure_future(upstream())
        try:
            while data := await up_reader.read(65536):
                writer.write(data)
                await writer.drain()
                if b"INSERT" in request[0] and self.held and not self.late_answer.done():
                    self.late_answer.set_result(await self._deliver_late(self.held))
        finally:
            await asyncio.gather(pump, return_exceptions=True)
            writer.close()

    async def _deliver_late(self, held: bytes) -> bytes:
        late_reader, late_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        late_writer.write(held)
        try:
            return await asyncio.wait_for(late_reader.read(65536), 10)
        finally:
            late_writer.close()


async def test_an_unsure_insert_reaching_the_server_after_the_resend_stores_nothing(
    clickhouse: ClickHouseServer, db: str
) -> None:
    """The campaign's duplicate (a paused ClickHouse): the timed-out INSERT reaches the
    server after the check and the re-send. Its query_id is held by then (216), so it
    stores nothing and every point is stored once."""
    points = many_points(6)
    async with LateInsertProxy(clickhouse.port) as proxy:
        sink = ClickHouseSink(proxy.url, db, timeout=1.0)
        try:
            await sink.start()
            with pytest.raises(SinkError) as caught:
                await sink.write(points)  # no answer: unsure
            assert caught.value.retryable
            await sink.write(points)  # hold, check (nothing there), send
            late = await asyncio.wait_for(proxy.late_answer, 15)
        finally:
            await sink.close()
    assert proxy.held is not None
    assert b"Code: 216" in late  # the late INSERT was refused: its id was held
    assert sorted(times_of(clickhouse, db, "request")) == [p.time_ns for p in points]
