"""Prometheus metrics from the recorded points: LUNA's names, labels and buckets, the
request id as exemplar, parsed with prometheus_client and scraped by a real Prometheus."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families as parse_text
from servers import PrometheusServer

import lunamon
from lunamon import MemorySink
from lunamon.metrics import MetricsSink, MetricsStore, SharedFolder
from lunamon.point import Point
from lunamon.settings import LUNA_BUCKETS, MetricsSettings
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

            def per_worker() -> list[int]:
                """Requests in each worker's file (each writes one as it starts)."""
                counts = []
                for path in snapshots():
                    with contextlib.suppress(FileNotFoundError):
                        counts.append(sum(n for *_, n in json.loads(path.read_text())["requests"]))
                return counts

            # The kernel may hand every connection to one worker (the other may still be
            # booting): send bursts of concurrent requests until both have counted some in
            # their files, however many that takes, within bounds.
            deadline = time.monotonic() + 30
            while sum(n > 0 for n in per_worker()) < 2:
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


# --------------------------------------------------------------------------- the audit's bugs
# Unit-level: a MetricsSink fed points directly and scraped through its exposition, each test
# failing on one bug planted by hand (docs/mutation.md).

BOUNDS = (0.1, 0.5, 1.0)


def request_point(
    seconds: float, when: int = 1, rid: str = "r", route: str = "GET:/a", status: str = "200"
) -> Point:
    tags = {"service": "svc", "route": route, "status_code": status}
    return Point("request", when, tags, {"execution_time": seconds, "request_id": rid})


def sink_for(**settings: Any) -> MetricsSink:
    return MetricsSink(MetricsSettings(enabled=True, buckets=BOUNDS, **settings))


def shared(sink: MetricsSink) -> SharedFolder:
    assert sink.shared is not None
    return sink.shared


async def scrape(sink: MetricsSink, accept: str = OPENMETRICS) -> str:
    body, _ = await sink.exposition(accept)
    return body.decode()


def buckets_of(text: str) -> dict[str, Any]:
    """``le`` -> bucket sample of the one ``requests`` series in an OpenMetrics text."""
    return {s.labels["le"]: s for s in samples(text, "requests_bucket", parse_om)}


def total(text: str) -> float:
    return float(sum(s.value for s in samples(text, "request_count_total", parse_om)))


async def test_a_value_on_a_bound_counts_in_that_bounds_le() -> None:
    sink = sink_for()
    await sink.write([request_point(0.1), request_point(0.5), request_point(0.5000001)])
    counts = {le: s.value for le, s in buckets_of(await scrape(sink)).items()}
    assert counts == {"0.1": 1, "0.5": 2, "1.0": 3, "+Inf": 3}


async def test_requests_sum_is_the_sum_of_execution_times() -> None:
    sink = sink_for()
    times = [0.25, 0.5, 0.125, 3.0]
    await sink.write([request_point(t) for t in times])
    (found,) = samples(await scrape(sink), "requests_sum", parse_om)
    assert found.value == sum(times)
    (count,) = samples(await scrape(sink), "requests_count", parse_om)
    assert count.value == len(times)


async def test_an_exemplar_is_in_its_own_buckets_and_the_newest() -> None:
    sink = sink_for()
    await sink.write([request_point(0.3, when=2_000, rid="new"), request_point(0.05, rid="fast")])
    await sink.write([request_point(0.4, when=1_000, rid="old")])  # older, delivered later
    found = buckets_of(await scrape(sink))
    assert {le: s.exemplar.labels["request_id"] for le, s in found.items() if s.exemplar} == {
        "0.1": "fast",
        "0.5": "new",
    }
    assert found["0.5"].exemplar.value == 0.3
    assert found["0.5"].exemplar.timestamp == 2_000 / 1e9
    await sink.write([request_point(0.2, when=3_000, rid="newest")])
    assert buckets_of(await scrape(sink))["0.5"].exemplar.labels["request_id"] == "newest"


