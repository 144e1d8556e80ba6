"""The HTTP sinks' overlap of encoding and sending: InfluxDB batches sent as parts while
the next part is encoded, ClickHouse rows streamed (chunked) while they are encoded,
the row templates, and the gzip level. Each test fails on a deliberate bug in that code:
a part or chunk boundary dropping or duplicating a point, a retry resending what was
stored, the compression level ignored, a chunked body refused or cut into a shorter
insert."""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import orjson
import pytest
from _rel_support import assert_invariant, eventually
from hypothesis import given, settings
from hypothesis import strategies as st
from servers import ClickHouseServer, FakeInfluxServer, FakeResponse, InfluxServer
from structlog.testing import capture_logs

import lunamon
from lunamon import Point
from lunamon.errors import BatchTooLarge, SinkError
from lunamon.point import encode_lines
from lunamon.sinks import _http
from lunamon.sinks import clickhouse as ch
from lunamon.sinks._http import StreamedBody
from lunamon.sinks.clickhouse import ClickHouseSink, encode_rows
from lunamon.sinks.influxdb import InfluxDBSink
from lunamon.sinks.influxdb_v2 import InfluxDBV2Sink
from lunamon.sinks.registry import create_sink

T0 = 1_700_000_000_123_456_789


def seed(n: int, series: str = "request", start: int = T0) -> list[Point]:
    """``n`` request-like points, every request id distinct."""
    return [
        Point(
            series,
            start + i,
            {"service": "s", "route": f"POST:/r{i % 3}", "status_code": str(200 + i % 2)},
            {"request_id": f"id-{i}", "execution_time": i / 7, "step_time": 0.5},
        )
        for i in range(n)
    ]


