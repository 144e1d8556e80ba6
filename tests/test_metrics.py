"""Prometheus metrics from the recorded points: LUNA's names, labels and buckets, the
request id as exemplar, parsed with prometheus_client and scraped by a real Prometheus."""

from __future__ import annotations

import bisect
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families as parse_text
from servers import PrometheusServer

import lunamon
from lunamon import MemorySink
from lunamon.settings import LUNA_BUCKETS
from lunamon.testing import CapturedPoints

ClientFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


@lunamon.timed("match_policy_time")
async def match_policy() -> None:
    return None


async def ok(request: web.Request) -> web.Response:
    await match_policy()
    return web.Response(text="ok")


async def missing(request: web.Request) -> web.Response:
    raise web.HTTPNotFound()


async def fail(request: web.Request) -> web.Response:
    return web.json_response({"error_code": 7, "desc": "bad"}, status=400)


def metrics_app(**metrics: Any) -> web.Application:
    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/missing", missing)
    app.router.add_post("/fail", fail)
    lunamon.setup(app, service="svc", sinks=[MemorySink()], metrics={"enabled": True, **metrics})
    return app


async def drive(client: TestClient[web.Request, web.Application]) -> None:
    for _ in range(5):
        assert (await client.get("/ok")).status == 200
    for _ in range(2):
        assert (await client.get("/missing")).status == 404
    assert (await client.post("/fail")).status == 400
    for i in range(5):  # no route: one series for all of them, whatever the path
        assert (await client.get(f"/no/such/{i}")).status == 404
    await client.app[lunamon.MONITORING_KEY].flush()


def samples(text: str, name: str, parse: Callable[[str], Any] = parse_text) -> list[Any]:
    return [s for family in parse(text) for s in family.samples if s.name == name]


