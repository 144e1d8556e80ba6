"""Catalogue 1-16 end to end: the demo service (``create_app``) monitored by lunamon, with
real sinks talking to real servers (influxd, or the fake server for faults influxd cannot
make), while the sink fails in every way RELIABILITY.md lists.

Each test checks the per-sink invariant ``emitted == written + sum(dropped) + buffered``
and that the service answered every request normally.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from _rel_support import (
    SEED_PATHS,
    ClientFactory,
    assert_invariant,
    assert_served,
    drive,
    eventually,
    fast_policy,
    new_db,
    stored_request_ids,
    stored_rows,
)
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from servers import HANG, FakeInfluxServer, FakeResponse, InfluxServer, free_port
from structlog.testing import capture_logs

import lunamon.point
from lunamon import MONITORING_KEY, Monitoring, Point
from lunamon.demo.service import create_app
from lunamon.lineprotocol import parse_line_protocol
from lunamon.sinks.influxdb import InfluxDBSink
from lunamon.sinks.memory import MemorySink
from lunamon.sinks.plugin import BaseRequestMonitoringPlugin, PluginSink

HERE = Path(__file__).parent


class CountingInfluxDBSink(InfluxDBSink):
    """InfluxDBSink that counts its write attempts and how many run at once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.attempts = 0
        self.in_flight = 0
        self.max_in_flight = 0

    async def write(self, points: Sequence[Point]) -> None:
        self.attempts += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await super().write(points)
        finally:
            self.in_flight -= 1


def stats_of(monitoring: Monitoring, name: str = "influxdb") -> dict[str, Any]:
    stats = monitoring.stats()
    assert_invariant(stats)
    return stats[name]


def fake_sink(server: FakeInfluxServer, **options: Any) -> CountingInfluxDBSink:
    return CountingInfluxDBSink(server.host, server.port, "db", create_database=False, **options)


def write_requests(server: FakeInfluxServer) -> list[Any]:
    return [r for r in server.requests if r.path == "/write"]


def lines_of(server: FakeInfluxServer) -> list[Point]:
    return [p for r in write_requests(server) for p in parse_line_protocol(r.body.decode())]


# --------------------------------------------------------------------------- 1, 2: down, killed


async def test_1_sink_down_at_start_then_up_all_arrive_once(
    aiohttp_client: ClientFactory, influxd_factory: Callable[..., InfluxServer]
) -> None:
    server = influxd_factory()
    server.kill()
    db = new_db()
    app = create_app(
        sinks=[InfluxDBSink(server.host, server.port, db, timeout=2.0)], **fast_policy()
    )
    monitoring = app[MONITORING_KEY]
    client = await aiohttp_client(app)
    answers = await drive(client, 60, monitoring=monitoring)
    assert_served(answers)
    await eventually(lambda: stats_of(monitoring)["retries"] >= 2, what="retries while down")
    stats = stats_of(monitoring)
    assert (stats["written"], stats["buffered"], sum(stats["dropped"].values())) == (0, 60, 0)

    await asyncio.to_thread(server.start)
    await eventually(lambda: stats_of(monitoring)["written"] == 60, what="all written")
    await client.close()
    ids = await stored_request_ids(server, db)
    assert sorted(ids) == sorted(a.request_id for a in answers)  # all there, none twice
    assert stats_of(monitoring)["dropped"] == dict.fromkeys(stats["dropped"], 0)


async def test_2_sink_killed_and_restarted_mid_run(
    aiohttp_client: ClientFactory, influxd_factory: Callable[..., InfluxServer]
) -> None:
    server = influxd_factory()
    db = new_db()
    bound = 400
    policy = fast_policy(buffer_size=bound, batch_size=50)
    app = create_app(sinks=[InfluxDBSink(server.host, server.port, db, timeout=1.0)], **policy)
    monitoring = app[MONITORING_KEY]
    client = await aiohttp_client(app)
    buffered: list[int] = []
    sampling = True

    async def sample() -> None:
        while sampling:
            buffered.append(stats_of(monitoring)["buffered"])
            await asyncio.sleep(0.002)

    sampler = asyncio.create_task(sample())
    before = await drive(client, 100, monitoring=monitoring)
    await eventually(lambda: stats_of(monitoring)["written"] == 100, what="phase 1 written")

    # SIGKILL while requests are being served and written
    traffic = asyncio.create_task(drive(client, 300, concurrency=2, monitoring=monitoring))
    await eventually(lambda: stats_of(monitoring)["emitted"] >= 130, what="traffic flowing")
    server.kill()
    during = await traffic
    assert stats_of(monitoring)["buffered"] > 0
    await asyncio.to_thread(server.start)
    after = await drive(client, 100, monitoring=monitoring)
    await eventually(lambda: stats_of(monitoring)["written"] == 500, what="all written")
    sampling = False
    await sampler
    await client.close()

    answers = before + during + after
    assert_served(answers)
    assert max(buffered) <= bound
    stats = stats_of(monitoring)
    assert stats["retries"] >= 1
    assert sum(stats["dropped"].values()) == 0
    ids = await stored_request_ids(server, db)
    assert sorted(ids) == sorted(a.request_id for a in answers)