@pytest.fixture
def db() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def every_step_a_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Streamed bodies cut after every 25 points: many chunk boundaries per batch."""
    monkeypatch.setattr(_http, "_SLICE_SECONDS", 0.0)


async def chunks_of(body: StreamedBody) -> list[bytes]:
    return [chunk async for chunk in body]


# --------------------------------------------------------------------------- row templates

_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
_key = st.sampled_from(["a", "b", "status_code", "x%sy", 'q"k', "t\\k", "é"]) | _text.filter(bool)
_field_value = (
    st.floats(allow_nan=False, allow_infinity=False)
    | st.integers(-(2**63), 2**63 - 1)
    | st.booleans()
    | _text
)
_tag_value = _text.filter(bool) | st.integers(-1000, 1000).map(str) | st.just("9223372036854775808")
# Kinds of points (tags, fields, the time column's scale), as a batch mixes them.
_row_kinds = st.lists(
    st.tuples(
        st.dictionaries(_key, _tag_value, max_size=3),
        st.dictionaries(_key, _field_value, min_size=1, max_size=4),
        st.sampled_from([None, 0, 3, 9]),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(_row_kinds)
def test_templates_give_the_reference_text(
    kinds: list[tuple[dict[str, str], dict[str, Any], int | None]],
) -> None:
    """Every row from a template equals the row built from the point's parts, also when
    the same keys come back with other types (an int where a float was)."""
    for tags, fields, scale in kinds:
        column = ch._TimeColumn(scale)
        points = [Point.trusted("request", T0 + i, tags, fields) for i in range(2)]
        expected = "".join(ch._row(p, column) for p in points).encode()
        assert ch._rows_from_templates(points, column) == expected
        assert ch._rows_from_templates(points, column) == expected  # the template remembered


def _typed_row(line: bytes) -> tuple[object, list[tuple[str, str, str]]]:
    """A row as (time, data's members in order with their JSON types and exact values)."""
    row = json.loads(line)
    assert list(row) == ["time", "data"]
    data = json.loads(row["data"])
    return row["time"], [(k, type(v).__name__, repr(v)) for k, v in data.items()]


@settings(max_examples=300, deadline=None)
@given(_row_kinds)
def test_orjson_rows_hold_the_reference_data(
    kinds: list[tuple[dict[str, str], dict[str, Any], int | None]],
) -> None:
    """orjson's rows (the fast path) hold exactly the reference rows' data: the same
    members in the same order, the same JSON types, the same numbers (a float may be
    spelled otherwise: ``0.00001`` for ``1e-05``)."""
    for tags, fields, scale in kinds:
        column = ch._TimeColumn(scale)
        points = [Point.trusted("request", T0 + i, tags, fields) for i in range(2)]
        rows = ch._rows_from_orjson(points, column, orjson).splitlines(keepends=True)
        assert len(rows) == len(points)
        for row, point in zip(rows, points, strict=True):
            assert row.endswith(b"}\n")
            assert row.count(b"\n") == 1
            assert _typed_row(row) == _typed_row(ch._row(point, column).encode())


def test_unrepresentable_values_fall_back_exactly(row_path: str) -> None:
    points = [
        Point.trusted("request", T0, {"k": "v"}, {"f": math.nan, "g": 1.5}),
        Point.trusted("request", T0 + 1, {"k": "v"}, {"f": -math.inf, "g": 2.5}),
        Point.trusted("request", T0 + 2, {"k": "v"}, {"f": 1e308 * 10, "s": 'x\\":nan'}),
        Point.trusted("request", T0 + 3, {"k": "v"}, {"s": 'a\\":nan'}),  # a look-alike
        Point("request", T0 + 4, {"k": "v"}, {"s": "lone \udc80"}),
    ]
    for point in points:
        rows = encode_rows([point]).decode()
        reference = ch._row(point, ch._NANOSECONDS)
        if point.fields.get("s") == "lone \udc80":
            reference = ch._row(point, ch._NANOSECONDS, ascii_only=True)
        assert rows == reference
        data = json.loads(json.loads(rows)["data"])
        assert all(not isinstance(v, float) or math.isfinite(v) for v in data.values())
    assert encode_rows(points) == b"".join(encode_rows([p]) for p in points)


# --------------------------------------------------------------------------- StreamedBody


@pytest.mark.parametrize("level", [None, 1, 6, 9])
async def test_a_streamed_body_is_the_whole_body_cut_inside_rows(
    every_step_a_chunk: None, level: int | None
) -> None:
    points = seed(1010)
    chunks = await chunks_of(StreamedBody(points, encode_rows, level))
    assert len(chunks) > 10
    whole = b"".join(chunks)
    if level is not None:
        # gzip's XFL byte: 4 = fastest (level 1), 2 = best (level 9), else 0
        assert whole[8] == {1: 4, 9: 2}.get(level, 0)
        assert whole[:2] == b"\x1f\x8b"
        assert whole[4:8] == b"\0\0\0\0"
        whole = gzip.decompress(whole)
    assert whole == encode_rows(points)  # nothing dropped or doubled at a boundary
    if level is None:
        for chunk in chunks[:-1]:
            assert not chunk.endswith(b"\n")
            assert not chunk.endswith(b"}")  # a cut body is never a shorter valid one


async def test_an_encoding_failure_is_kept_and_raised() -> None:
    calls = 0

    def failing(points: Sequence[Point]) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise TypeError("boom")
        return encode_rows(points)

    body = StreamedBody(seed(100), failing)
    with pytest.raises(TypeError, match="boom"):
        await chunks_of(body)
    assert isinstance(body.error, TypeError)
    assert isinstance(_http.transport_error(OSError("reset"), body, what="w"), TypeError)
    other = _http.transport_error(OSError("reset"), StreamedBody([], encode_rows), what="w")
    assert isinstance(other, SinkError)
    assert other.retryable


def test_compression_level_is_checked_everywhere() -> None:
    for bad in (0, 10, True, 1.0, "1"):
        with pytest.raises(ValueError, match="compression_level"):
            ClickHouseSink(compression_level=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="compression_level"):
            InfluxDBSink(compression_level=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="compression_level"):
            InfluxDBV2Sink("http://127.0.0.1:1", "o", "b", "", compression_level=bad)  # type: ignore[arg-type]
    assert ClickHouseSink().compression_level == 1
    assert InfluxDBSink(compression_level=9).compression_level == 9
    with pytest.raises(lunamon.errors.SettingsError, match="compression_level"):
        create_sink("clickhouse", {"compression_level": "fast"})
    assert create_sink("influxdb", {"compression_level": 5}).compression_level == 5  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- ClickHouse


@pytest.fixture
async def ch_sink(clickhouse: ClickHouseServer) -> AsyncIterator[Callable[..., ClickHouseSink]]:
    made: list[ClickHouseSink] = []

    def make(database: str, url: str = clickhouse.url, **options: Any) -> ClickHouseSink:
        options.setdefault("timeout", 5.0)
        sink = ClickHouseSink(url, database, **options)
        made.append(sink)
        return sink

    yield make
    for sink in made:
        await sink.close()


@pytest.mark.parametrize("gzip_on", [True, False])
async def test_clickhouse_streams_every_point_exactly_once(
    clickhouse: ClickHouseServer,
    ch_sink: Callable[..., ClickHouseSink],
    db: str,
    every_step_a_chunk: None,
    gzip_on: bool,
) -> None:
    points = seed(2000) + seed(30, "error")
    sink = ch_sink(db, gzip=gzip_on, compression_level=9)
    await sink.write(points)
    for table in ("request", "error"):
        rows = await asyncio.to_thread(clickhouse.data, db, table)
        assert [t for t, _ in rows] == [p.time_ns for p in points if p.series == table]
        ids = [data["request_id"] for _, data in rows]
        assert len(ids) == len(set(ids))


async def test_clickhouse_body_is_chunked_and_gzipped_at_the_level(
    ch_sink: Callable[..., ClickHouseSink], db: str
) -> None:
    async with RawServer() as server:
        sink = ch_sink(db, url=server.url, create_tables=False, compression_level=9)
        await sink.write(seed(300))
        insert = server.requests[-1]
        assert insert["headers"]["Transfer-Encoding"] == "chunked"
        assert "Content-Length" not in insert["headers"]
        assert insert["headers"]["Content-Encoding"] == "gzip"
        assert insert["body"][8] == 2  # XFL: level 9
        assert gzip.decompress(insert["body"]) == encode_rows(seed(300))


async def test_a_refused_chunked_body_is_sent_whole_from_then_on(
    ch_sink: Callable[..., ClickHouseSink], db: str
) -> None:
    async with FakeInfluxServer(default=FakeResponse(200)) as fake:
        fake.program(
            FakeResponse(200),  # system.columns: no time column known
            FakeResponse(411, "Length Required"),
        )
        sink = ch_sink(db, url=fake.url, create_tables=False)
        with capture_logs() as logs:
            await sink.write(seed(10))
            await sink.write(seed(10, start=T0 + 100))
        inserts = [r for r in fake.requests if "INSERT" in r.query.get("query", "")]
        assert [r.headers.get("Transfer-Encoding") for r in inserts] == ["chunked", None, None]
        assert [r.body for r in inserts[1:]] == [
            encode_rows(seed(10)),
            encode_rows(seed(10, start=T0 + 100)),
        ]
        assert [e["event"] for e in logs].count("clickhouse_chunked_body_refused") == 1
        assert not sink.stream


async def test_the_whole_body_after_a_411_holds_every_point_of_a_big_batch(
    clickhouse: ClickHouseServer, ch_sink: Callable[..., ClickHouseSink], db: str
) -> None:
    """The audit's planted bug: bodies encoded whole are built 100 points at a time; a
    batch of 250 (three chunks) must arrive whole, and the server must store it all."""
    points = seed(250)
    async with FakeInfluxServer(default=FakeResponse(200)) as fake:
        fake.program(FakeResponse(200), FakeResponse(411, "Length Required"))
        sink = ch_sink(db, url=fake.url, create_tables=False, gzip=False)
        await sink.write(points)
        inserts = [r for r in fake.requests if "INSERT" in r.query.get("query", "")]
        assert inserts[-1].body == encode_rows(points)
    real = ch_sink(db)
    real.stream = False  # as after a 411
    await real.start()
    await real.write(points)
    assert clickhouse.count(db, "request") == 250


async def test_a_stream_cut_off_mid_body_stores_nothing(
    clickhouse: ClickHouseServer,
    ch_sink: Callable[..., ClickHouseSink],
    db: str,
    every_step_a_chunk: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """18.16 commits a body that ends at a row boundary (the connection closed there):
    the chunks of a stream never do, so a write that breaks off stores nothing."""
    sink = ch_sink(db, gzip=False)
    await sink.start()
    errors = clickhouse.root / "log" / "err.log"
    logged = errors.stat().st_size if errors.exists() else 0
    calls = 0

    def encode_then_fail(points: Sequence[Point], time_column: Any = ch._NANOSECONDS) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 5:  # 4 chunks of whole rows (~400 KB) are on the wire
            raise RuntimeError("encoder broke")
        return encode_rows(points, time_column)

    big = [
        Point("request", T0 + i, {"k": "v"}, {"request_id": f"{i}-" + "x" * 4000})
        for i in range(500)
    ]
    monkeypatch.setattr(ch, "encode_rows", encode_then_fail)
    with pytest.raises(RuntimeError, match="encoder broke"):  # not a connection error
        await sink.write(big)

    def settled() -> bool:  # the server refused the cut body, or (the bug) stored a part
        text = errors.read_bytes()[logged:] if errors.exists() else b""
        return b"<Error> HTTPHandler" in text or clickhouse.count(db, "request") > 0

    await eventually(settled, what="the server's answer to the cut body")
    assert clickhouse.count(db, "request") == 0


# --------------------------------------------------------------------------- InfluxDB parts


@pytest.fixture
async def influx_sink(influxd: InfluxServer) -> AsyncIterator[Callable[..., InfluxDBSink]]:
    made: list[InfluxDBSink] = []

    def make(database: str, port: int = influxd.port, **options: Any) -> InfluxDBSink:
        sink = InfluxDBSink("127.0.0.1", port, database, **options)
        made.append(sink)
        return sink

    yield make
    for sink in made:
        await sink.close()


def lines_of(bodies: list[bytes]) -> list[bytes]:
    return [line for body in bodies for line in body.splitlines()]


async def test_a_batch_goes_in_parts_every_line_once(
    fake_influx: FakeInfluxServer, influx_sink: Callable[..., InfluxDBSink], db: str
) -> None:
    points = seed(2500)
    sink = influx_sink(db, port=fake_influx.port, create_database=False)
    await sink.write(points)
    bodies = [r.body for r in fake_influx.requests]
    assert [len(b.splitlines()) for b in bodies] == [1000, 1000, 500]
    assert sorted(lines_of(bodies)) == sorted(encode_lines(points).splitlines())


async def test_a_retry_sends_only_the_parts_not_stored(
    fake_influx: FakeInfluxServer, influx_sink: Callable[..., InfluxDBSink], db: str
) -> None:
    points = seed(2500)
    sink = influx_sink(db, port=fake_influx.port, create_database=False)
    fake_influx.program(FakeResponse(204), FakeResponse(503, "overloaded"), FakeResponse(204))
    with pytest.raises(SinkError) as caught:
        await sink.write(points)
    assert caught.value.retryable
    assert caught.value.pending == points[1000:2000]  # the flusher retries only those
    first = len(fake_influx.requests)
    await sink.write(caught.value.pending)
    again = [r.body for r in fake_influx.requests[first:]]
    assert sorted(lines_of(again)) == sorted(encode_lines(points[1000:2000]).splitlines())


async def test_a_refused_part_leaves_the_others_stored_and_counted(
    influxd: InfluxServer, influx_sink: Callable[..., InfluxDBSink], db: str
) -> None:
    sink = influx_sink(db)
    await sink.write([Point("m", T0 - 1, {"k": "v"}, {"f": 0.5})])  # f is a float
    batch = [Point("m", T0 + i, {"k": "v"}, {"f": float(i), "n": i}) for i in range(2500)]
    batch[1500] = Point("m", T0 + 1500, {"k": "v"}, {"f": 7})  # int: conflict, part 2
    settings_ = lunamon.MonitoringSettings(service="s", batch_size=2500, flush_interval=60.0)
    monitoring = lunamon.Monitoring(settings_, [sink])
    await monitoring.start()
    try:
        for point in batch:
            monitoring.emit(point)
        await monitoring.flush()
        stats = monitoring.stats()
        assert_invariant(stats)
        assert stats["influxdb"]["written"] == 1500  # parts 1 and 3
        assert stats["influxdb"]["dropped"]["rejected"] == 1000
    finally:
        await monitoring.close()
    # parts 1 and 3 whole, and part 2's good lines (a partial write stores them)
    count = influxd.rows('SELECT count("f") FROM "m"', db)[0]["count"]
    assert count == 1 + 2499


async def test_a_413_on_a_part_splits_the_batch(
    fake_influx: FakeInfluxServer, influx_sink: Callable[..., InfluxDBSink], db: str
) -> None:
    sink = influx_sink(db, port=fake_influx.port, create_database=False)
    fake_influx.program(FakeResponse(204), FakeResponse(413, "too large"))
    points = seed(2000)
    with pytest.raises(BatchTooLarge) as caught:
        await sink.write(points)
    assert caught.value.pending == points[1000:]  # the flusher splits only those


async def test_a_refused_part_and_a_retryable_one_retry_both_then_refuse_one(
    fake_influx: FakeInfluxServer, influx_sink: Callable[..., InfluxDBSink], db: str
) -> None:
    """One part stored, one refused (400), one answered 503: the error is retryable and
    both unstored parts are pending (the 503 part is not dropped with the refused one);
    the retry stores one and refuses the other, which alone is pending then."""
    sink = influx_sink(db, port=fake_influx.port, create_database=False)
    fake_influx.program(
        FakeResponse(204),
        FakeResponse(400, '{"error":"partial write: field type conflict"}'),
        FakeResponse(503, "overloaded"),
        FakeResponse(400, '{"error":"partial write: field type conflict"}'),
        FakeResponse(204),
    )
    points = seed(3000)
    with pytest.raises(SinkError) as caught:
        await sink.write(points)
    assert caught.value.retryable
    first = caught.value.pending
    assert first is not None
    assert len(first) == 2000
    with pytest.raises(SinkError) as again:
        await sink.write(first)
    assert not again.value.retryable
    assert again.value.pending is not None
    assert len(again.value.pending) == 1000
    assert len(fake_influx.requests) == 5


async def test_a_stored_part_is_counted_written_at_once_and_never_sent_again(
    fake_influx: FakeInfluxServer, influx_sink: Callable[..., InfluxDBSink], db: str
) -> None:
    """Through the flusher: part 1 stored, part 2 answered 503; stats count part 1 written
    before the retry, and the retry (the stored part left out) sends part 2 only."""
    sink = influx_sink(db, port=fake_influx.port, create_database=False)
    fake_influx.program(FakeResponse(204), FakeResponse(503, "overloaded"), FakeResponse(204))
    points = seed(2000)
    settings_ = lunamon.MonitoringSettings(
        service="s", batch_size=4000, flush_interval=60.0, retry_base_delay=30.0
    )  # no batch completes: only flush() writes
    monitoring = lunamon.Monitoring(settings_, [sink])
    await monitoring.start()
    try:
        for point in points:
            monitoring.emit(point)
        await monitoring.flush()
        stats = monitoring.stats()["influxdb"]
        assert_invariant(monitoring.stats())
        assert (stats["written"], stats["buffered"]) == (1000, 1000)
        await monitoring.flush()
        assert monitoring.stats()["influxdb"]["written"] == 2000
    finally:
        await monitoring.close()
    bodies = [r.body for r in fake_influx.requests]
    assert sorted(lines_of(bodies)) == sorted(
        encode_lines(points).splitlines() + encode_lines(points[1000:]).splitlines()
    )


async def test_a_down_server_gets_no_more_parts(influx_sink: Callable[..., InfluxDBSink]) -> None:
    from servers import free_port

    sink = influx_sink("db", port=free_port(), create_database=False, timeout=2.0)
    encoded: list[int] = []
    real = sink.encode

    async def counting(batch: list[Point]) -> bytes:
        encoded.append(len(batch))
        await asyncio.sleep(0.05)  # the refused connection of part 1 is seen meanwhile
        return await real(batch)

    sink.encode = counting  # type: ignore[method-assign]
    with pytest.raises(SinkError) as caught:
        await sink.write(seed(5000))
    assert caught.value.retryable
    assert len(encoded) < 5


async def test_parts_are_gzipped_at_the_level(
    influx_sink: Callable[..., InfluxDBSink], db: str
) -> None:
    points = seed(1500)
    async with RawServer(status=204) as server:
        port = int(server.url.rsplit(":", 1)[1])
        sink = influx_sink(db, port=port, create_database=False, gzip=True, compression_level=9)
        await sink.write(points)
        bodies = sorted((r["body"] for r in server.requests), key=len, reverse=True)
        assert bodies == [
            gzip.compress(encode_lines(points[:1000]), 9, mtime=0),
            gzip.compress(encode_lines(points[1000:]), 9, mtime=0),
        ]


async def test_v2_sink_sends_parts_too(fake_influx: FakeInfluxServer) -> None:
    sink = InfluxDBV2Sink(fake_influx.url, "o", "b", "", precision="us")
    try:
        points = seed(1200)
        await sink.write(points)
        assert [len(r.body.splitlines()) for r in fake_influx.requests] == [1000, 200]
        times = sorted(
            int(line.rsplit(b" ", 1)[1])
            for line in lines_of([r.body for r in fake_influx.requests])
        )
        assert times == [p.time_ns // 1000 for p in points]
    finally:
        await sink.close()


async def test_a_cancelled_write_leaves_no_request_behind(
    influx_sink: Callable[..., InfluxDBSink],
) -> None:
    async with FakeInfluxServer(["hang", "hang"]) as fake:
        sink = influx_sink("db", port=fake.port, create_database=False)
        write = asyncio.ensure_future(sink.write(seed(2000)))
        await eventually(lambda: len(fake.requests) == 2, what="both parts sent")
        write.cancel()
        with pytest.raises(asyncio.CancelledError):
            await write
        assert all(task.done() for task in asyncio.all_tasks() if "send" in repr(task))


# --------------------------------------------------------------------------- a raw server


class RawServer:
    """An aiohttp server that records request headers and bodies as sent (no gzip
    decoding), answering ``status``."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.requests: list[dict[str, Any]] = []
        self.url = ""
        self._runner: Any = None

    async def __aenter__(self) -> RawServer:
        from aiohttp import web

        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            self.requests.append({"headers": dict(request.headers), "body": body})
            return web.Response(status=self.status)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        self._runner = web.AppRunner(app, access_log=None, auto_decompress=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()


def test_zlib_stream_matches_gzip_decoding() -> None:
    """The streamed gzip member is what ``Content-Encoding: gzip`` readers expect."""
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
    data = compressor.compress(b"abc\n" * 1000) + compressor.flush()
    assert gzip.decompress(data) == b"abc\n" * 1000
