"""Real deployments (issue 5, "Deployments"): gunicorn with two ``aiohttp.GunicornWebWorker``
workers delivering every point of every worker exactly once through a graceful stop, points
emitted before the fork never sent twice, and the scale-out path through ``vmagent`` relaying
to victoria-metrics with the relay restarted mid-run.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from _rel_support import (
    ClientFactory,
    assert_invariant,
    assert_served,
    drive,
    eventually,
    fast_policy,
    new_db,
)
from servers import InfluxServer, VictoriaMetricsServer, VmAgentServer, free_port

from lunamon import MONITORING_KEY, Point
from lunamon.demo.service import create_app
from lunamon.sinks.influxdb import InfluxDBSink
from lunamon.sinks.memory import MemorySink

HERE = Path(__file__).parent
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _status(url: str) -> int:
    try:
        with _OPENER.open(url, timeout=1.0) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except OSError:
        return 0


def _worker(url: str) -> str:
    """The ``X-Worker`` pid of a 204 answer on a fresh connection, ``""`` when none yet."""
    try:
        with _OPENER.open(url, timeout=1.0) as response:
            return str(response.headers.get("X-Worker", "")) if response.status == 204 else ""
    except OSError:
        time.sleep(0.05)
        return ""


# --------------------------------------------------------------------------- gunicorn


@dataclass
class GunicornRun:
    """What one gunicorn run gave: the answers, the exit status and what influxd stored."""

    answers: list[tuple[int, str, str]]  # (status, request id, worker pid)
    returncode: int
    log: str
    request_ids: list[str]
    preload_points: int


def run_gunicorn(influxd: InfluxServer, *, preload: bool, requests: int = 400) -> GunicornRun:
    db, port = new_db(), free_port()
    env = {
        **os.environ,
        "REL_INFLUX_PORT": str(influxd.port),
        "REL_DB": db,
        "REL_PRELOAD": "1" if preload else "",
    }
    argv = [
        sys.executable, "-m", "gunicorn",
        "--chdir", str(HERE),
        "--bind", f"127.0.0.1:{port}",
        "--workers", "2",
        "--worker-class", "aiohttp.GunicornWebWorker",
        "--graceful-timeout", "20",
        "--log-level", "warning",
    ]  # fmt: skip
    argv += ["--preload", "_rel_gunicorn_app:app"] if preload else ["_rel_gunicorn_app:create"]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            workers: set[str] = set()
            while len(workers) < 2:  # both workers booted and serving
                assert proc.poll() is None, "gunicorn exited while starting"
                assert time.monotonic() < deadline, f"gunicorn did not start: {workers}"
                workers.add(_worker(f"http://127.0.0.1:{port}/healthcheck"))
                workers.discard("")
            answers = asyncio.run(_traffic(f"http://127.0.0.1:{port}", requests))
            proc.send_signal(signal.SIGTERM)  # graceful stop: each worker drains
            returncode = proc.wait(timeout=40)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        log.seek(0)
        text = log.read().decode(errors="replace")
    ids = influxd.column('SELECT "request_id" FROM "request"', db, "request_id")
    preload_rows = influxd.rows('SELECT * FROM "preload"', db) if preload else []
    return GunicornRun(answers, returncode, text, [str(i) for i in ids], len(preload_rows))


async def _traffic(base: str, count: int) -> list[tuple[int, str, str]]:
    """``count`` requests over 8 short-lived connections, so that both workers accept some."""
    paths = ["/detector", "/extractor", "/handlers/h1/events", "/verifiers/v1/verifications"]
    semaphore = asyncio.Semaphore(8)
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> tuple[int, str, str]:
            async with semaphore, session.post(base + paths[i % len(paths)]) as response:
                await response.read()
                return (
                    response.status,
                    response.headers.get("Luna-Request-Id", ""),
                    response.headers.get("X-Worker", ""),
                )

        return list(await asyncio.gather(*(one(i) for i in range(count))))


def assert_exactly_once(run: GunicornRun, requests: int) -> None:
    assert run.returncode == 0, run.log
    assert all(status in (200, 201) for status, _, _ in run.answers)
    workers = {pid for _, _, pid in run.answers}
    assert len(workers) == 2, workers  # both workers served
    assert len(run.request_ids) == requests
    assert sorted(run.request_ids) == sorted(rid for _, rid, _ in run.answers)


@pytest.mark.slow
def test_two_gunicorn_workers_deliver_every_point_exactly_once(influxd: InfluxServer) -> None:
    run = run_gunicorn(influxd, preload=False)
    assert_exactly_once(run, 400)


@pytest.fixture(scope="module")
def preloaded_run(influxd: InfluxServer) -> GunicornRun:
    return run_gunicorn(influxd, preload=True)


@pytest.mark.slow
def test_preloaded_app_points_emitted_before_fork_never_sent_twice(
    preloaded_run: GunicornRun,
) -> None:
    assert_exactly_once(preloaded_run, 400)
    assert preloaded_run.preload_points <= 1  # the workers forget what the master buffered


@pytest.mark.slow
def test_preloaded_app_points_emitted_before_fork_delivered_once(
    preloaded_run: GunicornRun,
) -> None:
    assert preloaded_run.preload_points == 1


# --------------------------------------------------------------------------- vmagent


def numeric_samples(points: list[Point]) -> dict[tuple[str, str], list[Any]]:
    """What victoria-metrics keeps of ``points``: (series, handler_id) -> [[ms, value]];
    a string field (``request_id``) becomes a series of 0 (SERVERS.md)."""
    out = {}
    for point in points:
        for key, value in point.fields.items():
            number = 0 if isinstance(value, str) else value
            name = f"{point.series}_{key}"
            out[(name, point.tags["handler_id"])] = [[point.time_ns // 1_000_000, number]]
    return out


@pytest.mark.slow
async def test_vmagent_relay_restarted_mid_run_all_numeric_series_arrive(
    aiohttp_client: ClientFactory, victoria_metrics: VictoriaMetricsServer, vmagent: VmAgentServer
) -> None:
    run = uuid.uuid4().hex[:8]
    memory = MemorySink()  # what lunamon sent, to compare with
    relay = InfluxDBSink("127.0.0.1", vmagent.port, "lunamon", create_database=False, timeout=2)
    app = create_app(sinks=[relay, memory], **fast_policy(retry_max_delay=0.5))
    monitoring = app[MONITORING_KEY]
    client = await aiohttp_client(app)

    def paths(phase: str) -> list[str]:
        return [f"/handlers/{run}-{phase}{i}/events" for i in range(20)]

    def written() -> int:
        return int(monitoring.stats()["influxdb"]["written"])

    first = await drive(client, 20, paths=paths("a"), monitoring=monitoring)
    await eventually(lambda: written() == 20, what="first phase relayed")
    await asyncio.to_thread(vmagent.stop)  # the relay goes away...
    second = await drive(client, 20, paths=paths("b"), monitoring=monitoring)
    await eventually(lambda: monitoring.stats()["influxdb"]["retries"] >= 1, what="retried")
    assert written() == 20
    await asyncio.to_thread(vmagent.start)  # ...and comes back on the same port and queue
    third = await drive(client, 20, paths=paths("c"), monitoring=monitoring)
    await eventually(lambda: written() == 60, timeout=20, what="all relayed")
    await client.close()
    assert_served(first + second + third)
    stats = monitoring.stats()
    assert_invariant(stats)
    assert sum(stats["influxdb"]["dropped"].values()) == 0

    expected = numeric_samples(memory.points)
    assert len(expected) == 60 * 11  # request_id, execution_time and 9 steps per request
    exported = await asyncio.to_thread(
        victoria_metrics.export,
        f'{{__name__=~"request_.*", handler_id=~"{run}-.*"}}',
        expect=len(expected),
        timeout=60,
    )
    got = {
        (item["metric"]["__name__"], item["metric"]["handler_id"]): [
            [t, v] for t, v in zip(item["timestamps"], item["values"], strict=True)
        ]
        for item in exported
    }
    assert got.keys() == expected.keys()  # every series, no extra one
    for key, [[ms, value]] in expected.items():
        # one sample each (none lost, none doubled); victoria-metrics keeps 12 digits
        assert got[key] == [[ms, pytest.approx(value, rel=1e-11)]], key