# --------------------------------------------------------------------------- 3: hung sink


@pytest.mark.parametrize(
    ("sink_timeout", "write_timeout"),
    [(0.3, 60.0), (60.0, 0.3)],
    ids=["sink-timeout", "flusher-write-timeout"],
)
async def test_3_hung_sink_times_out_one_write_in_flight_latency_unchanged(
    aiohttp_client: ClientFactory,
    fake_influx: FakeInfluxServer,
    sink_timeout: float,
    write_timeout: float,
) -> None:
    baseline_client = await aiohttp_client(create_app(sinks=[]))
    baseline = [a.seconds for a in await drive(baseline_client, 40, concurrency=1)]

    fake_influx.default = HANG
    sink = fake_sink(fake_influx, timeout=sink_timeout)
    app = create_app(sinks=[sink], **fast_policy(write_timeout=write_timeout))
    monitoring = app[MONITORING_KEY]
    client = await aiohttp_client(app)
    answers: list[Any] = []
    while sink.attempts < 3 or len(answers) < 40:  # requests keep coming while writes hang
        answers += await drive(client, 5, concurrency=1, monitoring=monitoring)
        assert len(answers) < 5_000, "the write timeout never fired"
        await asyncio.sleep(0.01)  # pace the traffic, not a wait for a result
    assert_served(answers)
    stats = stats_of(monitoring)
    assert stats["written"] == 0
    assert stats["buffered"] == len(answers)
    assert stats["retries"] >= 2  # each hung attempt timed out and was retried
    assert sink.max_in_flight == 1
    # every attempt reached the server (the last one may still be on its way)
    assert sink.attempts - 1 <= len(write_requests(fake_influx)) <= sink.attempts
    # handler latency: no request waits for the hung sink
    assert max(a.seconds for a in answers) < 1.0
    assert statistics.median(a.seconds for a in answers) < max(
        10 * statistics.median(baseline), 0.05
    )

    fake_influx.default = FakeResponse(204)
    await eventually(lambda: stats_of(monitoring)["written"] == len(answers), what="delivered")
    await client.close()
    delivered = {p.fields["request_id"] for p in lines_of(fake_influx)}
    assert delivered == {a.request_id for a in answers}
    assert sink.max_in_flight == 1


# --------------------------------------------------------------------------- 4, 5: 5xx, 429


async def test_4_server_errors_then_success_backoff_and_delivery(
    aiohttp_client: ClientFactory, fake_influx: FakeInfluxServer
) -> None:
    fake_influx.program(
        FakeResponse(500, '{"error":"engine: cache-max-memory-size exceeded"}'),
        FakeResponse(503, '{"error":"request throttled, queue full"}'),
        FakeResponse(502, "<html>bad gateway</html>"),
    )
    policy = fast_policy(
        flush_interval=30.0, batch_size=20, retry_base_delay=0.05, retry_max_delay=0.4
    )
    app = create_app(sinks=[fake_sink(fake_influx)], **policy)
    monitoring = app[MONITORING_KEY]
    client = await aiohttp_client(app)
    with capture_logs() as logs:
        answers = await drive(client, 20, monitoring=monitoring)
        await eventually(lambda: stats_of(monitoring)["written"] == 20, what="delivered")
    assert_served(answers)
    stats = stats_of(monitoring)
    assert stats["retries"] == 3
    attempts = write_requests(fake_influx)
    assert len(attempts) == 4
    assert len({r.body for r in attempts}) == 1  # the same batch, same timestamps: idempotent
    gaps = [b.time - a.time for a, b in itertools.pairwise(attempts)]
    for attempt, gap in enumerate(gaps, 1):  # jitter stays in the upper half of the cap
        assert gap >= min(0.4, 0.05 * 2 ** (attempt - 1)) / 2
    warnings = [e for e in logs if e["event"] == "sink_write_failed"]
    assert len(warnings) == 1  # rate-limited
    assert "HTTP 500" in warnings[0]["error"]
    await client.close()


