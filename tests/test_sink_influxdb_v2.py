"""InfluxDBV2Sink against a real victoria-metrics (its /api/v2/write), and its headers
and error classification against the fake server."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

import pytest
from servers import FakeInfluxServer, FakeResponse, VictoriaMetricsServer, free_port

from lunamon.errors import SinkError
from lunamon.lineprotocol import parse_line_protocol
from lunamon.point import Point
from lunamon.sinks.influxdb_v2 import InfluxDBV2Sink

TOKEN = "t0ken-Sup3r-s3cret-v2"

Key = tuple[str, frozenset[tuple[str, str]]]


def expected_samples(points: Sequence[Point], unit_ms: bool = True) -> dict[Key, list[Any]]:
    """What victoria-metrics keeps of ``points``: numeric fields as ``<series>_<field>``
    series labelled with the tags, timestamps in milliseconds."""
    out: dict[Key, list[Any]] = {}
    for point in points:
        for key, value in point.fields.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name = f"{point.series}_{key}"
            out.setdefault((name, frozenset(point.tags.items())), []).append(
                [point.time_ns // 1_000_000, value]
            )
    return out


def exported_samples(series: list[dict[str, Any]]) -> dict[Key, list[Any]]:
    out: dict[Key, list[Any]] = {}
    for item in series:
        labels = dict(item["metric"])
        name = labels.pop("__name__")
        pairs = [[t, v] for t, v in zip(item["timestamps"], item["values"], strict=True)]
        out[(name, frozenset(labels.items()))] = sorted(pairs)
    return out


def make_points(series: str, count: int) -> list[Point]:
    now_ms = time.time_ns() // 1_000_000 - 60_000
    return [
        Point(
            series,
            (now_ms + i) * 1_000_000 + 123_456,
            {"route": "POST:/handlers/{handlerId}/events", "k": ["a b,c=d", "ü€"][i % 2]},
            {
                "execution_time": 0.25 + i,
                "count": i * 1000,
                "request_id": "1700000000,abc",  # a string: not kept by victoria-metrics
            },
        )
        for i in range(count)
    ]


async def test_numeric_fields_round_trip(victoria_metrics: VictoriaMetricsServer) -> None:
    series = f"v2rt_{uuid.uuid4().hex[:10]}"
    points = make_points(series, 6)
    expected = expected_samples(points)
    sink = InfluxDBV2Sink(victoria_metrics.url, "org", "bucket", TOKEN)
    try:
        await sink.start()
        await sink.write(points)
    finally:
        await sink.close()
    exported = victoria_metrics.export(f'{{__name__=~"{series}_.*"}}', expect=len(expected) + 2)
    got = exported_samples(exported)
    for key in expected:
        assert got[key] == sorted(expected[key])
    # request_id (a string) arrives as 0, as SERVERS.md says
    strings = [pairs for (name, _), pairs in got.items() if name.endswith("_request_id")]
    assert strings
    assert {value for pairs in strings for _, value in pairs} == {0}


async def test_gzip_and_ms_precision_round_trip(victoria_metrics: VictoriaMetricsServer) -> None:
    series = f"v2gz_{uuid.uuid4().hex[:10]}"
    points = make_points(series, 4)
    expected = expected_samples(points)
    sink = InfluxDBV2Sink(victoria_metrics.url, "org", "bucket", "", precision="ms", gzip=True)
    try:
        await sink.write(points)
    finally:
        await sink.close()
    got = exported_samples(
        victoria_metrics.export(f'{{__name__=~"{series}_(execution_time|count)"}}', expect=4)
    )
    assert got == {key: sorted(pairs) for key, pairs in expected.items()}


async def test_request_shape_token_header_and_gzip(fake_influx: FakeInfluxServer) -> None:
    points = make_points("shape", 3)
    sink = InfluxDBV2Sink(fake_influx.url + "/prefix/", "my org", "b/1", TOKEN, gzip=True)
    try:
        await sink.write(points)
    finally:
        await sink.close()
    (request,) = fake_influx.requests
    assert request.method == "POST"
    assert request.path == "/prefix/api/v2/write"
    assert request.query == {"org": "my org", "bucket": "b/1", "precision": "ns"}
    assert request.headers["Authorization"] == f"Token {TOKEN}"
    assert request.headers["Content-Encoding"] == "gzip"
    assert TOKEN not in json.dumps(request.query)
    # aiohttp's server decodes the body; the wire had the compressed size
    assert int(request.headers["Content-Length"]) < len(request.body)
    assert parse_line_protocol(request.body.decode()) == points


async def test_precision_rescales_timestamps(fake_influx: FakeInfluxServer) -> None:
    point = Point("m", 1_700_000_000_987_654_321, None, {"f": 1.0})
    for precision, expected in [("us", 1_700_000_000_987_654), ("s", 1_700_000_000)]:
        sink = InfluxDBV2Sink(fake_influx.url, "o", "b", "", precision=precision)
        try:
            await sink.write([point])
        finally:
            await sink.close()
        request = fake_influx.requests[-1]
        assert request.query["precision"] == precision
        assert "Authorization" not in request.headers
        assert parse_line_protocol(request.body.decode())[0].time_ns == expected


@pytest.mark.parametrize(
    ("status", "body", "headers", "retryable", "retry_after", "text"),
    [
        (400, '{"code":"invalid","message":"partial write error (2 written)"}', {}, False, None,
         "partial write error (2 written)"),
        (401, '{"code":"unauthorized","message":"unauthorized access"}', {}, False, None,
         "unauthorized access"),
        (404, '{"code":"not found","message":"bucket \\"b\\" not found"}', {}, False, None,
         'bucket "b" not found'),
        (429, "", {"Retry-After": "12"}, True, 12.0, ""),
        (503, '{"code":"unavailable","message":"write buffer full"}', {"Retry-After": "3"},
         True, 3.0, "write buffer full"),
    ],
)  # fmt: skip
async def test_v2_errors_are_classified(
    fake_influx: FakeInfluxServer,
    status: int,
    body: str,
    headers: dict[str, str],
    retryable: bool,
    retry_after: float | None,
    text: str,
) -> None:
    fake_influx.program(FakeResponse(status, body, headers))
    sink = InfluxDBV2Sink(fake_influx.url, "o", "b", TOKEN)
    try:
        with pytest.raises(SinkError) as caught:
            await sink.write([Point("m", 1, None, {"f": 1.0})])
    finally:
        await sink.close()
    error = caught.value
    assert (error.status, error.retryable, error.retry_after) == (status, retryable, retry_after)
    assert error.server_text == text
    assert TOKEN not in str(error)


async def test_connection_refused_is_retryable() -> None:
    sink = InfluxDBV2Sink(f"http://127.0.0.1:{free_port()}", "o", "b", TOKEN, timeout=2.0)
    try:
        await sink.start()
        with pytest.raises(SinkError) as caught:
            await sink.write([Point("m", 1, None, {"f": 1.0})])
    finally:
        await sink.close()
    assert caught.value.retryable
    assert TOKEN not in str(caught.value)


def test_token_never_in_repr_or_attributes() -> None:
    sink = InfluxDBV2Sink("https://influx.example:8086", "org", "bucket", TOKEN)
    for text in (repr(sink), str(sink), repr(vars(sink))):
        assert TOKEN not in text
    assert "token='***'" in repr(sink)
    assert sink.name == "influxdb_v2"
    assert InfluxDBV2Sink("http://127.0.0.1", "o", "b", "t", name="vm").name == "vm"


def test_constructor_checks() -> None:
    with pytest.raises(ValueError, match="http"):
        InfluxDBV2Sink("ftp://h", "o", "b", "t")
    with pytest.raises(ValueError, match="credentials"):
        InfluxDBV2Sink("http://user:pw@h", "o", "b", "t")
    with pytest.raises(ValueError, match="precision"):
        InfluxDBV2Sink("http://h", "o", "b", "t", precision="m")
    with pytest.raises(ValueError, match="bucket"):
        InfluxDBV2Sink("http://h", "o", "", "t")


def test_a_token_over_plain_http_to_another_host_needs_consent() -> None:
    # Only constructed: no request is made to the (unresolvable) host.
    with pytest.raises(ValueError, match="allow_plain_credentials"):
        InfluxDBV2Sink("http://influx.example:8086", "org", "bucket", "tok3n-s3cret")
    sink = InfluxDBV2Sink(
        "http://influx.example:8086", "org", "bucket", "tok3n-s3cret", allow_plain_credentials=True
    )
    assert "tok3n" not in repr(sink)
    InfluxDBV2Sink("http://127.0.0.1:8086", "org", "bucket", "tok3n-s3cret")  # loopback: fine
