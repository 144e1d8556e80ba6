"""Catalogue 17-19: the demo service under a bounded load (count- and time-limited, 127.0.0.1
only), driven by an aiohttp client in another process as fast as it goes, with the sink down,
slow (200 ms per write) and up. A ticker task in the service's loop measures event-loop lag,
a sampler reads ``stats()`` and RSS during the run. Each scenario prints one line of figures
(run ``pytest -s -m slow tests/test_load.py`` to see them).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from _rel_support import (
    ClientFactory,
    assert_invariant,
    assert_served,
    drive,
    eventually,
    new_db,
)
from aiohttp import web
from servers import FakeInfluxServer, InfluxServer, free_port
from structlog.testing import capture_logs

from lunamon import MONITORING_KEY, Point
from lunamon.demo.service import create_app
from lunamon.lineprotocol import parse_line_protocol
from lunamon.sinks.base import Sink
from lunamon.sinks.influxdb import InfluxDBSink

TOOLS = Path(__file__).parent / "_rel_load_tools.py"
# 4 connections reach about the client's full rate (measured: 16 add under 10 % here)
# while keeping aiohttp's own work per loop iteration small: the lag bound then
# measures what lunamon adds, not a saturated server's queue.
CONCURRENCY = 4
MAX_REQUESTS = 40_000
MAX_SECONDS = 5.0


def rss_mb() -> float:
    """Resident set size of this process, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def p99(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


@dataclass
class Run:
    """What one scenario measured."""

    client: dict[str, Any] = field(default_factory=dict)
    lags: list[float] = field(default_factory=list)
    max_buffered: int = 0
    samples: int = 0
    rss_before: float = 0.0
    rss_max: float = 0.0
    stats_at_end_of_traffic: dict[str, Any] = field(default_factory=dict)
    final_stats: dict[str, Any] = field(default_factory=dict)
    problems: list[MutableMapping[str, Any]] = field(default_factory=list)  # warnings, errors

    @property
    def answered(self) -> int:
        return sum(self.client["statuses"].values())

    def figures(self, scenario: str, sink: str) -> str:
        final = self.final_stats[sink]
        dropped = {k: v for k, v in final["dropped"].items() if v}
        return (
            f"[load] {scenario}: requests served {self.answered}"
            f" ({self.answered / self.client['seconds']:.0f}/s, {CONCURRENCY} connections);"
            f" points emitted {final['emitted']}, written {final['written']},"
            f" dropped {dropped or 0}; max buffered {self.max_buffered};"
            f" RSS {self.rss_before:.0f} -> max {self.rss_max:.0f} MB;"
            f" loop lag p99 {p99(self.lags) * 1000:.2f} ms,"
            f" max {max(self.lags) * 1000:.1f} ms"
        )


async def run_load(sinks: list[Sink], policy: dict[str, Any]) -> Run:
    """Serve the demo service with ``sinks`` under the load client, then shut it down."""
    with capture_logs() as logs:
        run = await _run_load(sinks, policy)
    run.problems = [e for e in logs if e["log_level"] in ("warning", "error")]
    return run


async def _run_load(sinks: list[Sink], policy: dict[str, Any]) -> Run:
    run = Run(rss_before=rss_mb())
    run.rss_max = run.rss_before
    app = create_app(sinks=sinks, **policy)
    monitoring = app[MONITORING_KEY]
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    stop = asyncio.Event()

    async def ticker() -> None:  # event-loop lag: how late a 1 ms timer fires
        while not stop.is_set():
            started = time.perf_counter()
            await asyncio.sleep(0.001)
            run.lags.append(time.perf_counter() - started - 0.001)

    async def sampler() -> None:
        while not stop.is_set():
            stats = monitoring.stats()
            assert_invariant(stats)
            run.max_buffered = max([run.max_buffered, *(s["buffered"] for s in stats.values())])
            run.rss_max = max(run.rss_max, rss_mb())
            run.samples += 1
            await asyncio.sleep(0.01)

    tasks = [asyncio.create_task(ticker()), asyncio.create_task(sampler())]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(TOOLS),
        "client",
        f"http://127.0.0.1:{port}",
        str(CONCURRENCY),
        str(MAX_REQUESTS),
        str(MAX_SECONDS),
        stdout=asyncio.subprocess.PIPE,
    )
    stdout, _ = await asyncio.wait_for(proc.communicate(), MAX_SECONDS + 30)
    assert proc.returncode == 0
    run.client = json.loads(stdout.decode().strip().splitlines()[-1])
    stop.set()
    await asyncio.gather(*tasks)
    run.stats_at_end_of_traffic = monitoring.stats()
    await runner.cleanup()  # the app's cleanup drains the sinks
    run.final_stats = monitoring.stats()
    assert_invariant(run.final_stats)
    return run


def assert_every_request_answered(run: Run, sink: str) -> None:
    if run.final_stats[sink]["dropped"]["rejected"]:
        print("[load] rejected:", run.problems[:5])
    assert run.client["errors"] == 0
    assert set(run.client["statuses"]) <= {"200", "201"}, run.client
    assert run.answered == run.client["sent"]
    assert run.final_stats[sink]["emitted"] == run.answered  # one point per request