async def test_4_retry_budget_exhausted_is_counted_then_later_batches_flow(
    aiohttp_client: ClientFactory, fake_influx: FakeInfluxServer
) -> None:
    fake_influx.default = FakeResponse(500, "internal error")
    policy = fast_policy(
        flush_interval=30.0,
        batch_size=10,
        max_retries=2,
        retry_base_delay=0.01,
        retry_max_delay=0.02,
    )
    app = create_app(sinks=[fake_sink(fake_influx)], **policy)
    monitoring = app[MONITORING_KEY]
    client = await aiohttp_client(app)
    with capture_logs() as logs:
        first = await drive(client, 10, monitoring=monitoring)
        await eventually(
            lambda: stats_of(monitoring)["dropped"]["retry_exhausted"] == 10, what="exhausted"
        )
    assert len(write_requests(fake_influx)) == 3  # one attempt and two retries, no more
    assert any(e["event"] == "retry_budget_exhausted" for e in logs)
    fake_influx.default = FakeResponse(204)
    second = await drive(client, 10, monitoring=monitoring)
    await eventually(lambda: stats_of(monitoring)["written"] == 10, what="later batch")
    await client.close()
    assert_served(first + second)
    assert {p.fields["request_id"] for p in lines_of(fake_influx)} >= {a.request_id for a in second}


def http_date_in(seconds: float) -> str:
    return email.utils.formatdate(time.time() + seconds, usegmt=True)


@pytest.mark.parametrize(
    ("retry_after", "retry_max_delay", "min_gap", "max_gap"),
    [
        (lambda: "1", 2.0, 0.95, 2.5),  # seconds: honoured
        (lambda: http_date_in(2), 5.0, 0.9, 2.5),  # HTTP date: honoured (1 s resolution)
        (lambda: "in a little while", 2.0, 0.005, 1.0),  # garbage: the normal backoff
        (lambda: "86400", 0.3, 0.3, 2.0),  # absurd: capped at retry_max_delay
    ],
    ids=["seconds", "http-date", "garbage", "huge"],
)
async def test_5_429_retry_after(
    aiohttp_client: ClientFactory,
    fake_influx: FakeInfluxServer,
    retry_after: Callable[[], str],
    retry_max_delay: float,
    min_gap: float,
    max_gap: float,
) -> None:
    fake_influx.program(FakeResponse(429, "slow down", {"Retry-After": retry_after()}))
    policy = fast_policy(
        flush_interval=30.0,
        batch_size=10,
        retry_base_delay=0.01,
        retry_max_delay=retry_max_delay,
    )
    app = create_app(sinks=[fake_sink(fake_influx)], **policy)
    monitoring = app[MONITORING_KEY]
    client = await aiohttp_client(app)
    answers = await drive(client, 10, monitoring=monitoring)
    await eventually(lambda: stats_of(monitoring)["written"] == 10, what="delivered after 429")
    await client.close()
    assert_served(answers)
    first, second = write_requests(fake_influx)
    assert first.body == second.body
    assert min_gap <= second.time - first.time <= max_gap
    assert stats_of(monitoring)["retries"] == 1


# --------------------------------------------------------------------------- 6, 7, 8: refused


async def test_6_partial_write_mixed_batch_rejected_good_points_stored(
    aiohttp_client: ClientFactory, influxd: InfluxServer
) -> None:
    db = new_db()
    influxd.create_database(db)
    # `match_policy_time` becomes an integer field in this shard: the points of
    # /handlers/{handlerId}/events (a float there) now conflict, /detector's do not.
    status, body = influxd.write(f"request,service=seed match_policy_time=1i {time.time_ns()}", db)
    assert status == 204, body
    app = create_app(
        sinks=[InfluxDBSink(influxd.host, influxd.port, db)],
        **fast_policy(flush_interval=30.0, batch_size=1000),
    )
    monitoring = app[MONITORING_KEY]
    client = await aiohttp_client(app)
    mixed = await drive(client, 20, paths=["/detector", "/handlers/h1/events"])
    with capture_logs() as logs:
        await monitoring.flush()  # one batch of 20: ten good, ten conflicting
    stats = stats_of(monitoring)
    assert stats["dropped"]["rejected"] == 20  # the batch is refused as a whole...
    assert stats["retries"] == 0  # ...and never retried
    rejected = [e for e in logs if e["event"] == "batch_rejected"]
    assert len(rejected) == 1
    assert "partial write" in rejected[0]["error"]
    assert "field type conflict" in rejected[0]["error"]
    rows = await stored_rows(influxd, 'SELECT "request_id", "route" FROM "request"', db)
    stored = {r["request_id"] for r in rows if r["route"]}
    # ...but influxd kept its good lines
    assert stored == {a.request_id for a in mixed if a.path == "/detector"}

    later = await drive(client, 5, paths=["/detector"])
    await monitoring.flush()
    assert stats_of(monitoring)["written"] == 5
    await client.close()
    assert_served(mixed + later)
    ids = await stored_request_ids(influxd, db)
    assert {a.request_id for a in later} <= set(ids)


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_7_unauthorized_forbidden_not_found_logged_once_no_hot_loop(
    aiohttp_client: ClientFactory,
    influxd: InfluxServer,
    influxd_auth: InfluxServer,
    status: int,
) -> None:
    if status == 401:
        server, db = influxd_auth, str(influxd_auth.auth_db)
        options: dict[str, Any] = {"username": "admin", "password": "Wr0ng-pw-for-401"}
        text = "authorization failed"
    elif status == 403:
        server, db = influxd_auth, str(influxd_auth.auth_db)
        options = {"username": influxd_auth.reader_user, "password": influxd_auth.reader_password}
        text = "not authorized to write"
    else:
        server, db = influxd, new_db()
        options = {"create_database": False}
        text = "database not found"
    sink = CountingInfluxDBSink(server.host, server.port, db, **options)
    app = create_app(sinks=[sink], **fast_policy(batch_size=5))
    monitoring = app[MONITORING_KEY]
    client = await aiohttp_client(app)
    with capture_logs() as logs:
        answers = await drive(client, 30, concurrency=1, monitoring=monitoring)
        await eventually(lambda: stats_of(monitoring)["dropped"]["rejected"] == 30, what="all")
    await client.close()
    assert_served(answers)
    stats = stats_of(monitoring)
    assert stats["retries"] == 0
    assert stats["written"] == 0
    # no hot loop: each batch was tried exactly once (6 or more batches of at most 5)
    assert 6 <= sink.attempts <= 30
    rejected = [e for e in logs if e["event"] == "batch_rejected"]
    assert len(rejected) == 1, rejected  # logged once, with the server's text
    assert rejected[0]["status"] == status
    assert text in rejected[0]["error"]