async def test_an_id_beyond_openmetrics_limit_gets_no_exemplar() -> None:
    # OpenMetrics: an exemplar's label names and values together hold at most 128 characters.
    longest = "x" * (128 - len("request_id"))
    sink = sink_for()
    await sink.write([request_point(0.05, rid=longest), request_point(0.3, rid=longest + "y")])
    found = buckets_of(await scrape(sink))  # prometheus_client's parser refuses longer ones
    assert found["0.1"].exemplar.labels["request_id"] == longest
    assert found["0.5"].exemplar is None
    assert found["0.5"].value == 2


async def test_two_extra_labels_keep_their_values() -> None:
    sink = sink_for(extra_labels={"datacenter": "eu-1", "zone": "b"})
    tags = {"service": "svc", "route": "GET:/a", "error_code": "7"}
    await sink.write([request_point(0.3), Point("error", 1, tags, {"request_id": "r"})])
    text = await scrape(sink)
    for name in ("request_count_total", "errors_count_total", "requests_bucket", "requests_sum"):
        found = samples(text, name, parse_om)
        assert found, name
        for sample in found:
            assert (sample.labels["datacenter"], sample.labels["zone"]) == ("eu-1", "b"), name


def test_merging_workers_histograms_adds_and_keeps_the_newest_exemplar() -> None:
    one, two = MetricsStore(BOUNDS), MetricsStore(BOUNDS)
    one.add([request_point(0.3, when=5, rid="one-new"), request_point(0.05, when=1, rid="a")])
    two.add([request_point(0.4, when=3, rid="two-old"), request_point(0.08, when=9, rid="b")])
    two.add([request_point(2.0, when=4, rid="slow"), request_point(0.2, when=4, rid="two-mid")])
    for first, second in ((one, two), (two, one)):  # whichever worker's file comes first
        merged = MetricsStore(BOUNDS)
        merged.merge_snapshot(first.snapshot())
        merged.merge_snapshot(second.snapshot())
        assert merged.requests == {("svc", "GET:/a", "200"): 6}
        (histogram,) = merged.durations.values()
        assert histogram.counts == [2, 3, 0, 1]
        assert histogram.sum == pytest.approx(0.3 + 0.05 + 0.4 + 0.08 + 2.0 + 0.2)
        assert histogram.exemplars == [("b", 0.08, 9), ("one-new", 0.3, 5), None, ("slow", 2.0, 4)]
    assert one.requests == {("svc", "GET:/a", "200"): 2}  # merging left the sources alone


def test_merging_a_snapshot_of_other_buckets_is_skipped() -> None:
    merged = MetricsStore(BOUNDS)
    other = MetricsStore((0.1, 1.0))
    other.add([request_point(0.3)])
    assert not merged.merge_snapshot(other.snapshot())
    assert merged.requests == {}
    assert merged.merge_snapshot(MetricsStore(BOUNDS).snapshot())


# --------------------------------------------------------------------------- counted once


