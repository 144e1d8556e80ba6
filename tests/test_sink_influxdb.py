"""InfluxDBSink against a real influxd 1.6.7: what is written is what is stored, and
every failure comes out as the SinkError the flusher expects (RELIABILITY.md)."""

from __future__ import annotations

import asyncio
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest
from servers import InfluxServer, VictoriaMetricsServer, free_port
from structlog.testing import capture_logs

from lunamon._secrets import Secret
from lunamon._validation import INT64_MAX, INT64_MIN
from lunamon.errors import BatchTooLarge, SinkError
from lunamon.monitoring import Monitoring
from lunamon.point import Point, encode_lines
from lunamon.settings import MonitoringSettings
from lunamon.sinks._http import classify_response
from lunamon.sinks.influxdb import InfluxDBSink

T0 = 1_700_000_000_123_456_789  # ns precision must survive

Stored = tuple[str, int, dict[str, str], dict[str, Any]]


def typed(rows: Sequence[Stored] | Sequence[Point]) -> list[tuple[Any, ...]]:
    """Rows comparable with their field types (1 == 1.0 == True in Python)."""
    out = []
    for series, time_ns, tags, fields in rows:
        typed_fields = {k: (type(v).__name__, v) for k, v in fields.items()}
        out.append((series, time_ns, dict(tags), typed_fields))
    return sorted(out, key=lambda row: (row[0], row[1], sorted(row[2].items())))


@pytest.fixture
def db() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def sink_for(
    influxd: InfluxServer,
) -> AsyncIterator[Callable[..., InfluxDBSink]]:
    """Make InfluxDBSinks (default: the plain influxd); all are closed after the test."""
    made: list[InfluxDBSink] = []

    def make(database: str, server: InfluxServer = influxd, **options: Any) -> InfluxDBSink:
        sink = InfluxDBSink(server.host, server.port, database, **options)
        made.append(sink)
        return sink

    yield make
    for sink in made:
        await sink.close()


# --------------------------------------------------------------------------- round trip


def escaping_matrix() -> list[Point]:
    specials = [",", " ", "=", '"', "\\", "\\\\", "ü€😀", "a=b,c d", "é\\ñ"]
    points = []
    t = T0
    for index, special in enumerate(specials):
        text = f"x{special}y"
        case = str(index)
        points += [
            Point(f"esc_series_{text}", t, {"case": case}, {"f": 1.0}),
            Point("esc_tag_key", t + 1, {f"k{text}": "v", "case": case}, {"f": 1.0}),
            Point("esc_tag_value", t + 2, {"k": text, "case": case}, {"f": 1.0}),
            Point("esc_field_key", t + 3, {"case": case}, {f"f{text}": 1.0}),
            Point("esc_string", t + 4, {"case": case}, {"s": text}),
        ]
        t += 10
    for index, text in enumerate(
        [
            "line1\nline2",
            "crlf\r\nend",
            "\n",
            "trailing backslash \\",
            '\\"',
            'quote at end"',
            "",
            "tab\tand nul-free ✓",
        ]
    ):
        points.append(
            Point("esc_string_more", T0 + 1000 + index, {"case": str(index)}, {"s": text})
        )
    return points


async def test_escaping_matrix_round_trip(
    influxd: InfluxServer, sink_for: Callable[..., InfluxDBSink], db: str
) -> None:
    points = escaping_matrix()
    sink = sink_for(db)
    await sink.start()
    await sink.write(points)
    assert typed(influxd.stored(db)) == typed(points)


async def test_field_types_and_timestamps_round_trip(
    influxd: InfluxServer, sink_for: Callable[..., InfluxDBSink], db: str
) -> None:
    tags: dict[str, str | int] = {
        "service": "luna-handlers",
        "route": "POST:/extractor",
        "status_code": 200,
    }
    points = [
        Point(
            "request",
            T0 + i,
            tags,
            {
                "request_id": f"1700000000,{uuid.uuid4()}",
                "execution_time": 0.0 if i == 0 else 1 / 3 + i,
                "count": [0, INT64_MAX, INT64_MIN + 1, -1][i],
                "ok": i % 2 == 0,
                "big": [1e300, 5e-324, -2.5, 1.0][i],
            },
        )
        for i in range(4)
    ]
    sink = sink_for(db)
    await sink.start()
    await sink.write(points)
    stored = influxd.stored(db)
    assert typed(stored) == typed(points)
    assert stored[0][2]["status_code"] == "200"  # tags are strings
    assert influxd.field_types("request", db) == {
        "request_id": "string",
        "execution_time": "float",
        "count": "integer",
        "ok": "boolean",
        "big": "float",
    }