async def test_7_attempts_counted_at_the_server_for_401(
    aiohttp_client: ClientFactory, fake_influx: FakeInfluxServer
) -> None:
    fake_influx.default = FakeResponse(401, '{"error":"authorization failed"}')
    sink = fake_sink(fake_influx, username="luna", password="not-the-pw")
    app = create_app(sinks=[sink], **fast_policy(flush_interval=30.0, batch_size=5))
    monitoring = app[MONITORING_KEY]
    client = await aiohttp_client(app)
    answers = await drive(client, 25, concurrency=1, monitoring=monitoring)
    await monitoring.flush()
    await monitoring.flush()  # nothing left: no request
    await client.close()
    assert_served(answers)
    stats = stats_of(monitoring)
    assert (stats["dropped"]["rejected"], stats["retries"]) == (25, 0)
    # no hot loop: the server saw every point exactly once, in batches of at most 5
    attempts = write_requests(fake_influx)
    assert 5 <= len(attempts) <= 25
    sent = [p.fields["request_id"] for p in lines_of(fake_influx)]
    assert sorted(sent) == sorted(a.request_id for a in answers)


async def test_7_database_dropped_mid_run_is_created_again(
    aiohttp_client: ClientFactory, influxd: InfluxServer
) -> None:
    db = new_db()
    app = create_app(sinks=[InfluxDBSink(influxd.host, influxd.port, db)], **fast_policy())
    monitoring = app[MONITORING_KEY]
    client = await aiohttp_client(app)
    first = await drive(client, 10, monitoring=monitoring)
    await eventually(lambda: stats_of(monitoring)["written"] == 10, what="first written")
    await asyncio.to_thread(influxd.drop_database, db)
    second = await drive(client, 10, monitoring=monitoring)
    await eventually(lambda: stats_of(monitoring)["written"] == 20, what="second written")
    await client.close()
    assert_served(first + second)
    assert sorted(await stored_request_ids(influxd, db)) == sorted(a.request_id for a in second)


async def test_8_body_too_large_split_in_halves_single_oversized_point_dropped(
    aiohttp_client: ClientFactory, influxd_small_body: InfluxServer
) -> None:
    server, db = influxd_small_body, new_db()
    app = create_app(
        sinks=[InfluxDBSink(server.host, server.port, db)],
        **fast_policy(flush_interval=30.0, batch_size=64),
    )
    monitoring = app[MONITORING_KEY]
    client = await aiohttp_client(app)
    paths = [f"/handlers/handler-{i:04d}/events" for i in range(40)]
    answers = await drive(client, 40, paths=paths)
    huge = await drive(client, 1, paths=[f"/handlers/{'h' * 2500}/events"])  # one point > 2000 B
    with capture_logs() as logs:
        await monitoring.flush()
    await client.close()
    assert_served(answers + huge)
    stats = stats_of(monitoring)
    assert stats["written"] == 40
    assert stats["dropped"]["rejected"] == 1
    assert any(e["event"] == "point_too_large" for e in logs)
    ids = await stored_request_ids(server, db)
    assert sorted(ids) == sorted(a.request_id for a in answers)


# --------------------------------------------------------------------------- 9, 10, 11, 12