@pytest.mark.slow
async def test_17_sustained_load_with_the_sink_down() -> None:
    # Well under what the 5 s of load serve on a busy 2-core machine (2,400 seen), so the
    # bound is always reached and overflow always counted.
    bound = 1_000
    policy = {
        "buffer_size": bound,
        "batch_size": 500,
        "max_retries": 10**6,
        "retry_max_delay": 1.0,
        "shutdown_timeout": 0.5,
    }
    run = await run_load([InfluxDBSink("127.0.0.1", free_port(), "db", timeout=1.0)], policy)
    print(run.figures("sink down", "influxdb"))
    assert_every_request_answered(run, "influxdb")
    assert run.samples > 10
    assert run.max_buffered <= bound
    at_end = run.stats_at_end_of_traffic["influxdb"]
    assert at_end["written"] == 0
    assert at_end["buffered"] == min(bound, at_end["emitted"])
    assert at_end["dropped"]["overflow"] == at_end["emitted"] - at_end["buffered"]
    final = run.final_stats["influxdb"]
    assert final["dropped"]["overflow"] == final["emitted"] - final["written"] - bound
    assert final["dropped"]["shutdown"] == bound
    assert run.answered > bound  # the bound was really reached
    assert run.rss_max - run.rss_before < 100  # MB: the bound holds memory too


@dataclass
class SlowSink:
    port: int
    process: asyncio.subprocess.Process

    def lines(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/count", timeout=5) as r:
            return int(json.loads(r.read())["lines"])


@pytest.fixture
async def slow_sink() -> AsyncIterator[SlowSink]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(TOOLS), "slowsink", str(port), "0.2", stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    assert (await asyncio.wait_for(proc.stdout.readline(), 30)) == b"ready\n"
    try:
        yield SlowSink(port, proc)
    finally:
        proc.terminate()
        await proc.wait()


@pytest.mark.slow
async def test_18_sustained_load_with_a_slow_sink_loop_lag(slow_sink: SlowSink) -> None:
    sink = InfluxDBSink("127.0.0.1", slow_sink.port, "db", create_database=False)
    run = await run_load([sink], {})
    print(run.figures("sink slow (200 ms/write)", "influxdb"))
    assert_every_request_answered(run, "influxdb")
    final = run.final_stats["influxdb"]
    assert final["written"] == final["emitted"]  # all drained at shutdown
    assert await asyncio.to_thread(slow_sink.lines) == final["written"]
    assert p99(run.lags) < 0.005


@pytest.mark.slow
async def test_17_18_sustained_load_with_the_sink_up(influxd: InfluxServer) -> None:
    db = new_db()
    run = await run_load([InfluxDBSink(influxd.host, influxd.port, db)], {})
    print(run.figures("sink up (influxd)", "influxdb"))
    assert_every_request_answered(run, "influxdb")
    final = run.final_stats["influxdb"]
    assert final["written"] == final["emitted"]
    assert sum(final["dropped"].values()) == 0
    rows = await asyncio.to_thread(influxd.rows, 'SELECT COUNT("request_id") FROM "request"', db)
    assert rows[0]["count"] == final["written"]
    # no lag bound here: influxd competes for the same 2 cores (the figure is printed)


# --------------------------------------------------------------------------- 19: triggers


async def test_19_flush_at_batch_size_or_interval_whichever_first(
    aiohttp_client: ClientFactory, fake_influx: FakeInfluxServer
) -> None:
    def written_batches() -> list[list[Point]]:
        return [
            parse_line_protocol(r.body.decode()) for r in fake_influx.requests if r.path == "/write"
        ]

    # batch_size first: the interval (30 s) never elapses during the test
    sink = InfluxDBSink(fake_influx.host, fake_influx.port, "db", create_database=False)
    policy = {"flush_interval": 30.0, "batch_size": 50, "buffer_size": 1000}
    app = create_app(sinks=[sink], **policy)
    monitoring = app[MONITORING_KEY]
    client = await aiohttp_client(app)
    answers = await drive(client, 120, concurrency=1, monitoring=monitoring)
    await eventually(lambda: monitoring.stats()["influxdb"]["written"] >= 100, what="2 batches")
    batches = written_batches()
    assert len(batches[0]) == 50
    assert all(len(b) <= 50 for b in batches)
    await client.close()
    assert_served(answers)
    assert sum(len(b) for b in written_batches()) == 120  # the rest at shutdown

    # flush_interval first: 7 points never fill a batch of 1000
    fake_influx.requests.clear()
    started = time.monotonic()
    app = create_app(
        sinks=[InfluxDBSink(fake_influx.host, fake_influx.port, "db", create_database=False)],
        flush_interval=0.3,
        batch_size=1000,
    )
    monitoring = app[MONITORING_KEY]
    client = await aiohttp_client(app)
    answers = await drive(client, 7, concurrency=1, monitoring=monitoring)
    await eventually(lambda: monitoring.stats()["influxdb"]["written"] == 7, what="interval")
    assert [len(b) for b in written_batches()] == [7]
    assert fake_influx.requests[0].time - started >= 0.3 * 0.9
    await client.close()
    assert_served(answers)