async def test_a_failing_snapshot_write_never_counts_a_batch_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RELIABILITY.md 38: the file write failing (and failing again) changes no count."""
    failures = 0

    def failing(path: Path, data: dict[str, Any], force: bool) -> None:
        nonlocal failures
        failures += 1
        raise OSError(28, "No space left on device")

    metrics_module = sys.modules[MetricsSink.__module__]
    writer = metrics_module._write_snapshot
    app = metrics_app(multiprocess_dir=str(tmp_path / "m"), buckets=list(BOUNDS))
    monitoring = app[lunamon.MONITORING_KEY]
    sink = monitoring.metrics
    await monitoring.start()
    try:
        monkeypatch.setattr(metrics_module, "_write_snapshot", failing)
        for _ in range(10):
            monitoring.emit(request_point(0.3))
        for _ in range(5):  # every flush after the first finds nothing to deliver again
            await monitoring.flush()
            await shared(sink).save(force=True)  # fails, as the background writes do
        assert failures >= 5
        stats = monitoring.stats()["metrics"]
        assert (stats["written"], stats["retries"], stats["buffered"]) == (10, 0, 0)
        assert sink.store.requests == {("svc", "GET:/a", "200"): 10}
        assert total(await scrape(sink)) == 0  # as last written: never more than served
        monkeypatch.setattr(metrics_module, "_write_snapshot", writer)
        assert total(await scrape(sink)) == 10  # written again: exact
    finally:
        await monitoring.close()
    assert sink.store.requests == {("svc", "GET:/a", "200"): 10}


async def test_write_never_raises_even_when_the_folder_became_a_file(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    sink = sink_for(multiprocess_dir=str(folder))
    await sink.start()
    shutil.rmtree(folder)
    folder.write_text("not a folder")
    await sink.write([request_point(0.3)])
    assert not await shared(sink).save(force=True)
    assert shared(sink).failing
    await sink.write([request_point(0.3)])
    assert sink.store.requests == {("svc", "GET:/a", "200"): 2}
    folder.unlink()
    assert total(await scrape(sink)) == 2  # the scrape wrote it again, folder and all
    assert not shared(sink).failing
    await sink.close()


async def test_workers_files_survive_the_folder_removed_mid_run(tmp_path: Path) -> None:
    """Two workers (two sinks, one folder): the operator removes the folder; no scrape
    shows less than before nor more than served, and both are exact once rewritten."""
    folder = tmp_path / "m"
    one, two = sink_for(multiprocess_dir=str(folder)), sink_for(multiprocess_dir=str(folder))
    await one.start()
    await two.start()
    try:
        await one.write([request_point(0.3)] * 3)
        await two.write([request_point(0.3)] * 4)
        # Each worker writes its file soon after a batch, never waited for: polled.
        for sink in (one, two):
            deadline = time.monotonic() + 10
            while (seen := total(await scrape(sink))) != 7:
                assert seen < 7, seen
                assert time.monotonic() < deadline, seen
                await asyncio.sleep(0.02)
        shutil.rmtree(folder)
        assert total(await scrape(one)) == 7  # its own file rewritten, the other's as last read
        assert folder.is_dir()
        await two.write([request_point(0.3)])  # two rewrites its whole state
        shown = [total(await scrape(one))]
        deadline = time.monotonic() + 10
        while shown[-1] != 8:
            assert time.monotonic() < deadline, shown
            await asyncio.sleep(0.02)
            shown.append(total(await scrape(one)))
        assert shown == sorted(shown)  # never down: Prometheus would read a reset
        assert total(await scrape(two)) == 8
        assert len(list(folder.glob("lunamon-metrics-*.json"))) == 2
    finally:
        await one.close()
        await two.close()


async def test_a_dead_workers_file_is_written_back_for_workers_started_since(
    tmp_path: Path,
) -> None:
    """A worker that died cannot rewrite its file: when the folder is cleared, a worker
    that had read it writes it back (never over a newer one), so a worker started since
    counts it too and every worker gives the same answer."""
    folder = tmp_path / "m"
    one, dead = sink_for(multiprocess_dir=str(folder)), sink_for(multiprocess_dir=str(folder))
    await one.start()
    await dead.start()
    await one.write([request_point(0.3)] * 2)
    await dead.write([request_point(0.3)] * 5)
    await dead.close()  # its last state is in its file; it will never write again
    fresh = None
    try:
        assert total(await scrape(one)) == 7
        shutil.rmtree(folder)
        assert total(await scrape(one)) == 7  # as last read, and written back
        fresh = sink_for(multiprocess_dir=str(folder))
        await fresh.start()  # started after the removal: it never read the dead one's file
        assert total(await scrape(fresh)) == 7
        assert len(list(folder.glob("lunamon-metrics-*.json"))) == 3
        # An older copy written back never hides a newer file, nor lowers what was seen.
        assert one.shared is not None
        seen = one.shared.seen
        stale = next(p for p in folder.glob("lunamon-metrics-*.json") if p.name in seen)
        older = json.loads(stale.read_text())
        older["requests"] = [[*row[:-1], 1] for row in older["requests"]]
        stale.write_text(json.dumps(older))
        assert total(await scrape(one)) == 7
    finally:
        await one.close()
        if fresh is not None:
            await fresh.close()


async def test_a_worker_never_scraped_still_knows_the_others_files(tmp_path: Path) -> None:
    """Each worker reads the others' files on its timer, so a dead one's file is written
    back after the folder is cleared even when no scrape reached a live worker before."""
    folder = tmp_path / "m"
    one, dead = sink_for(multiprocess_dir=str(folder)), sink_for(multiprocess_dir=str(folder))
    await one.start()
    await dead.start()
    await dead.write([request_point(0.3)] * 4)
    await dead.close()
    assert one.shared is not None
    fresh = None
    try:
        deadline = time.monotonic() + 10
        while not one.shared.seen:  # read on one's timer, not by a scrape
            assert time.monotonic() < deadline, "the other worker's file was never read"
            await asyncio.sleep(0.05)
        shutil.rmtree(folder)
        deadline = time.monotonic() + 10
        while len(list(folder.glob("lunamon-metrics-*.json"))) < 2:  # one's own, the dead's
            assert time.monotonic() < deadline, list(folder.glob("*"))
            await asyncio.sleep(0.05)
        fresh = sink_for(multiprocess_dir=str(folder))
        await fresh.start()
        assert total(await scrape(fresh)) == 4
    finally:
        await one.close()
        if fresh is not None:
            await fresh.close()


async def test_a_vanished_file_is_written_again_on_the_timer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.modules[MetricsSink.__module__], "_RECHECK", 0.05)
    folder = tmp_path / "parent" / "m"
    sink = sink_for(multiprocess_dir=str(folder))
    await sink.start()
    written = [["svc", "GET:/a", "200", 2]]
    try:

        def holds() -> bool:
            files = list(folder.glob("lunamon-metrics-*.json"))
            with contextlib.suppress(FileNotFoundError):
                return [json.loads(f.read_text())["requests"] for f in files] == [written]
            return False

        await sink.write([request_point(0.3)] * 2)
        deadline = time.monotonic() + 10
        while not holds():  # the batch's write
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        shutil.rmtree(folder.parent)  # its parent too
        deadline = time.monotonic() + 10  # no batch, no scrape: the recheck writes it
        while not holds():
            assert time.monotonic() < deadline, "the file was not written again"
            await asyncio.sleep(0.02)
    finally:
        await sink.close()


async def test_a_dead_worker_and_a_new_one_with_its_pid_are_counted_once_each(
    tmp_path: Path,
) -> None:
    """PIDs repeat (in containers they are all 1): files are named by more than the pid."""
    folder = tmp_path / "m"
    dead, new, scraper = (sink_for(multiprocess_dir=str(folder)) for _ in range(3))
    await dead.start()
    await dead.write([request_point(0.3)] * 5)
    await dead.close()  # its final state stays in its file
    await new.start()
    await new.write([request_point(0.3)] * 2)
    await scraper.start()
    try:
        assert shared(dead).path != shared(new).path
        assert total(await scrape(new)) == 7
        assert total(await scrape(scraper)) == 7
        text = await scrape(scraper, "text/plain")
        assert sum(s.value for s in samples(text, "request_count_total")) == 7
    finally:
        await new.close()
        await scraper.close()


async def test_close_writes_the_final_state(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    sink = sink_for(multiprocess_dir=str(folder))
    await sink.start()
    await sink.write([request_point(0.3)] * 3)
    keeper = shared(sink)._task
    assert keeper is not None
    await sink.close()
    assert keeper.done()  # stopped by close, not left pending
    (found,) = folder.glob("lunamon-metrics-*.json")
    assert json.loads(found.read_text())["requests"] == [["svc", "GET:/a", "200", 3]]


async def test_a_corrupt_file_of_another_worker_is_skipped(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    sink = sink_for(multiprocess_dir=str(folder))
    await sink.start()
    try:
        other = MetricsStore(BOUNDS)
        other.add([request_point(0.3)] * 4)
        (folder / "lunamon-metrics-1-x.json").write_text(json.dumps(other.snapshot()))
        await sink.write([request_point(0.3)])
        assert total(await scrape(sink)) == 5
        (folder / "lunamon-metrics-0-gone.json").symlink_to(folder / "nowhere")  # a race
        (folder / "lunamon-metrics-1-x.json").write_text('{"requests": [["svc"]]}')
        (folder / "lunamon-metrics-2-y.json").write_text("{not json")
        assert total(await scrape(sink)) == 5  # as last read; the other never counted
        (folder / "lunamon-metrics-3-z.json").write_text(json.dumps(other.snapshot()))
        assert total(await scrape(sink)) == 9  # the files after a vanished one still count
    finally:
        await sink.close()


@pytest.mark.parametrize("where", ["a file", "under a file", "not writable"])
def test_a_multiprocess_dir_that_cannot_be_a_writable_folder_is_refused(
    tmp_path: Path, where: str
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    folder = {
        "a file": str(blocker),
        "under a file": str(blocker / "metrics"),
        "not writable": "/proc/lunamon-metrics",  # even root cannot create it there
    }[where]
    app = web.Application()
    with pytest.raises(lunamon.SettingsError) as caught:
        lunamon.setup(app, service="s", sinks=[MemorySink()], metrics=metrics_on(folder))
    assert caught.value.key == "monitoring.metrics.multiprocess_dir"
    assert folder in str(caught.value)
    if where == "not writable":
        assert "(No such file or directory)" in str(caught.value)  # what the system said
        assert "a file" not in str(caught.value)
    else:
        assert "file, not a folder" in str(caught.value)


def test_a_missing_multiprocess_dir_is_created_at_setup(tmp_path: Path) -> None:
    folder = tmp_path / "a" / "b"
    lunamon.setup(web.Application(), service="s", sinks=[MemorySink()], metrics=metrics_on(folder))
    assert folder.is_dir()
    assert list(folder.iterdir()) == []  # the probe is gone


def metrics_on(folder: Any) -> dict[str, Any]:
    return {"enabled": True, "multiprocess_dir": str(folder)}


async def test_step_histograms_keep_service_path_and_step(tmp_path: Path) -> None:
    sink = sink_for(steps=True)
    tags = {"service": "svc", "route": "GET:/a", "status_code": "200"}
    fields = {"execution_time": 0.3, "match_policy_time": 0.05, "request_id": "r"}
    await sink.write([Point("request", 1, tags, fields)])
    (found,) = samples(await scrape(sink), "request_steps_count", parse_om)
    assert found.labels == {"service": "svc", "path": "GET:/a", "step": "match_policy"}


async def test_an_exemplar_of_the_same_time_counted_later_wins() -> None:
    sink = sink_for()
    await sink.write([request_point(0.3, when=7, rid="first"), request_point(0.3, when=7, rid="2")])
    assert buckets_of(await scrape(sink))["0.5"].exemplar.labels["request_id"] == "2"


def test_merging_adds_error_counts() -> None:
    tags = {"service": "svc", "route": "GET:/a", "error_code": "7"}
    one, two = MetricsStore(BOUNDS), MetricsStore(BOUNDS)
    one.add([Point("error", 1, tags, {"request_id": "r"})])
    two.add(
        [
            Point("error", 1, tags, {"n": 1}),
            Point("error", 2, {**tags, "error_code": "8"}, {"n": 1}),
        ]
    )
    merged = MetricsStore(BOUNDS)
    merged.merge_snapshot(one.snapshot())
    merged.merge_snapshot(two.snapshot())
    assert merged.errors == {("svc", "GET:/a", "7"): 2, ("svc", "GET:/a", "8"): 1}


async def test_the_file_is_written_at_start_and_kept_quietly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.DEBUG, logger="lunamon")
    metrics_module = sys.modules[MetricsSink.__module__]
    writes: list[bool] = []
    writer = metrics_module._write_snapshot

    def counting(path: Path, data: dict[str, Any], force: bool) -> None:
        writes.append(force)
        writer(path, data, force)

    monkeypatch.setattr(metrics_module, "_write_snapshot", counting)
    folder = tmp_path / "m"
    sink = sink_for(multiprocess_dir=str(folder))
    await sink.start()
    try:
        (found,) = folder.glob("lunamon-metrics-*.json")  # at once: the folder is checked
        assert json.loads(found.read_text())["requests"] == []
        await sink.write([request_point(0.3)])
        deadline = time.monotonic() + 10
        while json.loads(found.read_text())["requests"] == []:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        before = len(writes)
        await asyncio.sleep(0.3)  # idle: the keeper waits for a batch or its recheck
        assert len(writes) - before <= 1
        assert total(await scrape(sink)) == 1
        monkeypatch.setattr(metrics_module, "_RECHECK", 0.01)
        deadline = time.monotonic() + 10
        while len(writes) < before + 5:  # a few rechecks
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert not any(writes[before:])  # checks that the file is there, not writes
        keeper = shared(sink)._task
        assert keeper is not None
    finally:
        await sink.close()
    assert keeper.done()  # stopped by close, not left pending
    assert "metrics_file_written_again" not in caplog.text  # it never failed
    assert "metrics_file_write_failed" not in caplog.text
    await sink.write([request_point(0.3)])  # after close: counted, no background write
    assert shared(sink)._task is None


async def test_a_failed_write_is_logged_once_then_recovery_once(tmp_path: Path) -> None:
    from structlog.testing import capture_logs

    folder = tmp_path / "m"
    sink = sink_for(multiprocess_dir=str(folder))
    await sink.start()
    with capture_logs() as logs:
        shutil.rmtree(folder)
        folder.write_text("")
        for _ in range(3):
            assert not await shared(sink).save(force=True)
        folder.unlink()
        assert await shared(sink).save(force=True)
    events = [e["event"] for e in logs]
    assert events.count("metrics_file_write_failed") == 1  # rate-limited
    assert events.count("metrics_file_written_again") == 1
    await sink.close()


# ----------------------------------------------------------- the page's path, and its port


async def app_route(request: web.Request) -> web.Response:
    return web.Response(text="the app's own")


@pytest.mark.parametrize("between", [False, True])
def test_an_app_route_at_the_metrics_path_before_setup_is_refused(between: bool) -> None:
    app = web.Application()
    app.router.add_get("/metrics", app_route)
    if between:  # aiohttp then makes a second resource, one silently unreachable
        app.router.add_get("/other", app_route)
    with pytest.raises(lunamon.SettingsError) as caught:
        lunamon.setup(app, service="s", sinks=[MemorySink()], metrics={"enabled": True})
    assert caught.value.key == "monitoring.metrics.path"
    assert "'/metrics' is already a route of the application" in str(caught.value)
    assert lunamon.MONITORING_KEY not in app  # refused before anything changed
    assert list(app.middlewares) == []
    assert len(app.router.resources()) == 1 + between


@pytest.mark.parametrize("between", [False, True])
async def test_an_app_route_at_the_metrics_path_after_setup_is_refused_at_startup(
    between: bool,
) -> None:
    app = web.Application()
    lunamon.setup(app, service="s", sinks=[MemorySink()], metrics={"enabled": True})
    if between:
        app.router.add_get("/other", app_route)
    app.router.add_get("/metrics", app_route)  # no aiohttp error naming nothing
    runner = web.AppRunner(app)
    try:
        with pytest.raises(lunamon.SettingsError) as caught:
            await runner.setup()  # the app's startup
    finally:
        await runner.cleanup()
    assert caught.value.key == "monitoring.metrics.path"


async def test_other_methods_and_paths_are_no_clash(aiohttp_client: ClientFactory) -> None:
    app = web.Application()
    app.router.add_post("/metrics", app_route)
    app.router.add_get("/metrics/x", app_route)
    lunamon.setup(app, service="s", sinks=[MemorySink()], metrics={"enabled": True})
    app.router.add_get("/prom", app_route)
    client = await aiohttp_client(app)
    assert "request_count" in await (await client.get("/metrics")).text()
    assert await (await client.post("/metrics")).text() == "the app's own"


async def test_a_metrics_port_in_use_is_shared_by_workers_with_a_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several workers, one port: the first binds and answers for all; another takes over
    when it stops. Without the shared folder, a port in use is refused."""
    import aiohttp
    from servers import free_port
    from structlog.testing import capture_logs

    from lunamon.metrics import MetricsPort

    capturing = capture_logs()  # lunamon's events, whatever configured logging before
    logs = capturing.__enter__()
    monkeypatch.setattr(sys.modules[MetricsSink.__module__], "_PORT_RETRY", 0.05)
    port = free_port()
    settings = {"multiprocess_dir": str(tmp_path / "m"), "port": port, "host": "127.0.0.1"}
    first, second = sink_for(**settings), sink_for(**settings)
    ports = [MetricsPort(first), MetricsPort(second)]
    for sink, listener in zip((first, second), ports, strict=True):
        await sink.start()
        await listener.start()
    try:
        assert [p.bound for p in ports] == [True, False]
        await first.write([request_point(0.3)])
        await second.write([request_point(0.3)] * 2)

        async def scraped() -> float:
            url = f"http://127.0.0.1:{port}/metrics"
            async with aiohttp.ClientSession() as session, session.get(url) as response:
                text = await response.text()
            return float(sum(s.value for s in samples(text, "request_count_total")))

        assert await scraped() == 3
        await ports[0].close()
        assert not ports[0].bound
        deadline = time.monotonic() + 10
        while not ports[1].bound:
            assert time.monotonic() < deadline, "the other worker did not take the port over"
            await asyncio.sleep(0.02)
        await asyncio.wait_for(asyncio.shield(ports[1]._task), 10)  # type: ignore[arg-type]
        events = [e["event"] for e in logs]
        assert events.count("metrics_port_in_use") == 1
        assert events.count("metrics_port_taken_over") == 1
        assert await scraped() == 3
        alone = sink_for(port=port, host="127.0.0.1")
        refused = MetricsPort(alone)
        with pytest.raises(lunamon.SettingsError) as caught:
            await refused.start()
        assert caught.value.key == "monitoring.metrics.port"
        assert refused._runner is None  # cleaned up
        assert "multiprocess_dir" in str(caught.value)
    finally:
        for listener in ports:
            await listener.close()
        await first.close()
        await second.close()
        capturing.__exit__(None, None, None)