@pytest.mark.parametrize("failure", ["connection-refused", "dns-failure"])
async def test_9_unreachable_sink_is_transient_and_the_service_unaffected(
    aiohttp_client: ClientFactory, failure: str
) -> None:
    if failure == "connection-refused":
        host, port = "127.0.0.1", free_port()
    else:
        host, port = "no-such-host.invalid", 8086
    app = create_app(
        sinks=[InfluxDBSink(host, port, "db", timeout=2.0)],
        **fast_policy(shutdown_timeout=0.3),
    )
    monitoring = app[MONITORING_KEY]
    client = await aiohttp_client(app)
    with capture_logs() as logs:
        answers = await drive(client, 30, monitoring=monitoring)
        await eventually(lambda: stats_of(monitoring)["retries"] >= 2, what="retried")
    assert_served(answers)
    stats = stats_of(monitoring)
    assert (stats["written"], stats["buffered"], sum(stats["dropped"].values())) == (0, 30, 0)
    assert [e["event"] for e in logs if e["log_level"] in ("warning", "error")][:1] == [
        "sink_write_failed"
    ]
    await client.close()
    assert stats_of(monitoring)["dropped"]["shutdown"] == 30


async def test_9_sink_down_under_sustained_traffic_retries_follow_the_backoff(
    aiohttp_client: ClientFactory,
) -> None:
    policy = fast_policy(
        batch_size=10, retry_base_delay=0.05, retry_max_delay=0.2, shutdown_timeout=0.2
    )
    sink = CountingInfluxDBSink("127.0.0.1", free_port(), "db", timeout=1.0)
    app = create_app(sinks=[sink], **policy)
    monitoring = app[MONITORING_KEY]
    client = await aiohttp_client(app)
    answers: list[Any] = []
    started = time.monotonic()
    while time.monotonic() - started < 2.0:  # traffic never stops while the sink is down
        answers += await drive(client, 50, concurrency=8, monitoring=monitoring)
    elapsed = time.monotonic() - started
    attempts = sink.attempts
    await client.close()
    assert_served(answers)
    # waits are at least half their cap: 0.025, 0.05, then 0.1 s each (retry_max_delay 0.2)
    assert attempts <= 3 + elapsed / 0.1 + 2, attempts


async def test_9_long_outage_beyond_1024_attempts_then_recovery(
    influxd_factory: Callable[..., InfluxServer],
) -> None:
    server = influxd_factory()
    server.kill()
    db = new_db()
    policy = fast_policy(max_retries=100_000, retry_base_delay=0.0005, retry_max_delay=0.0005)
    app = create_app(sinks=[InfluxDBSink(server.host, server.port, db, timeout=1.0)], **policy)
    monitoring = app[MONITORING_KEY]
    client = TestClient(TestServer(app))  # not the fixture: its teardown would close again
    await client.start_server()
    try:
        answers = await drive(client, 10, monitoring=monitoring)
        progress = {"retries": -1, "since": time.monotonic()}

        def long_outage_or_stalled() -> bool:
            retries, now = stats_of(monitoring)["retries"], time.monotonic()
            if retries != progress["retries"]:
                progress.update(retries=retries, since=now)
            return retries > 1100 or now - progress["since"] > 1.0

        with capture_logs():
            await eventually(long_outage_or_stalled, timeout=30, what="a long outage")
        assert stats_of(monitoring)["retries"] > 1100, "the delivery task stopped retrying"
        await asyncio.to_thread(server.start)
        await eventually(lambda: stats_of(monitoring)["written"] == 10, what="delivered")
        await client.close()  # the app's cleanup: must not raise
    finally:
        with contextlib.suppress(Exception):
            await client.close()
    assert_served(answers)
    assert sorted(await stored_request_ids(server, db)) == sorted(a.request_id for a in answers)


async def test_10_graceful_shutdown_with_the_sink_up_drains_everything(
    aiohttp_client: ClientFactory, influxd: InfluxServer
) -> None:
    db = new_db()
    app = create_app(
        sinks=[InfluxDBSink(influxd.host, influxd.port, db)],
        **fast_policy(flush_interval=30.0, batch_size=1000, buffer_size=5000),
    )
    monitoring = app[MONITORING_KEY]
    client = await aiohttp_client(app)
    answers = await drive(client, 300, concurrency=8, monitoring=monitoring)
    assert stats_of(monitoring)["written"] == 0  # nothing went out before the shutdown
    await client.close()  # the app's cleanup drains
    assert_served(answers)
    stats = stats_of(monitoring)
    assert (stats["written"], stats["buffered"]) == (300, 0)
    assert sorted(await stored_request_ids(influxd, db)) == sorted(a.request_id for a in answers)


