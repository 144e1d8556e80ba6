"""dashboards/luna-handlers.json: a Grafana dashboard whose InfluxQL queries return rows
from a real influxd loaded by ``lunamon demo``."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from servers import InfluxServer

from lunamon.cli import main
from lunamon.demo.service import SUBSTEPS

DASHBOARD = Path(__file__).resolve().parent.parent / "dashboards" / "luna-handlers.json"
DB = "lunamon_dashboard"
EVENTS = "POST:/handlers/{handlerId}/events"


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


@pytest.fixture(scope="module")
def demo_window(influxd: InfluxServer) -> tuple[int, int]:
    """Demo data in the database; the time range (ms) around it."""
    start = int(time.time() * 1000) - 1000
    args = ["demo", "--requests", "300", "--latency", "0.001", "--no-progress", "--seed", "3"]
    assert main([*args, "--influx", f"{influxd.url}/{DB}"]) == 0
    return start, int(time.time() * 1000) + 1000


def grafana_substitute(query: str, start_ms: int, end_ms: int) -> str:
    """What Grafana's InfluxQL datasource does to the macros before sending the query."""
    query = query.replace("$timeFilter", f"time >= {start_ms}ms and time <= {end_ms}ms")
    query = query.replace("$__interval_ms", "1000").replace("$__interval", "1s")
    query = query.replace("$service", "luna\\-handlers")  # regex-escaped, as Grafana does
    assert not re.search(r"\$\w", query), query  # (the regex's own `$/` anchor stays)
    return query


def _targets(dashboard: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(panel, target) for panel in dashboard["panels"] for target in panel["targets"]]


def test_dashboard_structure(dashboard: dict[str, Any]) -> None:
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"]
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "influxdb"
    for panel, target in _targets(dashboard):
        assert panel["datasource"] == {"type": "influxdb", "uid": "${datasource}"}
        assert target["rawQuery"] is True
        assert target["query"].startswith("SELECT")
        assert "$timeFilter" in target["query"]
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
    titles = " | ".join(panel["title"] for panel in dashboard["panels"])
    for words in ("Requests per second by route", "p95", "error_code", EVENTS):
        assert words in titles


def test_sub_step_panel_has_every_handler_events_step(dashboard: dict[str, Any]) -> None:
    (panel,) = [p for p in dashboard["panels"] if EVENTS in p["title"]]
    query = panel["targets"][0]["query"]
    assert set(re.findall(r'mean\("(\w+)"\)', query)) == set(SUBSTEPS[EVENTS])


def test_every_panel_query_returns_rows(
    dashboard: dict[str, Any], demo_window: tuple[int, int], influxd: InfluxServer
) -> None:
    start, end = demo_window
    for panel, target in _targets(dashboard):
        query = grafana_substitute(target["query"], start, end)
        rows = influxd.rows(query, DB)
        assert rows, f"panel {panel['title']!r} ({target['refId']}) returned no rows: {query}"
        values = [v for row in rows for k, v in row.items() if k != "time" and v]
        assert values, f"panel {panel['title']!r} ({target['refId']}) has only zeros/nulls"
    service = next(v for v in dashboard["templating"]["list"] if v["name"] == "service")
    assert influxd.column(service["query"], DB, "value") == ["luna-handlers"]


def test_group_by_panels_have_a_series_per_route_and_code(
    dashboard: dict[str, Any], demo_window: tuple[int, int], influxd: InfluxServer
) -> None:
    start, end = demo_window
    by_title = {panel["title"]: panel for panel in dashboard["panels"]}
    answer = influxd.query(
        grafana_substitute(
            by_title["p95 execution_time by route"]["targets"][0]["query"], start, end
        ),
        DB,
    )
    routes = {s["tags"]["route"] for s in answer["results"][0]["series"]}
    assert routes == set(SUBSTEPS)
    answer = influxd.query(
        grafana_substitute(
            by_title["Errors per second by error_code"]["targets"][0]["query"], start, end
        ),
        DB,
    )
    codes = {s["tags"]["error_code"] for s in answer["results"][0]["series"]}
    assert {"12012", "1", "10015"} <= codes