async def test_luna_counters_and_histogram(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(metrics_app(extra_labels={"datacenter": "eu-1"}))
    await drive(client)
    response = await client.get("/metrics")
    assert response.headers["Content-Type"].startswith("text/plain")
    text = await response.text()
    counts = {
        (s.labels["path"], s.labels["status_code"]): s.value
        for s in samples(text, "request_count_total")
    }
    assert counts == {
        ("GET:/ok", "200"): 5,
        ("GET:/missing", "404"): 2,
        ("POST:/fail", "400"): 1,
        ("GET:<unmatched>", "404"): 5,
    }
    errors = {
        (s.labels["path"], s.labels["error_code"]): s.value
        for s in samples(text, "errors_count_total")
    }
    assert errors == {
        ("GET:/missing", "0"): 2,
        ("POST:/fail", "7"): 1,
        ("GET:<unmatched>", "0"): 5,
    }
    assert all(s.labels["datacenter"] == "eu-1" for s in samples(text, "request_count_total"))
    buckets = [s for s in samples(text, "requests_bucket") if s.labels["path"] == "GET:/ok"]
    assert [float(s.labels["le"]) for s in buckets] == [*LUNA_BUCKETS, float("inf")]
    assert buckets[-1].value == 5
    assert [s.value for s in buckets] == sorted(s.value for s in buckets)  # cumulative
    (count,) = [s for s in samples(text, "requests_count") if s.labels["path"] == "GET:/ok"]
    assert count.value == 5
    assert not samples(text, "request_steps_bucket")  # steps are off by default


async def test_the_scrape_is_not_recorded(
    aiohttp_client: ClientFactory, lunamon_points: CapturedPoints
) -> None:
    client = await aiohttp_client(metrics_app())
    assert (await client.get("/metrics")).status == 200
    assert (await client.get("/ok")).status == 200
    routes = [p.tags["route"] for p in lunamon_points.series("request")]
    assert routes == ["GET:/ok"]


async def test_openmetrics_carries_the_request_id_as_exemplar(
    aiohttp_client: ClientFactory, lunamon_points: CapturedPoints
) -> None:
    client = await aiohttp_client(metrics_app(steps=True))
    await drive(client)
    response = await client.get("/metrics", headers={"Accept": OPENMETRICS})
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    text = await response.text()
    ids = {p.fields["request_id"] for p in lunamon_points.series("request")}
    exemplars = [s.exemplar for s in samples(text, "requests_bucket", parse_om) if s.exemplar]
    assert exemplars
    assert {e.labels["request_id"] for e in exemplars} <= ids
    steps = [s for s in samples(text, "request_steps_bucket", parse_om) if s.labels["le"] == "+Inf"]
    assert [(s.labels["step"], s.value) for s in steps] == [("match_policy", 5)]


def test_metrics_settings_are_checked_like_the_rest() -> None:
    with pytest.raises(lunamon.SettingsError, match=r"metrics\.buckets: bounds must increase"):
        lunamon.setup(web.Application(), service="s", metrics={"buckets": [1.0, 0.5]})
    with pytest.raises(lunamon.SettingsError, match=r"did you mean 'port'"):
        lunamon.MonitoringSettings.from_mapping({"metrics": {"prot": 1}})
    with pytest.raises(lunamon.SettingsError, match="set by lunamon itself"):
        lunamon.MonitoringSettings.from_env({"LUNAMON_METRICS_EXTRA_LABELS": "path=x"})
    settings = lunamon.MonitoringSettings.from_env(
        {"LUNAMON_METRICS_ENABLED": "1", "LUNAMON_METRICS_BUCKETS": "0.1,1"}
    )
    assert settings.metrics.enabled
    assert settings.metrics.buckets == (0.1, 1.0)


# --------------------------------------------------------------------------- real Prometheus


async def serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    assert site._server is not None
    port: int = site._server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    return runner, port


async def poll(check: Callable[[], bool], timeout: float = 30.0) -> None:
    import asyncio

    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "Prometheus did not get there in time"
        await asyncio.sleep(0.2)


async def test_a_real_prometheus_scrapes_counts_quantiles_and_exemplars(
    lunamon_points: CapturedPoints,
) -> None:
    import aiohttp

    since = time.time() - 5
    app = metrics_app()
    runner, port = await serve(app)
    try:
        with PrometheusServer([f"127.0.0.1:{port}"]) as prometheus:
            base = f"http://127.0.0.1:{port}"
            async with aiohttp.ClientSession() as session:
                for path, n in (("/ok", 20), ("/missing", 3)):
                    for _ in range(n):
                        async with session.get(base + path) as response:
                            await response.read()
            await app[lunamon.MONITORING_KEY].flush()

            def counted() -> bool:
                return prometheus.value('sum(request_count_total{path="GET:/ok"})') == 20

            await poll(counted)
            assert prometheus.value('sum(errors_count_total{path="GET:/missing"})') == 3
            # The p90 from the histogram lies within the bucket of the true p90.
            times = sorted(
                p.fields["execution_time"]
                for p in lunamon_points.series("request")
                if p.tags["route"] == "GET:/ok"
            )
            true_p90 = times[int(0.9 * len(times)) - 1]
            index = bisect.bisect_left(LUNA_BUCKETS, true_p90)
            low = LUNA_BUCKETS[index - 1] if index else 0.0
            high = LUNA_BUCKETS[index]
            quantile = prometheus.value(
                'histogram_quantile(0.9, sum by (le) (requests_bucket{path="GET:/ok"}))'
            )
            assert quantile is not None
            assert low <= quantile <= high
            ids = {p.fields["request_id"] for p in lunamon_points.series("request")}
            found = prometheus.exemplars('requests_bucket{path="GET:/ok"}', since)
            stored = [e["labels"]["request_id"] for series in found for e in series["exemplars"]]
            assert stored
            assert set(stored) <= ids
    finally:
        await runner.cleanup()


@pytest.mark.slow
async def test_two_gunicorn_workers_one_scrape_counts_both(influxd: Any, tmp_path: Any) -> None:
    """With multiprocess_dir, whichever worker answers the scrape counts every request."""
    import asyncio
    import json
    import os
    import signal
    import subprocess
    import sys
    import uuid
    from pathlib import Path

    import aiohttp
    from servers import free_port

    port = free_port()
    metrics_dir = tmp_path / "metrics"
    env = {
        **os.environ,
        "REL_INFLUX_PORT": str(influxd.port),
        "REL_DB": f"t_{uuid.uuid4().hex[:12]}",
        "REL_COUNT_DIR": str(tmp_path),
        "REL_METRICS_DIR": str(metrics_dir),
    }
    argv = [
        sys.executable, "-m", "gunicorn", "--chdir", str(Path(__file__).parent),
        "--bind", f"127.0.0.1:{port}", "--workers", "2",
        "--worker-class", "aiohttp.GunicornWebWorker", "--log-level", "warning",
        "_rel_hello_app:create",
    ]  # fmt: skip
    proc = _popen(argv, env)
    base = f"http://127.0.0.1:{port}"
    sent = 0
    try:
        connector = aiohttp.TCPConnector(force_close=True)  # a connection each request
        async with aiohttp.ClientSession(connector=connector) as session:

            async def hello() -> None:
                nonlocal sent
                sent += 1
                async with session.get(base + "/hello") as response:
                    assert response.status == 200

            deadline = time.monotonic() + 30
            while True:  # gunicorn up
                assert proc.poll() is None, "gunicorn exited while starting"
                try:
                    await hello()
                    break
                except aiohttp.ClientConnectionError:
                    sent -= 1  # refused: never reached a worker
                    assert time.monotonic() < deadline, "gunicorn did not start"
                    await asyncio.sleep(0.05)

            def snapshots() -> list[Path]:
                return sorted(metrics_dir.glob("lunamon-metrics-*.json"))

            # The kernel may hand every connection to one worker (the other may still be
            # booting): send bursts of concurrent requests until both have flushed a
            # snapshot file, however many that takes, within bounds.
            deadline = time.monotonic() + 30
            while len(snapshots()) < 2:
                one_worker = f"after {sent} requests, a snapshot of one worker only"
                assert time.monotonic() < deadline, one_worker
                assert sent < 10_000, one_worker
                await asyncio.gather(*(hello() for _ in range(20)))
                await asyncio.sleep(0.05)

            async def scraped() -> float:
                async with session.get(base + "/metrics") as response:
                    text = await response.text()
                return float(sum(s.value for s in samples(text, "request_count_total")))

            deadline = time.monotonic() + 20
            while (total := await scraped()) != sent:
                assert time.monotonic() < deadline, f"scrape counts {total}, sent {sent}"
                await asyncio.sleep(0.1)
        # Both workers served some of them (the scrape above added both up).

        def per_worker() -> list[int]:
            return [sum(n for *_, n in json.loads(p.read_text())["requests"]) for p in snapshots()]

        deadline = time.monotonic() + 20  # the scraped worker's own file may trail its store
        while sum(counts := per_worker()) != sent:
            assert time.monotonic() < deadline, f"snapshot files count {counts}, sent {sent}"
            await asyncio.sleep(0.1)
        assert len(counts) == 2
        assert all(n > 0 for n in counts)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _popen(argv: list[str], env: dict[str, str]) -> Any:
    import subprocess

    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def test_metrics_on_a_port_of_their_own() -> None:
    import aiohttp
    from servers import free_port

    metrics_port = free_port()
    app = metrics_app(port=metrics_port, host="127.0.0.1", path="/prom")
    runner, port = await serve(app)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/ok") as response:
                assert response.status == 200
            await app[lunamon.MONITORING_KEY].flush()
            async with session.get(f"http://127.0.0.1:{metrics_port}/prom") as response:
                assert response.status == 200
                text = await response.text()
            async with session.get(f"http://127.0.0.1:{metrics_port}/ok") as response:
                assert response.status == 404  # only the metrics there
    finally:
        await runner.cleanup()
    (sample,) = samples(text, "request_count_total")
    assert (sample.labels["path"], sample.value) == ("GET:/ok", 1)