@pytest.mark.parametrize("failure", ["connection-refused", "hung"])
async def test_11_graceful_shutdown_with_the_sink_down_respects_the_deadline(
    aiohttp_client: ClientFactory, fake_influx: FakeInfluxServer, failure: str
) -> None:
    if failure == "hung":
        fake_influx.default = HANG
        sink = fake_sink(fake_influx, timeout=30.0)
    else:
        sink = CountingInfluxDBSink("127.0.0.1", free_port(), "db", create_database=False)
    shutdown_timeout = 0.5
    app = create_app(sinks=[sink], **fast_policy(shutdown_timeout=shutdown_timeout))
    monitoring = app[MONITORING_KEY]
    client = await aiohttp_client(app)
    answers = await drive(client, 30, monitoring=monitoring)
    await eventually(lambda: sink.attempts >= 1, what="a write attempt")
    started = time.monotonic()
    with capture_logs() as logs:
        await client.close()
    elapsed = time.monotonic() - started
    assert_served(answers)
    assert elapsed < shutdown_timeout + 1.5
    stats = stats_of(monitoring)
    assert stats["dropped"]["shutdown"] == 30
    assert stats["buffered"] == 0
    shutdown = [e for e in logs if e["event"] == "points_dropped_at_shutdown"]
    assert [e["count"] for e in shutdown] == [30]


async def test_12_emit_after_close_is_counted_never_raises(
    aiohttp_client: ClientFactory, fake_influx: FakeInfluxServer
) -> None:
    app = create_app(sinks=[fake_sink(fake_influx)], **fast_policy())
    monitoring = app[MONITORING_KEY]
    client = await aiohttp_client(app)
    answers = await drive(client, 5)
    await client.close()
    assert stats_of(monitoring)["written"] == 5
    requests_before = len(fake_influx.requests)
    # e.g. a background task of the service that outlives the app's cleanup
    monitoring.emit(Point("request", time.time_ns(), {"route": "late"}, {"f": 1.0}))
    await monitoring.flush()
    await monitoring.close()
    stats = stats_of(monitoring)
    assert stats["dropped"]["after_close"] == 1
    assert (stats["emitted"], stats["written"], stats["buffered"]) == (6, 5, 0)
    assert len(fake_influx.requests) == requests_before
    assert_served(answers)


# --------------------------------------------------------------------------- 13, 14: handlers


def spy_middlewares(app: web.Application) -> tuple[list[BaseException], list[BaseException]]:
    """Middlewares outside lunamon's and inside it: what each sees raised."""
    outer_seen: list[BaseException] = []
    inner_seen: list[BaseException] = []

    def spy(seen: list[BaseException]) -> Any:
        @web.middleware
        async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
            try:
                return await handler(request)  # type: ignore[no-any-return]
            except BaseException as exc:
                seen.append(exc)
                raise

        return middleware

    app.middlewares.insert(0, spy(outer_seen))
    app.middlewares.append(spy(inner_seen))
    return outer_seen, inner_seen


async def test_13_client_disconnect_recorded_once_as_499(
    aiohttp_client: ClientFactory, influxd: InfluxServer
) -> None:
    db = new_db()
    app = create_app(sinks=[InfluxDBSink(influxd.host, influxd.port, db)], **fast_policy())
    monitoring = app[MONITORING_KEY]
    outer_seen, inner_seen = spy_middlewares(app)
    client = await aiohttp_client(app)  # the test server cancels handlers of vanished clients
    with pytest.raises(asyncio.TimeoutError):
        await client.post("/detector?fail=hang", timeout=aiohttp.ClientTimeout(total=0.2))
    await eventually(lambda: stats_of(monitoring)["written"] == 2, what="499 points written")
    await client.close()
    assert [type(e) for e in outer_seen] == [asyncio.CancelledError]  # re-raised, not swallowed
    assert outer_seen == inner_seen
    requests = await stored_rows(influxd, 'SELECT "status_code", "request_id" FROM "request"', db)
    errors = await stored_rows(influxd, 'SELECT "error_code", "request_id" FROM "error"', db)
    assert [r["status_code"] for r in requests] == ["499"]
    assert [(e["error_code"], e["request_id"]) for e in errors] == [
        ("0", requests[0]["request_id"])
    ]
    assert stats_of(monitoring)["emitted"] == 2


@pytest.mark.parametrize(
    ("fail", "error_code"), [("raise", "1"), ("luna_exc", "10015")], ids=["plain", "luna"]
)
async def test_14_handler_raises_same_exception_and_points_recorded(
    aiohttp_client: ClientFactory, influxd: InfluxServer, fail: str, error_code: str
) -> None:
    db = new_db()
    app = create_app(sinks=[InfluxDBSink(influxd.host, influxd.port, db)], **fast_policy())
    monitoring = app[MONITORING_KEY]
    outer_seen, inner_seen = spy_middlewares(app)
    client = await aiohttp_client(app)
    response = await client.post(f"/extractor?fail={fail}")
    assert response.status == 500
    await eventually(lambda: stats_of(monitoring)["written"] == 2, what="points written")
    await client.close()
    assert len(inner_seen) == 1
    assert outer_seen[0] is inner_seen[0]  # the very exception the handler raised
    requests = await stored_rows(influxd, 'SELECT "status_code", "request_id" FROM "request"', db)
    errors = await stored_rows(influxd, 'SELECT "error_code", "request_id" FROM "error"', db)
    assert [r["status_code"] for r in requests] == ["500"]
    assert [(e["error_code"], e["request_id"]) for e in errors] == [
        (error_code, requests[0]["request_id"])
    ]