async def test_identical_points_at_distinct_ns_are_all_stored(
    influxd: InfluxServer, sink_for: Callable[..., InfluxDBSink], db: str
) -> None:
    points = [Point("request", T0 + i, {"route": "GET:/"}, {"v": 1.0}) for i in range(2000)]
    sink = sink_for(db)
    await sink.write(points)  # without start(): the session and database come lazily
    rows = influxd.rows('SELECT count("v") FROM "request"', db)
    assert rows[0]["count"] == 2000


async def test_gzip_round_trip(
    influxd: InfluxServer, sink_for: Callable[..., InfluxDBSink], db: str
) -> None:
    points = [Point("gz", T0 + i, {"k": "ü"}, {"s": "x" * 100, "i": i}) for i in range(3000)]
    sink = sink_for(db, gzip=True)
    await sink.start()
    await sink.write(points)
    assert typed(influxd.stored(db)) == typed(points)


async def test_tag_value_backslash_before_separator_is_stored_as_the_point_holds_it(
    influxd: InfluxServer, sink_for: Callable[..., InfluxDBSink], db: str
) -> None:
    # lunamon's sanitiser adds a backslash to an odd run before , = or space; influxd
    # then stores exactly what the Point holds (not the raw input).
    points = [
        Point("bs", T0 + i, {"k": raw, "case": str(i)}, {"f": 1.0})
        for i, raw in enumerate(["a\\,b", "a\\ b", "a\\=b"])
    ]
    assert [p.tags["k"] for p in points] == ["a\\\\,b", "a\\\\ b", "a\\\\=b"]
    sink = sink_for(db)
    await sink.write(points)
    assert typed(influxd.stored(db)) == typed(points)


async def test_tag_value_with_trailing_backslash_is_stored(
    influxd: InfluxServer, sink_for: Callable[..., InfluxDBSink], db: str
) -> None:
    """1.6.7 rejects any tag value ending in a backslash: the sanitiser strips them."""
    point = Point("trail", T0, {"k": "x\\"}, {"f": 1.0})
    sink = sink_for(db)
    await sink.write([point])
    assert typed(influxd.stored(db)) == typed([point])


STORED, REFUSED = "stored", "refused"


@pytest.mark.parametrize("where", ["tag key", "field key"])
@pytest.mark.parametrize(
    ("key", "outcome"),
    [
        ("k\\", REFUSED),  # a trailing backslash: 1.x cannot store it
        ("k\\\\", REFUSED),  # two: the same
        ("k\\,x", REFUSED),  # an odd run before a separator
        ("k\\\\\\=x", REFUSED),
        ("k\\x", STORED),  # a backslash elsewhere is stored as given
        ("k\\\\x", STORED),
        ("k\\\\,x", STORED),  # an even run before a separator
        ("k\\\\ x", STORED),
        ("k\\\\=x", STORED),
        ("k,x y=z", STORED),  # separators alone are escaped
    ],
)
async def test_key_with_backslashes_is_stored_or_refused_as_the_policy_says(
    influxd: InfluxServer,
    sink_for: Callable[..., InfluxDBSink],
    db: str,
    where: str,
    key: str,
    outcome: str,
) -> None:
    def make() -> Point:
        if where == "tag key":
            return Point("m", T0, {key: "v"}, {"f": 1.0})
        return Point("m", T0, None, {key: 1.0})

    if outcome == REFUSED:
        with pytest.raises(ValueError, match="backslash"):
            make()  # refused up front, with a clear error
        return
    point = make()
    sink = sink_for(db)
    await sink.write([point])
    stored = influxd.stored(db)
    assert typed(stored) == typed([point])
    assert key in (stored[0][2] if where == "tag key" else stored[0][3])


