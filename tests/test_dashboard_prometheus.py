"""dashboards/luna-handlers-prometheus.json: every panel's PromQL answers with data from a
real Prometheus scraping the demo service's /metrics."""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from servers import PrometheusServer

import lunamon
from lunamon.demo.service import create_app
from lunamon.demo.traffic import drive

DASHBOARD = Path(__file__).resolve().parent.parent / "dashboards" / "luna-handlers-prometheus.json"


def grafana_substitute(expr: str) -> str:
    """What Grafana does to the variables before sending the query."""
    expr = expr.replace("$__rate_interval", "20s").replace("$service", "luna-handlers")
    assert "$" not in expr, expr
    return expr


def test_dashboard_structure() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            assert 'service=~"$service"' in target["expr"]
    latency = next(p for p in dashboard["panels"] if p["title"].startswith("p95"))
    assert latency["targets"][0]["exemplar"] is True  # from the spike to the request


async def test_every_panel_query_returns_data() -> None:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    app = create_app(sinks=[lunamon.MemorySink()], metrics={"enabled": True, "steps": True})
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    assert site._server is not None
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    monitoring = app[lunamon.MONITORING_KEY]
    try:
        with PrometheusServer([f"127.0.0.1:{port}"]) as prometheus:
            deadline = time.monotonic() + 40
            while prometheus.value("up") != 1:  # scraping: the traffic spans its samples
                assert time.monotonic() < deadline, "Prometheus never scraped the service"
                await asyncio.sleep(0.2)
            # Traffic over a few scrapes: rate() needs the counters to grow between samples.
            for _ in range(4):
                await drive(f"http://127.0.0.1:{port}", requests=60, concurrency=4, seed=7)
                await monitoring.flush()
                await asyncio.sleep(1.1)  # one scrape interval between the rounds
            for panel in dashboard["panels"]:
                for target in panel["targets"]:
                    expr = grafana_substitute(target["expr"])
                    while True:
                        values = [
                            float(r["value"][1])
                            for r in prometheus.query(expr)
                            if not math.isnan(float(r["value"][1]))
                        ]
                        if values or time.monotonic() > deadline:
                            break
                        await asyncio.sleep(0.5)
                    assert values, f"panel {panel['title']!r}: no data for {expr}"
            names = prometheus.api("label/service/values")
            assert names == ["luna-handlers"]
            (steps,) = [p for p in dashboard["panels"] if "steps" in p["title"]]
            by_step = prometheus.query(grafana_substitute(steps["targets"][0]["expr"]))
            assert {r["metric"]["step"] for r in by_step} >= {"match_policy", "download_images"}
            assert all(re.fullmatch(r"[a-z_]+", r["metric"]["step"]) for r in by_step)
    finally:
        await runner.cleanup()