# --------------------------------------------------------------------------- 15: raising parts


class BrokenPlugin(BaseRequestMonitoringPlugin):
    """A LUNA plugin whose first initialize and every delivery fail."""

    def __init__(self, app: Any) -> None:
        super().__init__(app)
        self.initialized = 0
        self.calls = 0

    async def initialize(self) -> None:
        self.initialized += 1
        if self.initialized == 1:
            raise RuntimeError("plugin cannot connect")

    async def flushPointToMonitoring(self, point: Point, logger: Any) -> None:
        self.calls += 1
        raise RuntimeError("plugin bug")


class RaisingSink:
    """A user sink that raises from every method."""

    name = "raising"

    def __init__(self) -> None:
        self.writes = 0

    async def start(self) -> None:
        raise OSError("cannot start")

    async def write(self, points: Sequence[Point]) -> None:
        self.writes += 1
        raise ZeroDivisionError("sink bug")

    async def close(self) -> None:
        raise ValueError("cannot close")


async def test_15_raising_sink_plugin_and_error_code_getter_alongside_a_healthy_sink(
    aiohttp_client: ClientFactory, influxd: InfluxServer
) -> None:
    db = new_db()
    plugin, raising = BrokenPlugin(app=None), RaisingSink()

    def broken_error_code(request: web.Request, outcome: object) -> int:
        raise KeyError("getter bug")

    app = create_app(
        sinks=[InfluxDBSink(influxd.host, influxd.port, db), PluginSink(plugin), raising],
        **fast_policy(),
        error_code=broken_error_code,
    )
    monitoring = app[MONITORING_KEY]
    with capture_logs() as logs:
        client = await aiohttp_client(app)
        answers = await drive(client, 20, monitoring=monitoring)
        failed = await client.post("/detector?fail=raise")
        await eventually(lambda: stats_of(monitoring)["written"] == 22, what="healthy sink")
        await eventually(
            lambda: (
                monitoring.stats()["raising"]["dropped"]["rejected"] == 22
                and monitoring.stats()["BrokenPlugin"]["dropped"]["rejected"] == 22
            ),
            what="failures counted",
        )
        # the flusher is alive for every sink: later points still flow and are counted
        later = await drive(client, 5, monitoring=monitoring)
        await eventually(lambda: stats_of(monitoring)["written"] == 27, what="later points")
        await eventually(
            lambda: monitoring.stats()["raising"]["dropped"]["rejected"] == 27, what="later"
        )
    await client.close()
    assert_served(answers + later)
    assert failed.status == 500
    assert plugin.initialized == 2  # tried again before the first write
    assert plugin.calls == 27
    events = {e["event"] for e in logs}
    assert {"sink_start_failed", "plugin_initialize_failed", "sink_raised", "batch_rejected"} <= (
        events
    )
    assert "error_code_getter_failed" in events
    stats = monitoring.stats()
    assert_invariant(stats)
    ids = await stored_request_ids(influxd, db)
    assert {a.request_id for a in answers + later} <= set(ids)
    errors = await stored_rows(influxd, 'SELECT "error_code", "request_id" FROM "error"', db)
    assert [e["error_code"] for e in errors] == ["1"]  # the getter failed: the default code


async def test_15_encoder_raising_loses_only_its_batch(
    aiohttp_client: ClientFactory, influxd: InfluxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = new_db()
    encode = lunamon.point._encoder  # the compiled encoder, or the Python one

    def fragile_encode(points: list[Point] | tuple[Point, ...]) -> bytes:
        if any(point.tags.get("handler_id") == "poison" for point in points):
            raise UnicodeEncodeError("utf-8", "x", 0, 1, "encoder bug")
        return encode(points)

    monkeypatch.setattr(lunamon.point, "_encoder", fragile_encode)
    app = create_app(
        sinks=[InfluxDBSink(influxd.host, influxd.port, db), MemorySink()],
        **fast_policy(flush_interval=30.0, batch_size=1),
    )
    monitoring = app[MONITORING_KEY]
    client = await aiohttp_client(app)
    good = await drive(client, 3, paths=["/handlers/ok/events"])
    poison = await drive(client, 1, paths=["/handlers/poison/events"])
    later = await drive(client, 3, paths=["/handlers/ok/events"])
    with capture_logs() as logs:
        await monitoring.flush()
    await client.close()
    assert_served(good + poison + later)
    stats = stats_of(monitoring)
    assert (stats["written"], stats["dropped"]["rejected"]) == (6, 1)
    assert monitoring.stats()["memory"]["written"] == 7
    assert any(e["event"] == "sink_raised" for e in logs)
    ids = await stored_request_ids(influxd, db)
    assert sorted(ids) == sorted(a.request_id for a in good + later)


# --------------------------------------------------------------------------- 16: before the loop


def _get(url: str) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=1.0) as response:
            return int(response.status)
    except OSError:
        return 0