@pytest.mark.parametrize(
    ("series", "outcome"),
    [
        ("m\\\\,x", REFUSED),  # any backslash before a separator: 1.x garbles it
        ("m\\\\=x", REFUSED),
        ("m\\\\ x", REFUSED),
        ("m\\,x", REFUSED),
        ("m\\\\", REFUSED),  # trailing backslashes
        ("m\\", REFUSED),
        ("m\\x", STORED),  # backslashes elsewhere are stored as given
        ("m\\\\x", STORED),
        ("m,x", STORED),  # separators without a backslash are escaped
        ("m x", STORED),
        ("m=x", STORED),
    ],
)
async def test_series_with_backslashes_is_stored_or_refused_as_the_policy_says(
    influxd: InfluxServer,
    sink_for: Callable[..., InfluxDBSink],
    db: str,
    series: str,
    outcome: str,
) -> None:
    if outcome == REFUSED:
        with pytest.raises(ValueError, match="backslash"):
            Point(series, T0, {"k": "v"}, {"f": 1.0})  # refused up front, with a clear error
        return
    point = Point(series, T0, {"k": "v"}, {"f": 1.0})
    sink = sink_for(db)
    await sink.write([point])
    stored = influxd.stored(db)
    assert typed(stored) == typed([point])
    assert stored[0][0] == series