@pytest.mark.slow
async def test_three_gunicorn_workers_one_metrics_port_and_the_folder_removed(
    tmp_path: Path,
) -> None:
    """[monitoring.metrics] port with three workers: all boot (one binds, the others wait
    their turn) and the port answers for all; the shared folder removed under traffic:
    no scrape shows more than was served or less than before, and they are exact after."""
    import os
    import signal
    import subprocess

    import aiohttp
    from servers import free_port

    port, metrics_port = free_port(), free_port()
    folder = tmp_path / "metrics"
    env = {**os.environ, "METRICS_DIR": str(folder), "METRICS_PORT": str(metrics_port)}
    argv = [
        sys.executable, "-m", "gunicorn", "--chdir", str(Path(__file__).parent),
        "--bind", f"127.0.0.1:{port}", "--workers", "3",
        "--worker-class", "aiohttp.GunicornWebWorker", "--log-level", "warning",
        "_metrics_workers_app:create",
    ]  # fmt: skip
    proc = _popen(argv, env)
    sent = 0
    shown: list[float] = []
    try:
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def hello(n: int) -> None:
                nonlocal sent
                for _ in range(n):
                    async with session.get(f"http://127.0.0.1:{port}/hello") as response:
                        assert response.status == 200
                    sent += 1

            async def scraped() -> float:
                url = f"http://127.0.0.1:{metrics_port}/metrics"
                async with session.get(url) as response:
                    text = await response.text()
                shown.append(sum(s.value for s in samples(text, "request_count_total")))
                assert shown[-1] <= sent, f"more than served: {shown}, sent {sent}"
                return shown[-1]

            async def exact() -> None:
                deadline = time.monotonic() + 20
                while await scraped() != sent:
                    assert time.monotonic() < deadline, f"shown {shown}, sent {sent}"
                    await asyncio.sleep(0.05)

            deadline = time.monotonic() + 30
            while len(list(folder.glob("lunamon-metrics-*.json"))) < 3:  # all three booted
                assert proc.poll() is None, "gunicorn stopped: a worker failed to boot"
                assert time.monotonic() < deadline, "three workers did not start"
                await asyncio.sleep(0.05)
            await hello(30)
            await exact()
            shutil.rmtree(folder)  # an operator clearing it under traffic
            await scraped()
            await hello(30)
            await exact()
            assert shown == sorted(shown), f"went down (a reset to Prometheus): {shown}"
            assert len(list(folder.glob("lunamon-metrics-*.json"))) == 3
            assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