def _post(url: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, data=b"", method="POST")
    with opener.open(request, timeout=5.0) as response:
        return int(response.status), str(response.headers["Luna-Request-Id"])


@dataclass
class Served:
    """One run of tests/_rel_run_app.py: its answers, exit status, final stats, timing."""

    answers: list[tuple[int, str]]
    returncode: int
    stats: dict[str, Any]
    output: str  # stdout and stderr
    exit_seconds: float  # from the signal to the process's end


def serve_in_subprocess(
    mode: str, sig: signal.Signals, out: Path, influx_port: int, db: str, **env: str
) -> Served:
    port = free_port()
    environment = {
        **os.environ,
        "REL_MODE": mode,
        "REL_PORT": str(port),
        "REL_FILE": str(out),
        "REL_INFLUX_PORT": str(influx_port),
        "REL_DB": db,
        **env,
    }
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "_rel_run_app.py")],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while _get(f"{base}/healthcheck") != 204:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "service did not start"
            time.sleep(0.02)
        answers = [_post(f"{base}{SEED_PATHS[i % len(SEED_PATHS)]}") for i in range(25)]
        signalled = time.monotonic()
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=30)
        exit_seconds = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert all(status in (200, 201) for status, _ in answers)
    stats = json.loads(stdout.strip().splitlines()[-1])
    assert_invariant(stats)
    return Served(answers, proc.returncode, stats, stdout + stderr, exit_seconds)


@pytest.mark.parametrize(
    ("mode", "sig"),
    [
        ("run_app", signal.SIGINT),
        ("run_app", signal.SIGTERM),
        ("asyncio_run", signal.SIGINT),
        ("asyncio_run", signal.SIGTERM),
    ],
    ids=["run_app-SIGINT", "run_app-SIGTERM", "asyncio.run-SIGINT", "asyncio.run-SIGTERM"],
)
def test_16_objects_built_before_the_loop_work_under_run_app_and_asyncio_run(
    influxd: InfluxServer, tmp_path: Path, mode: str, sig: signal.Signals
) -> None:
    db, out = new_db(), tmp_path / "points.lp"
    served = serve_in_subprocess(mode, sig, out, influxd.port, db)
    for name in ("file", "influxdb"):
        assert served.stats[name]["emitted"] == served.stats[name]["written"] == 26, served.stats
    points = parse_line_protocol(out.read_text())
    request_ids = sorted(str(p.fields["request_id"]) for p in points if p.series == "request")
    assert request_ids == sorted(rid for _, rid in served.answers)
    assert [p.series for p in points].count("startup") == 1  # emitted at import, before any loop
    assert sorted(influxd.column('SELECT "request_id" FROM "request"', db, "request_id")) == (
        request_ids
    )
    assert len(influxd.rows('SELECT * FROM "startup"', db)) == 1


@pytest.mark.parametrize("mode", ["run_app", "asyncio_run"])
def test_11_process_with_the_sink_down_exits_within_the_deadline(tmp_path: Path, mode: str) -> None:
    out = tmp_path / "points.lp"
    served = serve_in_subprocess(
        mode, signal.SIGTERM, out, free_port(), "db", REL_SHUTDOWN_TIMEOUT="1.0"
    )
    assert served.exit_seconds < 1.0 + 3.0  # the deadline, plus interpreter exit
    assert served.stats["file"]["written"] == 26  # the healthy sink drained everything
    influx = served.stats["influxdb"]
    assert (influx["written"], influx["dropped"]["shutdown"], influx["buffered"]) == (0, 26, 0)
    assert "points_dropped_at_shutdown" in served.output  # structlog's default: stdout


def test_16_built_before_the_loop_then_served_in_process_by_asyncio_run(
    influxd: InfluxServer,
) -> None:
    db = new_db()
    memory = MemorySink()
    app = create_app(
        sinks=[InfluxDBSink(influxd.host, influxd.port, db), memory],
        flush_interval=30.0,
    )
    monitoring = app[MONITORING_KEY]
    monitoring.emit(Point("startup", time.time_ns(), {"k": "v"}, {"f": 1.0}))  # no loop yet

    async def main() -> list[str]:
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        ids = []
        async with aiohttp.ClientSession() as session:
            for path in SEED_PATHS:
                async with session.post(f"http://127.0.0.1:{port}{path}") as response:
                    assert response.status in (200, 201)
                    ids.append(response.headers["Luna-Request-Id"])
        await runner.cleanup()
        return ids

    ids = asyncio.run(main())
    stats = monitoring.stats()
    assert_invariant(stats)
    assert stats["influxdb"]["written"] == stats["memory"]["written"] == 6
    assert sorted(influxd.column('SELECT "request_id" FROM "request"', db, "request_id")) == sorted(
        ids
    )