async def test_victoria_metrics_v1_write_endpoint(victoria_metrics: VictoriaMetricsServer) -> None:
    series = f"v1vm_{uuid.uuid4().hex[:10]}"
    now = time.time_ns()
    sink = InfluxDBSink(victoria_metrics.host, victoria_metrics.port, "vmdb")
    try:
        await sink.start()
        await sink.write([Point(series, now, {"k": "v w"}, {"f": 1.5, "i": 3})])
    finally:
        await sink.close()
    exported = victoria_metrics.export(f'{{__name__=~"{series}_.*"}}', expect=2)
    got = {item["metric"]["__name__"]: item for item in exported}
    assert got[f"{series}_f"]["metric"] == {"__name__": f"{series}_f", "db": "vmdb", "k": "v w"}
    assert got[f"{series}_f"]["values"] == [1.5]
    assert got[f"{series}_i"]["values"] == [3]
    assert got[f"{series}_f"]["timestamps"] == [now // 1_000_000]


# --------------------------------------------------------------------------- database creation


async def test_start_creates_the_database(
    influxd: InfluxServer, sink_for: Callable[..., InfluxDBSink], db: str
) -> None:
    sink = sink_for(db)
    await sink.start()
    assert db in influxd.databases()


async def test_no_database_is_created_when_not_allowed(
    influxd: InfluxServer, sink_for: Callable[..., InfluxDBSink], db: str
) -> None:
    sink = sink_for(db, create_database=False)
    await sink.start()
    assert db not in influxd.databases()
    with pytest.raises(SinkError) as caught:
        await sink.write([Point("m", T0, None, {"f": 1.0})])
    assert caught.value.status == 404
    assert not caught.value.retryable
    assert "database not found" in str(caught.value)


async def test_database_dropped_while_running_is_created_again_and_the_batch_retried(
    influxd: InfluxServer, sink_for: Callable[..., InfluxDBSink], db: str
) -> None:
    sink = sink_for(db)
    await sink.start()
    await sink.write([Point("m", T0, None, {"f": 1.0})])
    assert sink.events == {"database_recreated": 0}  # created at start: not an event
    influxd.drop_database(db)
    with capture_logs() as logs:
        await sink.write([Point("m", T0 + 1, None, {"f": 2.0})])
        await sink.write([Point("m", T0 + 2, None, {"f": 3.0})])
    assert influxd.stored(db) == [("m", T0 + 1, {}, {"f": 2.0}), ("m", T0 + 2, {}, {"f": 3.0})]
    assert sink.events == {"database_recreated": 1}
    assert [(e["event"], e["log_level"], e["database"]) for e in logs] == [
        ("influxdb_database_recreated", "warning", db)
    ]
    assert "written to it before are lost" in logs[0]["consequence"]


async def test_a_database_that_is_missing_and_cannot_be_created_is_no_recreation(
    influxd_auth: InfluxServer, sink_for: Callable[..., InfluxDBSink]
) -> None:
    """A reader may not create it: the 404 stands, nothing is counted or warned about."""
    missing = f"t_{uuid.uuid4().hex[:12]}"
    sink = sink_for(
        missing,
        server=influxd_auth,
        username=influxd_auth.reader_user,
        password=influxd_auth.reader_password,
    )
    with capture_logs() as logs:
        await sink.start()
        with pytest.raises(SinkError) as caught:
            await sink.write([Point("m", T0, None, {"f": 1.0})])
    assert caught.value.status == 404
    assert sink.events == {"database_recreated": 0}
    assert "influxdb_database_recreated" not in [e["event"] for e in logs]


async def test_a_404_answered_after_another_part_created_the_database_creates_it_once() -> None:
    """Two parts sent before the database came back, one answered 404 only after the
    other's creation: the late one retries its part, it creates nothing more."""
    created = asyncio.Event()
    creations: list[int] = []

    class Scripted(InfluxDBSink):
        async def _post(self, body: bytes) -> None:
            if not created.is_set():
                if body == b"late":
                    await created.wait()  # answered after the creation
                raise classify_response(404, "database not found", {}, what="w", secrets=())

        async def _create_database(self) -> None:
            creations.append(1)
            created.set()

    sink = Scripted("127.0.0.1", 1, "db")
    sink._need_database = False  # as after start()
    await asyncio.gather(sink.send(b"late"), sink.send(b"early"))
    assert creations == [1]
    assert sink.events == {"database_recreated": 1}


def _request(i: int) -> Point:
    return Point(
        "request",
        T0 + i * 10_000,
        {"service": "svc", "route": "GET:/x", "status_code": "200"},
        {"execution_time": 0.001, "request_id": str(i)},
    )


async def _delivered(monitoring: Monitoring) -> dict[str, Any]:
    """Flush until nothing is buffered (30 s at most); the sink's stats."""
    deadline = time.monotonic() + 30
    while True:
        await monitoring.flush()
        (stats,) = monitoring.stats().values()
        if not stats["buffered"]:
            return stats
        assert time.monotonic() < deadline, stats
        await asyncio.sleep(0.01)


def _stored_ids(server: InfluxServer, db: str) -> list[str]:
    return [row["request_id"] for row in server.rows('SELECT "request_id" FROM "request"', db)]


async def test_a_database_dropped_between_writes_loses_only_what_it_held(
    influxd: InfluxServer, db: str
) -> None:
    """RELIABILITY 41 through the flusher, batches of 3 concurrent parts all answered
    404: one creation, one warning, counter 1, every later point stored, none dropped."""
    settings = MonitoringSettings(batch_size=3000, flush_interval=60.0, retry_base_delay=0.01)
    monitoring = Monitoring(settings, [InfluxDBSink(influxd.host, influxd.port, db)])
    await monitoring.start()
    try:
        for i in range(3000):
            monitoring.emit(_request(i))
        await _delivered(monitoring)
        influxd.drop_database(db)
        with capture_logs() as logs:
            for i in range(3000, 9000):
                monitoring.emit(_request(i))
            stats = await _delivered(monitoring)
    finally:
        await monitoring.close()
    assert stats["events"] == {"database_recreated": 1}
    assert (stats["emitted"], stats["written"], sum(stats["dropped"].values())) == (9000, 9000, 0)
    assert sorted(_stored_ids(influxd, db), key=int) == [str(i) for i in range(3000, 9000)]
    warnings = [e for e in logs if e["event"] == "influxdb_database_recreated"]
    assert [(e["log_level"], e["database"]) for e in warnings] == [("warning", db)]


async def test_a_database_dropped_under_traffic_keeps_every_later_point(
    influxd: InfluxServer, db: str
) -> None:
    """RELIABILITY 41 under traffic: points flow while another client drops the database.
    Only points stored before the drop are gone; every point emitted after it is stored
    once; the drop is warned about once and counted once."""
    settings = MonitoringSettings(batch_size=200, flush_interval=0.02, retry_base_delay=0.01)
    monitoring = Monitoring(settings, [InfluxDBSink(influxd.host, influxd.port, db)])
    await monitoring.start()
    dropped_after = -1
    try:
        with capture_logs() as logs:
            for i in range(4000):
                monitoring.emit(_request(i))
                if i % 100 == 99:
                    await asyncio.sleep(0.002)  # traffic: the delivery task writes meanwhile
                if i == 1500:
                    await asyncio.to_thread(influxd.drop_database, db)
                    dropped_after = i
            stats = await _delivered(monitoring)
    finally:
        await monitoring.close()
    stored = [int(i) for i in _stored_ids(influxd, db)]
    assert len(stored) == len(set(stored))
    assert set(range(dropped_after + 1, 4000)) <= set(stored) <= set(range(4000))
    assert stats["events"] == {"database_recreated": 1}
    assert (stats["emitted"], stats["written"], sum(stats["dropped"].values())) == (4000, 4000, 0)
    warnings = [e for e in logs if e["event"] == "influxdb_database_recreated"]
    assert len(warnings) == 1


async def test_server_down_at_start_database_created_before_first_write(
    influxd_factory: Callable[..., InfluxServer], db: str
) -> None:
    server = influxd_factory()
    server.kill()
    sink = InfluxDBSink(server.host, server.port, db, timeout=2.0)
    try:
        with capture_logs() as logs:
            await sink.start()  # must not raise
        assert any(e["event"] == "influxdb_create_database_failed" for e in logs)
        with pytest.raises(SinkError) as caught:
            await sink.write([Point("m", T0, None, {"f": 1.0})])
        assert caught.value.retryable
        server.start()
        await sink.write([Point("m", T0 + 1, None, {"f": 2.0})])
        assert server.stored(db) == [("m", T0 + 1, {}, {"f": 2.0})]
    finally:
        await sink.close()


async def test_server_killed_and_restarted_mid_run(
    influxd_factory: Callable[..., InfluxServer], db: str
) -> None:
    server = influxd_factory()
    sink = InfluxDBSink(server.host, server.port, db, timeout=2.0)
    try:
        await sink.start()
        await sink.write([Point("m", T0, None, {"f": 1.0})])
        server.kill()
        with pytest.raises(SinkError) as caught:
            await sink.write([Point("m", T0 + 1, None, {"f": 2.0})])
        assert caught.value.retryable
        server.start()
        await sink.write([Point("m", T0 + 1, None, {"f": 2.0})])  # the retried batch
    finally:
        await sink.close()
    assert server.stored(db) == [("m", T0, {}, {"f": 1.0}), ("m", T0 + 1, {}, {"f": 2.0})]


# --------------------------------------------------------------------------- failures


async def test_partial_write_is_not_retryable_and_the_good_lines_are_stored(
    influxd: InfluxServer, sink_for: Callable[..., InfluxDBSink], db: str
) -> None:
    sink = sink_for(db)
    await sink.start()
    first = Point("m", T0, {"k": "v"}, {"f": 0.5})
    await sink.write([first])  # "f" is a float from now on
    good = [Point("m", T0 + i, {"k": "v"}, {"f": float(i)}) for i in range(1, 4)]
    conflict = Point("m", T0 + 10, {"k": "v"}, {"f": 7})  # integer after float
    with pytest.raises(SinkError) as caught:
        await sink.write([good[0], conflict, good[1], good[2]])
    error = caught.value
    assert error.status == 400
    assert not error.retryable
    assert "partial write" in str(error)
    assert "field type conflict" in error.server_text
    assert typed(influxd.stored(db)) == typed([first, *good])
    # later batches flow
    await sink.write([Point("m", T0 + 20, {"k": "v"}, {"f": 9.0})])
    assert len(influxd.stored(db)) == 5


async def test_unparsable_line_is_a_partial_write(
    influxd: InfluxServer, sink_for: Callable[..., InfluxDBSink], db: str
) -> None:
    good = [Point("m", T0 + i, None, {"f": 1.0}) for i in range(2)]
    # trusted: no sanitiser, so the tag keeps a trailing backslash, which influxd cannot parse
    unparsable = Point.trusted("m", T0 + 5, {"k": "x\\"}, {"f": 1.0})
    sink = sink_for(db)
    with pytest.raises(SinkError) as caught:
        await sink.write([good[0], unparsable, good[1]])
    assert caught.value.status == 400
    assert "partial write: unable to parse" in str(caught.value)
    assert "dropped=0" in caught.value.server_text  # 1.6.7 does not count parse errors
    assert typed(influxd.stored(db)) == typed(good)


async def test_type_conflict_inside_one_batch_on_a_new_field_rejects_the_whole_batch(
    influxd: InfluxServer, sink_for: Callable[..., InfluxDBSink], db: str
) -> None:
    # Observed on 1.6.7: not a partial write; nothing of the batch is stored.
    sink = sink_for(db)
    batch = [
        Point("m", T0, None, {"f": 0.5}),
        Point("m", T0 + 1, None, {"f": 7}),
        Point("m", T0 + 2, None, {"f": 1.5}),
    ]
    with pytest.raises(SinkError) as caught:
        await sink.write(batch)
    assert caught.value.status == 400
    assert not caught.value.retryable
    assert caught.value.server_text == "field type conflict"
    assert influxd.stored(db) == []


async def test_unknown_retention_policy_is_not_retryable(
    influxd: InfluxServer, sink_for: Callable[..., InfluxDBSink], db: str
) -> None:
    sink = sink_for(db, retention_policy="no_such_rp")
    await sink.start()
    with pytest.raises(SinkError) as caught:
        await sink.write([Point("m", T0, None, {"f": 1.0})])
    assert caught.value.status == 500
    assert not caught.value.retryable
    assert "retention policy not found" in str(caught.value)


async def test_retention_policy_is_used(
    influxd: InfluxServer, sink_for: Callable[..., InfluxDBSink], db: str
) -> None:
    influxd.create_database(db)
    influxd.query(f'CREATE RETENTION POLICY "short" ON "{db}" DURATION 1h REPLICATION 1', db)
    sink = sink_for(db, retention_policy="short")
    now = time.time_ns()
    await sink.write([Point("m", now, None, {"f": 1.0})])
    assert influxd.rows('SELECT "f" FROM "short"."m"', db) == [{"time": now, "f": 1}]
    assert influxd.rows('SELECT "f" FROM "autogen"."m"', db) == []


async def test_body_over_max_body_size_is_batch_too_large(
    influxd_small_body: InfluxServer, sink_for: Callable[..., InfluxDBSink], db: str
) -> None:
    sink = sink_for(db, server=influxd_small_body)
    await sink.start()
    big = [Point("m", T0 + i, {"route": "POST:/extractor"}, {"v": 1.5}) for i in range(100)]
    assert len(encode_lines(big)) > 2000
    with pytest.raises(BatchTooLarge) as caught:
        await sink.write(big)
    assert caught.value.status == 413
    assert not caught.value.retryable
    # a batch under the limit passes, and gzip counts compressed bytes
    await sink.write(big[:5])
    zipped = sink_for(db, server=influxd_small_body, gzip=True)
    await zipped.write(big)
    assert len(influxd_small_body.stored(db)) == 100


async def test_connection_refused_is_retryable_and_start_does_not_raise(db: str) -> None:
    sink = InfluxDBSink("127.0.0.1", free_port(), db, timeout=2.0)
    try:
        await sink.start()
        with pytest.raises(SinkError) as caught:
            await sink.write([Point("m", T0, None, {"f": 1.0})])
        assert caught.value.retryable
        assert caught.value.status is None
    finally:
        await sink.close()


async def test_write_after_close_is_not_retryable(
    sink_for: Callable[..., InfluxDBSink], db: str
) -> None:
    sink = sink_for(db)
    await sink.start()
    await sink.close()
    with pytest.raises(SinkError) as caught:
        await sink.write([Point("m", T0, None, {"f": 1.0})])
    assert not caught.value.retryable


# --------------------------------------------------------------------------- auth


async def test_auth_admin_writes_and_creates_the_database(
    influxd_auth: InfluxServer, sink_for: Callable[..., InfluxDBSink], db: str
) -> None:
    sink = sink_for(
        db,
        server=influxd_auth,
        username=influxd_auth.admin_user,
        password=influxd_auth.admin_password,
    )
    await sink.start()
    await sink.write([Point("m", T0, {"k": "v"}, {"f": 1.0})])
    assert influxd_auth.stored(db) == [("m", T0, {"k": "v"}, {"f": 1.0})]


async def test_missing_credentials_401(
    influxd_auth: InfluxServer, sink_for: Callable[..., InfluxDBSink]
) -> None:
    sink = sink_for(influxd_auth.auth_db, server=influxd_auth, create_database=False)
    with pytest.raises(SinkError) as caught:
        await sink.write([Point("m", T0, None, {"f": 1.0})])
    assert caught.value.status == 401
    assert not caught.value.retryable
    assert "unable to parse authentication credentials" in caught.value.server_text


async def test_wrong_password_401_never_shows_the_password(
    influxd_auth: InfluxServer, sink_for: Callable[..., InfluxDBSink]
) -> None:
    password = "Wr0ng-Pa55w0rd-x9"
    sink = sink_for(influxd_auth.auth_db, server=influxd_auth, username="admin", password=password)
    with capture_logs() as logs:
        await sink.start()  # CREATE DATABASE refused: logged, not raised
        with pytest.raises(SinkError) as caught:
            await sink.write([Point("m", T0, None, {"f": 1.0})])
    error = caught.value
    assert error.status == 401
    assert not error.retryable
    assert password not in str(error)
    assert password not in repr(error)
    assert password not in "".join(traceback.format_exception(error))
    assert password not in repr(logs)
    assert logs  # the refused CREATE DATABASE was logged


async def test_read_only_user_403(
    influxd_auth: InfluxServer, sink_for: Callable[..., InfluxDBSink]
) -> None:
    sink = sink_for(
        influxd_auth.auth_db,
        server=influxd_auth,
        username=influxd_auth.reader_user,
        password=influxd_auth.reader_password,
    )
    with capture_logs() as logs:
        await sink.start()  # CREATE DATABASE needs admin: 403 logged, not raised
    assert [e["event"] for e in logs] == ["influxdb_create_database_failed"]
    assert "requires admin privilege" in logs[0]["error"]
    with pytest.raises(SinkError) as caught:
        await sink.write([Point("m", T0, None, {"f": 1.0})])
    assert caught.value.status == 403
    assert not caught.value.retryable
    assert "not authorized to write" in caught.value.server_text


async def test_password_never_in_repr_str_or_attributes() -> None:
    password = "S3cr3t-P4ss-zz"
    sink = InfluxDBSink("127.0.0.1", 8086, "db", username="luna", password=password)
    for text in (repr(sink), str(sink), repr(vars(sink)), repr(sink._authorization)):
        assert password not in text
    assert "luna" in repr(sink)
    assert "'***'" in repr(sink)
    assert repr(Secret(password)) == "'***'"
    await sink.close()


async def test_connection_error_with_credentials_never_shows_them(db: str) -> None:
    password = "An0ther-S3cret-q"
    sink = InfluxDBSink("127.0.0.1", free_port(), db, username="u", password=password)
    try:
        await sink.start()
        with pytest.raises(SinkError) as caught:
            await sink.write([Point("m", T0, None, {"f": 1.0})])
        assert password not in "".join(traceback.format_exception(caught.value))
        assert caught.value.__cause__ is None
    finally:
        await sink.close()


def test_plain_credentials_to_another_host_need_consent() -> None:
    with pytest.raises(ValueError, match="allow_plain_credentials"):
        InfluxDBSink("10.20.30.40", username="luna", password="pw")
    InfluxDBSink("10.20.30.40", username="luna", password="pw", ssl=True)
    InfluxDBSink("localhost", username="luna", password="pw")
    InfluxDBSink("::1", username="luna", password="pw")


async def test_plain_credentials_allowed_are_logged_as_a_warning() -> None:
    sink = InfluxDBSink(
        "10.20.30.40",
        username="luna",
        password="pw-xyz-123",
        create_database=False,
        allow_plain_credentials=True,
    )
    with capture_logs() as logs:
        await sink.start()
    await sink.close()
    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("influxdb_plain_credentials", "warning")
    ]
    assert "pw-xyz-123" not in repr(logs)


