"""The faults of the campaign, one at a time, and the seeded plan that orders them.

Each fault is a blocking function (run in a thread, the client keeps sending) that
injects the fault, holds it for ``hold`` seconds, and undoes what can be undone. It
returns what the reconciliation needs to attribute a loss exactly: the pid of a killed
worker, the ids a dropped database held.

| kind | what | RELIABILITY.md |
|---|---|---|
| ``influxd_pause`` | influxd SIGSTOP past the sink's timeout, then SIGCONT | 35 |
| ``influxd_kill`` | influxd SIGKILL, restarted on its port and data | 35 |
| ``clickhouse_pause`` | clickhouse-server SIGSTOP past the sink's timeout, SIGCONT | 35, 36 |
| ``clickhouse_kill`` | clickhouse-server SIGKILL, restarted | 35, 36 |
| ``worker_kill`` | one gunicorn worker SIGKILLed (gunicorn starts another) | 40 |
| ``influx_drop_database`` | ``DROP DATABASE`` under traffic (what it held read first) | 41 |
| ``metrics_dir_removed`` | the shared ``multiprocess_dir`` removed | 38 |
| ``slow_sink`` | influxd or clickhouse SIGSTOP for less than the timeout | 35 |
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from .stack import SINK_TIMEOUT, Stack

__all__ = ["KINDS", "Fault", "FaultPlan", "apply", "plan"]


@dataclass(frozen=True)
class FaultPlan:
    """One planned fault: its kind, how long it is held, the quiet time after it, and a
    number that picks the target (which worker, which server)."""

    index: int
    kind: str
    hold: float
    quiet: float
    pick: int


@dataclass
class Fault:
    """A fault as it happened (monotonic times)."""

    plan: FaultPlan
    started: float = 0.0
    started_wall: float = 0.0  # unix time, as prometheus's samples
    ended: float = 0.0
    detail: str = ""
    killed_worker: int = 0
    killed_at: float = 0.0  # monotonic, as the client's answer times
    killed_wall: float = 0.0  # the same instant as unix time, as prometheus's samples
    # what the killed worker had counted in its metrics file when it died (requests, errors)
    killed_counts: tuple[int, int] | None = None
    dropped_ids: dict[str, set[str]] = field(default_factory=dict)  # series -> ids
    error: str = ""


def _influxd_pause(stack: Stack, fault: Fault) -> None:
    stack.influxd.pause()
    try:
        time.sleep(fault.plan.hold)
    finally:
        stack.influxd.resume()
    fault.detail = f"influxd stopped {fault.plan.hold:.1f} s (timeout {SINK_TIMEOUT} s)"


def _influxd_kill(stack: Stack, fault: Fault) -> None:
    stack.influxd.kill()
    time.sleep(fault.plan.hold)
    stack.influxd.start()
    fault.detail = f"influxd down {fault.plan.hold:.1f} s + restart"


def _clickhouse_pause(stack: Stack, fault: Fault) -> None:
    stack.clickhouse.pause()
    try:
        time.sleep(fault.plan.hold)
    finally:
        stack.clickhouse.resume()
    fault.detail = f"clickhouse stopped {fault.plan.hold:.1f} s (timeout {SINK_TIMEOUT} s)"


def _clickhouse_kill(stack: Stack, fault: Fault) -> None:
    stack.clickhouse.kill()
    time.sleep(fault.plan.hold)
    stack.clickhouse.start()
    fault.detail = f"clickhouse down {fault.plan.hold:.1f} s + restart"


def _worker_kill(stack: Stack, fault: Fault) -> None:
    pids = stack.worker_pids()
    pid = pids[fault.plan.pick % len(pids)]
    fault.killed_at, fault.killed_wall = time.monotonic(), time.time()
    os.kill(pid, signal.SIGKILL)  # a worker of the gunicorn this run started
    fault.killed_worker = pid
    deadline = time.monotonic() + 5.0
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        try:  # gone, or a zombie gunicorn has not reaped yet
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
        except (OSError, IndexError):
            break
        time.sleep(0.01)
    fault.killed_counts = stack.metrics_counts(pid)
    time.sleep(fault.plan.hold)
    stack.wait_for_workers()  # gunicorn has started another
    fault.detail = f"worker {pid} SIGKILLed"


def _influx_drop_database(stack: Stack, fault: Fault) -> None:
    # What the database holds is read in the same request as the DROP: those points are
    # removed by the operator, an expected loss. So that no write lands between the two
    # statements, the workers are frozen meanwhile (SIGSTOP, 0.3 s: writes already sent
    # are applied first); the client's requests wait.
    q = 'SELECT "request_id" FROM "request"; SELECT "request_id" FROM "error"; DROP DATABASE "{}"'
    workers = stack.worker_pids()
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(0.3)
        result = stack.influxd.query(q.format(stack.db), stack.db)
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    for series, statement in zip(("request", "error"), result.get("results", []), strict=False):
        ids: set[str] = set()
        for rows in statement.get("series", []):
            column = rows["columns"].index("request_id")
            ids.update(str(values[column]) for values in rows["values"])
        fault.dropped_ids[series] = ids
    time.sleep(fault.plan.hold)
    fault.detail = f"database dropped holding {len(fault.dropped_ids.get('request', ()))} requests"


def _metrics_dir_removed(stack: Stack, fault: Fault) -> None:
    shutil.rmtree(stack.metrics_dir, ignore_errors=True)
    time.sleep(fault.plan.hold)
    fault.detail = "multiprocess_dir removed"


def _slow_sink(stack: Stack, fault: Fault) -> None:
    server = stack.influxd if fault.plan.pick % 2 else stack.clickhouse
    server.pause()
    try:
        time.sleep(fault.plan.hold)
    finally:
        server.resume()
    fault.detail = f"{server.binary} stopped {fault.plan.hold:.1f} s (< timeout {SINK_TIMEOUT} s)"


# kind -> (action, shortest hold, longest hold)
_ACTIONS: Final[dict[str, tuple[Callable[[Stack, Fault], None], float, float]]] = {
    "influxd_pause": (_influxd_pause, SINK_TIMEOUT + 0.5, SINK_TIMEOUT + 2.5),
    "influxd_kill": (_influxd_kill, 0.5, 2.5),
    "clickhouse_pause": (_clickhouse_pause, SINK_TIMEOUT + 0.5, SINK_TIMEOUT + 2.5),
    "clickhouse_kill": (_clickhouse_kill, 0.5, 2.5),
    "worker_kill": (_worker_kill, 0.2, 1.0),
    "influx_drop_database": (_influx_drop_database, 0.5, 1.5),
    "metrics_dir_removed": (_metrics_dir_removed, 0.5, 1.5),
    "slow_sink": (_slow_sink, 0.3, SINK_TIMEOUT - 0.7),
}
KINDS: Final = tuple(_ACTIONS)


def plan(seed: int, steps: int, kinds: tuple[str, ...] = KINDS) -> list[FaultPlan]:
    """``steps`` faults drawn by ``random.Random(seed)``: the same seed, the same plan."""
    rng = random.Random(seed)
    out = []
    for index in range(steps):
        kind = rng.choice(kinds)
        _, low, high = _ACTIONS[kind]
        out.append(
            FaultPlan(
                index=index + 1,
                kind=kind,
                hold=round(rng.uniform(low, high), 2),
                quiet=round(rng.uniform(1.0, 2.5), 2),
                pick=rng.randrange(1_000_000),
            )
        )
    return out


def apply(stack: Stack, planned: FaultPlan) -> Fault:
    """Inject, hold and undo one fault (blocking); what happened."""
    fault = Fault(planned, started=time.monotonic(), started_wall=time.time())
    action, _, _ = _ACTIONS[planned.kind]
    try:
        action(stack, fault)
    except Exception as exc:  # reported with the table; the run goes on
        fault.error = repr(exc)[:300]
    fault.ended = time.monotonic()
    return fault
