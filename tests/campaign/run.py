"""One campaign: the stack up, traffic on, the seeded faults one at a time, traffic off,
metrics settled and scraped, the service stopped gracefully (it drains), every store read
back and reconciled; the tables printed. The seed comes first, so that a failure can be
replayed (``--seed``; ``LUNAMON_FAULT_SEED`` for the test)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from servers import ServerError

from .faults import KINDS, Fault, apply, plan
from .reconcile import (
    Reconciliation,
    StoredPoint,
    by_fault,
    count_row,
    decreases,
    during,
    examples,
    id_row,
    markdown,
    stats_markdown,
    stats_rows,
    steps_back,
)
from .stack import Stack
from .traffic import Answer, Traffic

__all__ = ["CampaignResult", "run_campaign"]

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_COUNTERS = ("request_count_total", "errors_count_total")


@dataclass
class CampaignResult:
    seed: int
    faults: list[Fault]
    answers: list[Answer]
    unanswered: int
    reconciliation: Reconciliation
    report: str
    service_exit: int
    without_id: int  # answers that came without a ``Luna-Request-Id``

    @property
    def exact(self) -> bool:
        """Every store exact, every answer with its id, every fault injected and undone,
        and the graceful stop clean."""
        clean = self.service_exit == 0 and not any(f.error for f in self.faults)
        return self.reconciliation.exact and not self.without_id and clean


async def run_campaign(
    seed: int,
    steps: int,
    duration: float,
    *,
    rate: float = 40.0,
    kinds: tuple[str, ...] = KINDS,
    spool: bool = True,
    out: Callable[[str], None] = print,
) -> CampaignResult:
    """Run one campaign of ``steps`` faults within ``duration`` seconds of traffic
    (``spool=False``: without lunamon's crash spool even where it exists)."""
    planned = plan(seed, steps, kinds)
    out(f"fault campaign seed {seed} (replay: --seed {seed} / LUNAMON_FAULT_SEED={seed})")
    out("plan: " + ", ".join(f"{p.index}:{p.kind}({p.hold:g}s)" for p in planned))
    stack = Stack(spool=spool)
    try:
        return await _run(stack, seed, planned, duration, rate, out)
    finally:
        await asyncio.to_thread(stack.close)


async def _run(
    stack: Stack,
    seed: int,
    planned: list[Any],
    duration: float,
    rate: float,
    out: Callable[[str], None],
) -> CampaignResult:
    began = time.monotonic()
    await asyncio.to_thread(stack.start)
    out(
        f"stack up in {time.monotonic() - began:.1f} s: service {stack.url} (3 workers),"
        f" spool {'on' if stack.spool_dir else 'not in this lunamon'}"
    )
    traffic = Traffic(stack.url, rate, seed, max_seconds=duration + 60)
    sending = asyncio.create_task(traffic.run())
    watched: list[tuple[float, float, float]] = []
    watching = asyncio.create_task(_watch(stack, watched))
    faults: list[Fault] = []
    started = time.monotonic()
    try:
        await asyncio.sleep(1.0)  # traffic before the first fault
        for p in planned:
            if time.monotonic() - started > duration:
                out(f"duration {duration:g} s reached: faults {p.index}.. not run")
                break
            fault = await asyncio.to_thread(apply, stack, p)
            faults.append(fault)
            error = f" ERROR {fault.error}" if fault.error else ""
            out(f"fault {p.index}: {p.kind}: {fault.detail}{error}")
            await asyncio.sleep(p.quiet)
    finally:
        traffic.stop()
        await sending
    answers = [a for a in traffic.answers if a.request_id]
    out(
        f"traffic: {len(traffic.answers)} answers ({len(traffic.answers) - len(answers)} without"
        f" an id), {traffic.unanswered} unanswered, in {time.monotonic() - started:.1f} s"
    )
    try:
        dead = await _settle_metrics(stack, answers, faults)
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
    kills = [f.killed_at for f in faults if f.killed_worker]
    kills_wall = [f.killed_wall for f in faults if f.killed_worker]
    prometheus_backs: list[str] = []
    prometheus = await _prometheus(
        stack, dead["direct"], time.monotonic() - began, kills_wall, faults, prometheus_backs
    )
    service_exit = await asyncio.to_thread(stack.stop_service)
    stored = await asyncio.to_thread(_read_stores, stack)
    events = stack.lunamon_events()
    rows = []
    spool = stack.spool_dir is not None
    for store in ("influxdb", "clickhouse"):
        request_points, _request_error = stored[(store, "request")]
        workers = {p.request_id: p.worker for p in request_points}
        for series in ("request", "error"):
            points, error = stored[(store, series)]
            row = id_row(store, series, answers, points, faults, spool=spool, workers_by_id=workers)
            row.unreadable = error
            rows.append(row)
    counts = []
    for index, metric in enumerate(_COUNTERS):
        dead_counts = {pid: (c[index] if c else None) for pid, c in dead["files"].items()}
        direct = dead["direct"][index]
        counts.append(
            count_row(
                "service /metrics",
                metric,
                answers,
                direct,
                dead_counts,
                faults,
                spool=spool,
                unanswered=traffic.unanswered,
                resets=decreases([(w[0], w[index + 1]) for w in watched], kills),
                spread=dead["spread"][index],
                peak=max((w[index + 1] for w in watched), default=None),
            )
        )
        value, resets, peak = prometheus[index]
        counts.append(
            count_row(
                "prometheus",
                metric,
                answers,
                value,
                dead_counts,
                faults,
                spool=spool,
                unanswered=traffic.unanswered,
                resets=resets,
                peak=peak,
            )
        )
    final = stack.final_stats()
    held: dict[str, int | None] = {"metrics": None}
    for store in ("influxdb", "clickhouse"):
        held[store] = sum(len(stored[(store, series)][0]) for series in ("request", "error"))
    held["influxdb"] = (held["influxdb"] or 0) + sum(
        len(ids) for f in faults for ids in f.dropped_ids.values()
    )
    killed = any(f.killed_worker for f in faults)
    result = Reconciliation(rows, counts, stats_rows(final, held, killed))
    backs_seen = Counter(
        f"service /metrics {name} at {during(t, faults)}"
        for index, name in enumerate(_COUNTERS)
        for t in steps_back([(w[0], w[index + 1]) for w in watched])
    ) + Counter(f"prometheus {where}" for where in prometheus_backs)
    backs = [f"{where} x{n}" for where, n in backs_seen.items()]
    campaign = CampaignResult(
        seed,
        faults,
        answers,
        traffic.unanswered,
        result,
        "",
        service_exit,
        without_id=len(traffic.answers) - len(answers),
    )
    campaign.report = "\n\n".join(
        [
            f"## Fault campaign, seed {seed}: {'EXACT' if campaign.exact else 'NOT EXACT'}",
            markdown(result, spool=spool),
            by_fault(result, answers, faults),
            examples(result, answers, faults) or "(no anomalous id)",
            stats_markdown(result.stats, len(final)),
            "counters stepping back: " + ("; ".join(backs) or "none"),
            f"service exit status after the graceful stop: {service_exit}",
            "lunamon's warnings and errors in the service log: "
            + (", ".join(f"{event} x{n}" for event, n in sorted(events.items())) or "none"),
        ]
    )
    out(campaign.report)
    return campaign


# --------------------------------------------------------------------------- metrics


def _scrape(stack: Stack) -> tuple[float | None, float | None]:
    """``request_count_total`` and ``errors_count_total`` summed, from the service itself."""
    try:
        with _OPENER.open(f"{stack.url}/metrics", timeout=5.0) as response:
            text = response.read().decode()
    except OSError:
        return None, None
    totals = dict.fromkeys(_COUNTERS, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return totals[_COUNTERS[0]], totals[_COUNTERS[1]]


async def _settle_metrics(
    stack: Stack, answers: list[Answer], faults: list[Fault]
) -> dict[str, Any]:
    """Poll the service's ``/metrics`` until it counts what it should (the workers flush
    every 0.2 s) or 8 s passed; then several scrapes, which must agree."""
    files = {f.killed_worker: f.killed_counts for f in faults if f.killed_worker}
    want = len(answers)
    if stack.spool_dir is None:  # without a spool, a killed worker's buffered requests are lost
        want -= sum(sum(1 for a in answers if a.worker == p) - c[0] for p, c in files.items() if c)
    deadline = time.monotonic() + 8.0
    direct = await asyncio.to_thread(_scrape, stack)
    while direct[0] != want and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        direct = await asyncio.to_thread(_scrape, stack)
    # Each scrape is answered by one worker (a fresh connection lands anywhere): they
    # must all say the same.
    seen = [direct]
    for _ in range(8):
        seen.append(await asyncio.to_thread(_scrape, stack))
        await asyncio.sleep(0.05)
    spread = [(min(v[i] or 0.0 for v in seen), max(v[i] or 0.0 for v in seen)) for i in range(2)]
    return {"files": files, "direct": direct, "spread": spread}


async def _watch(stack: Stack, into: list[tuple[float, float, float]]) -> None:
    """Scrape the service's ``/metrics`` every 0.25 s until cancelled: (monotonic time,
    requests, errors), to see a counter step back or overshoot between prometheus's
    scrapes."""
    while True:
        requests, errors = await asyncio.to_thread(_scrape, stack)
        if requests is not None and errors is not None:
            into.append((time.monotonic(), requests, errors))
        await asyncio.sleep(0.25)


async def _prometheus(
    stack: Stack,
    direct: tuple[float | None, float | None],
    elapsed: float,
    kills: list[float],
    faults: list[Fault],
    backs: list[str],
) -> list[tuple[float | None, tuple[int, int], float | None]]:
    """After a final scrape (the value prometheus has equals the service's, or 6 s
    passed): each counter summed, the steps back of its series during the run
    (:func:`decreases`, ``kills`` as unix times) and the peak of its sum."""
    server = stack.prometheus
    assert server is not None
    window = f"{int(elapsed) + 30}s"
    deadline = time.monotonic() + 6.0
    while True:
        value = await asyncio.to_thread(server.value, f"sum({_COUNTERS[0]})")
        if value == direct[0] or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.25)
    await asyncio.sleep(1.2)  # one more scrape interval: the error counter too
    out = []
    for name in _COUNTERS:
        value = await asyncio.to_thread(server.value, f"sum({name})")
        raw = await asyncio.to_thread(server.query, f"{name}[{window}]")
        found = [
            decreases([(float(t), float(v)) for t, v in series["values"]], kills) for series in raw
        ]
        resets = (sum(f[0] for f in found), sum(f[1] for f in found))
        peak = await asyncio.to_thread(server.value, f"max_over_time(sum({name})[{window}:1s])")
        out.append((value, resets, peak))
    return out


# --------------------------------------------------------------------------- stores


def _read_stores(stack: Stack) -> dict[tuple[str, str], tuple[list[StoredPoint], str]]:
    out: dict[tuple[str, str], tuple[list[StoredPoint], str]] = {}
    for series in ("request", "error"):
        fields = '"request_id", "worker"' if series == "request" else '"request_id"'
        try:
            if stack.db not in stack.influxd.databases():
                out[("influxdb", series)] = ([], "database gone")
                continue
            rows = stack.influxd.rows(f'SELECT {fields} FROM "{series}"', stack.db)
            points = [StoredPoint(str(r["request_id"]), int(r.get("worker") or 0)) for r in rows]
            out[("influxdb", series)] = (points, "")
        except ServerError as exc:
            out[("influxdb", series)] = ([], str(exc)[:120])
        worker = "visitParamExtractInt(data, 'worker')" if series == "request" else "0"
        sql = (
            f"SELECT visitParamExtractString(data, 'request_id') AS id, {worker} AS worker"
            f" FROM `{stack.db}`.`{series}`"
        )
        try:
            crows = stack.clickhouse.rows(sql)
            out[("clickhouse", series)] = (
                [StoredPoint(str(r["id"]), int(r["worker"])) for r in crows],
                "",
            )
        except ServerError as exc:
            text = str(exc)
            if "Code: 60" in text or "Code: 81" in text:  # no table: nothing stored
                out[("clickhouse", series)] = ([], "")
            else:
                out[("clickhouse", series)] = ([], text[:120])
    return out