def test_constructor_checks_and_defaults() -> None:
    sink = InfluxDBSink()
    assert sink.name == "influxdb"
    assert sink.url == "http://localhost:8086"
    assert sink.database == "luna_monitoring"
    assert sink.timeout == 10.0
    assert InfluxDBSink(name="primary").name == "primary"
    assert InfluxDBSink("::1", 8087).url == "http://[::1]:8087"
    with pytest.raises(ValueError, match="port"):
        InfluxDBSink(port=0)
    with pytest.raises(ValueError, match="timeout"):
        InfluxDBSink(timeout=0)
    with pytest.raises(ValueError, match="username"):
        InfluxDBSink(password="x")


async def test_a_body_over_one_megabyte_is_sent_without_a_warning(
    influxd: InfluxServer, sink_for: Callable[..., InfluxDBSink], db: str
) -> None:
    # aiohttp warns (ResourceWarning) about raw bytes bodies over 1 MB; under
    # filterwarnings=error that warning would reject the batch.
    points = [
        Point("big", T0 + i, {"route": "POST:/x"}, {"request_id": "r" * 200, "f": float(i)})
        for i in range(5000)
    ]
    assert len(encode_lines(points)) > 2**20
    sink = sink_for(db)
    await sink.write(points)
    assert influxd.rows('SELECT count("f") FROM "big"', db)[0]["count"] == 5000
