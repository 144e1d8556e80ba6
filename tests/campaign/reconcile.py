"""The exact reconciliation: what each store holds against what the client received.

Per point store (InfluxDB, ClickHouse) and series (``request`` for every answer,
``error`` for every answer with a failed status), each id the client received is
present exactly once, missing or duplicated; an id nobody received is *foreign*. A
missing id is an *expected* loss only when it is attributed exactly:

- lost to a worker SIGKILL: the answer came from a worker the campaign killed
  (``X-Worker``) and lunamon has no crash spool; with a spool, only when the answer
  came within :data:`SPOOL_WINDOW` seconds before the kill (RELIABILITY.md 40 promises
  the points emitted earlier), else it is missing;
- removed with a dropped database (InfluxDB): the database held it when the operator
  dropped it (read in the same request as the ``DROP``).

A foreign id whose point was recorded by a killed worker (its ``worker`` field) is a
request cut by the kill: recorded, never answered; expected too.

Prometheus holds counts, not ids: ``request_count_total`` summed must equal the requests
the live workers answered plus what each killed worker had counted in its
``multiprocess_dir`` file when it died (its buffered requests are the kill's loss);
``errors_count_total`` likewise for failed answers; with a spool, the answers less at
most those of a killed worker's last second. Read from the real prometheus after a final
scrape, and from the service's ``/metrics`` directly, several times: whichever worker
answers, the same numbers. Over the run, a counter never steps back (Prometheus would
read a reset; one within :data:`KILL_WINDOW` seconds after a kill is the kill's) and
never exceeds the requests answered plus those cut by a kill.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .faults import Fault
from .traffic import Answer

__all__ = [
    "CountRow",
    "IdRow",
    "Reconciliation",
    "StatsRow",
    "StoredPoint",
    "by_fault",
    "count_row",
    "decreases",
    "during",
    "examples",
    "id_row",
    "markdown",
    "stats_markdown",
    "stats_rows",
    "steps_back",
]

FAILED = range(400, 600)
SPOOL_WINDOW = 1.0  # seconds before a SIGKILL in which the spool may lose points


def _lost_to_kill(answer: Answer, faults: Sequence[Fault], spool: bool) -> bool:
    """Whether ``answer``'s point may be lost to the SIGKILL of the worker that served it."""
    for fault in faults:
        if fault.killed_worker and fault.killed_worker == answer.worker:
            return not spool or answer.received >= fault.killed_at - SPOOL_WINDOW
    return False


@dataclass(frozen=True)
class StoredPoint:
    """One stored point: its request id and the pid of the worker that recorded it (0
    when the point has no ``worker`` field, as ``error`` points do)."""

    request_id: str
    worker: int = 0


@dataclass
class IdRow:
    store: str
    series: str
    expected: int = 0
    once: int = 0
    missing: list[str] = field(default_factory=list)
    duplicated: dict[str, int] = field(default_factory=dict)  # id -> copies stored
    foreign: list[str] = field(default_factory=list)
    lost_to_kill: int = 0
    dropped: int = 0
    cut_by_kill: int = 0
    unreadable: str = ""

    @property
    def exact(self) -> bool:
        return not (self.missing or self.duplicated or self.foreign or self.unreadable)


@dataclass
class CountRow:
    source: str
    metric: str
    served: int
    expected: int
    counted: float | None
    lost_to_kill: int
    resets: float | None = None  # steps back not explained by a kill
    peak: float | None = None
    note: str = ""
    resets_after_kill: int = 0
    spread: tuple[float, float] | None = None  # (least, most) of several scrapes
    bound: int = 0  # the most it may ever count: the answers and the unanswered requests
    tolerance: int = 0  # with a spool: counts the kill's last second may have lost
    cut: int = 0  # counts a killed worker's file may hold of requests it never answered

    @property
    def exact(self) -> bool:
        over = self.peak is not None and self.peak > self.bound
        if self.counted is None:
            return False
        if self.spread is not None and self.spread[0] != self.spread[1]:
            return False  # the workers answering the scrapes disagree
        within = self.expected - self.tolerance <= self.counted <= self.expected + self.cut
        return within and not over and not self.resets


@dataclass
class Reconciliation:
    ids: list[IdRow]
    counts: list[CountRow]
    stats: list[StatsRow] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        rows: list[IdRow | CountRow | StatsRow] = [*self.ids, *self.counts, *self.stats]
        return all(row.exact for row in rows)


def id_row(
    store: str,
    series: str,
    answers: Sequence[Answer],
    stored: Iterable[StoredPoint],
    faults: Sequence[Fault],
    *,
    spool: bool,
    workers_by_id: Mapping[str, int] | None = None,
) -> IdRow:
    """Reconcile one store's series; ``workers_by_id`` gives the recording worker of an id
    whose point has no ``worker`` field (an ``error`` point: from its ``request`` point)."""
    row = IdRow(store, series)
    wanted = {a.request_id: a for a in answers if series == "request" or a.status in FAILED}
    row.expected = len(wanted)
    copies: Counter[str] = Counter()
    recorded_by: dict[str, int] = dict(workers_by_id or {})
    for point in stored:
        copies[point.request_id] += 1
        if point.worker:
            recorded_by[point.request_id] = point.worker
    killed = {f.killed_worker for f in faults if f.killed_worker}
    dropped: set[str] = set()
    if store == "influxdb":  # the only store whose database the campaign drops
        dropped = dropped.union(*(f.dropped_ids.get(series, set()) for f in faults))
    for rid, answer in wanted.items():
        n = copies.get(rid, 0)
        if n == 1:
            row.once += 1
        elif n > 1:
            row.duplicated[rid] = n
        elif rid in dropped:  # first: it was stored, whoever recorded it
            row.dropped += 1
        elif _lost_to_kill(answer, faults, spool):
            row.lost_to_kill += 1
        else:
            row.missing.append(rid)
    for rid in copies:
        if rid not in wanted:
            if recorded_by.get(rid, 0) in killed:
                row.cut_by_kill += 1
            else:
                row.foreign.append(rid)
    return row


LEAD = 1.0  # seconds before a fault whose requests' points it may meet
KILL_WINDOW = 5.0  # seconds after a SIGKILL in which a counter may step back


def decreases(samples: Sequence[tuple[float, float]], kills: Sequence[float]) -> tuple[int, int]:
    """How often a counter's value stepped back over time-ordered ``samples`` (time, value):
    (not explained, within :data:`KILL_WINDOW` seconds after a kill in ``kills``). A killed
    worker's counts beyond its last file write vanish with it: without a spool that
    step back is its loss; with one, the adopter counts them again."""
    unexplained = after_kill = 0
    for (_, before), (when, value) in itertools.pairwise(samples):
        if value < before:
            if any(0.0 <= when - kill <= KILL_WINDOW for kill in kills):
                after_kill += 1
            else:
                unexplained += 1
    return unexplained, after_kill


def steps_back(samples: Sequence[tuple[float, float]]) -> list[float]:
    """The times at which a counter's value stepped back."""
    return [when for (_, before), (when, value) in itertools.pairwise(samples) if value < before]


def during(when: float, faults: Sequence[Fault], clock: str = "monotonic") -> str:
    """The fault under way (or the last one before) at ``when``: ``"#5 metrics_dir_removed"``."""
    found = "before any fault"
    for i, fault in enumerate(faults, 1):
        start = fault.started if clock == "monotonic" else fault.started_wall
        if when >= start:
            found = f"#{i} {fault.plan.kind}"
    return found


def count_row(
    source: str,
    metric: str,
    answers: Sequence[Answer],
    counted: float | None,
    dead_counts: Mapping[int, int | None],
    faults: Sequence[Fault] = (),
    *,
    spool: bool = False,
    unanswered: int = 0,
    resets: tuple[int, int] | None = None,
    peak: float | None = None,
    spread: tuple[float, float] | None = None,
) -> CountRow:
    """Reconcile one counter: ``dead_counts`` is, per killed worker, what its file counted
    when it died (``None``: no file), for the requests (or errors) of ``metric``.
    The counter may never exceed the answers plus the ``unanswered`` requests (cut by a kill).
    ``resets``: what :func:`decreases` found over the run."""
    steps_back = None if resets is None else resets[0]
    after_kill = 0 if resets is None else resets[1]
    errors = metric.startswith("errors")
    counted_answers = [a for a in answers if not errors or a.status in FAILED]
    served = len(counted_answers)
    expected, lost, notes, excess = served, 0, [], 0
    if spool:  # a killed worker's points come back from the spool, but its last second's
        tolerance = sum(1 for a in counted_answers if _lost_to_kill(a, faults, True))
        return CountRow(
            source, metric, served, served, counted, 0, steps_back, peak,
            f"spool: up to {tolerance} of the last second before a kill may be lost"
            if tolerance else "",
            bound=served + unanswered,
            tolerance=tolerance,
            resets_after_kill=after_kill,
            spread=spread,
        )  # fmt: skip
    for pid, in_file in dead_counts.items():
        by_pid = sum(1 for a in counted_answers if a.worker == pid)
        if in_file is None:
            notes.append(f"worker {pid}: no file when it died")
            continue
        if in_file > by_pid:  # recorded but never answered (cut by the kill), or counted twice
            notes.append(f"worker {pid}: its file counts {in_file - by_pid} more than it answered")
            excess += in_file - by_pid
        lost += max(0, by_pid - in_file)
        expected -= max(0, by_pid - in_file)
    return CountRow(
        source,
        metric,
        served,
        expected,
        counted,
        lost,
        steps_back,
        peak,
        "; ".join(notes),
        bound=served + unanswered,
        resets_after_kill=after_kill,
        spread=spread,
        cut=min(excess, unanswered),
    )


# --------------------------------------------------------------------------- the tables


def _n(value: float | None) -> str:
    if value is None:
        return "-"
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def markdown(result: Reconciliation, *, spool: bool) -> str:
    lines = [
        "| store | series | client got | exactly once | missing | duplicated | foreign"
        " | lost to a worker SIGKILL (no spool; with one, its last second)"
        " | removed with the dropped database"
        " | cut by a worker SIGKILL | exact |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in result.ids:
        extra = sum(n - 1 for n in row.duplicated.values())
        dup = f"{len(row.duplicated)} ({extra} extra rows)" if row.duplicated else "0"
        verdict = "yes" if row.exact else f"**NO** {row.unreadable}".strip()
        lines.append(
            f"| {row.store} | {row.series} | {row.expected} | {row.once} | {len(row.missing)}"
            f" | {dup} | {len(row.foreign)} | {row.lost_to_kill} | {row.dropped}"
            f" | {row.cut_by_kill} | {verdict} |"
        )
    lines += [
        "",
        "| source | counter | served | expected (minus a killed worker's loss)"
        " | counted | lost to a worker SIGKILL | steps back during the run (after a kill)"
        " | peak during the run | exact |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in result.counts:
        verdict = "yes" if c.exact else "**NO**"
        note = f" ({c.note})" if c.note else ""
        counted = _n(c.counted)
        expected = f"{c.expected - c.tolerance}..{c.expected}" if c.tolerance else str(c.expected)
        if c.spread is not None and c.spread[0] != c.spread[1]:
            counted += f" (scrapes: {_n(c.spread[0])}..{_n(c.spread[1])})"
        lines.append(
            f"| {c.source} | {c.metric} | {c.served} | {expected} | {counted}"
            f" | {c.lost_to_kill}{note} | {_n(c.resets)} ({c.resets_after_kill})"
            f" | {_n(c.peak)} | {verdict} |"
        )
    if not spool:
        lines += ["", "(no `spool_dir` in this lunamon: a killed worker's buffered points are"
                  " an expected, attributed loss)"]  # fmt: skip
    return "\n".join(lines)


def by_fault(result: Reconciliation, answers: Sequence[Answer], faults: Sequence[Fault]) -> str:
    """Which fault each anomalous request met: the last one that began at most
    :data:`LEAD` seconds after the request was sent (a point waits up to a flush
    interval, then is in flight: a fault meets the points of the second before it).
    Missing and duplicated ids per fault and store."""
    sent = {a.request_id: a.sent for a in answers}
    worker = {a.request_id: a.worker for a in answers}
    killed = {f.killed_worker for f in faults if f.killed_worker}
    starts = [f.started for f in faults]

    def window(rid: str) -> int:
        t = sent.get(rid, 0.0)
        index = 0
        for i, start in enumerate(starts):
            if t >= start - LEAD:
                index = i + 1
        return index

    table: dict[int, dict[str, Counter[str]]] = {}
    for row in result.ids:
        key = f"{row.store}.{row.series}"
        for kind, ids in (("missing", row.missing), ("duplicated", list(row.duplicated))):
            for rid in ids:
                counter = table.setdefault(window(rid), {}).setdefault(key, Counter())
                counter[kind] += 1
                if worker.get(rid) in killed:
                    counter[f"{kind} (answered by a worker killed later)"] += 1
    lines = ["| # | fault | held | what happened | anomalies of the requests it met |",
             "|---|---|---:|---|---|"]  # fmt: skip
    rows = [(0, "(before any fault)", "", "", "")]
    for i, f in enumerate(faults, 1):
        what = f.detail + (f" ERROR {f.error}" if f.error else "")
        rows.append((i, f.plan.kind, f"{f.ended - f.started:.1f} s", what, ""))
    for i, kind, held, what, _ in rows:
        found = table.get(i, {})
        text = "; ".join(
            f"{key}: " + ", ".join(f"{n} {what_}" for what_, n in sorted(c.items()))
            for key, c in sorted(found.items())
        )
        lines.append(f"| {i} | {kind} | {held} | {what} | {text or '-'} |")
    return "\n".join(lines)


def examples(
    result: Reconciliation, answers: Sequence[Answer], faults: Sequence[Fault], limit: int = 3
) -> str:
    """A few ids of each anomaly, with what the client knows of them, to look them up."""
    by_id = {a.request_id: a for a in answers}
    t0 = min((a.sent for a in answers), default=0.0)
    lines = []
    for row in result.ids:
        found = [(rid, "missing") for rid in row.missing[:limit]]
        found += [(rid, f"{n} copies") for rid, n in list(row.duplicated.items())[:limit]]
        found += [(rid, "foreign") for rid in row.foreign[:limit]]
        for rid, what in found:
            answer = by_id.get(rid)
            known = (
                f"{answer.path} -> {answer.status}, worker {answer.worker},"
                f" sent at +{answer.sent - t0:.2f} s ({during(answer.sent, faults)})"
                if answer is not None
                else "never answered"
            )
            lines.append(f"- {row.store}.{row.series} {what}: `{rid}` {known}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- stats()


@dataclass
class StatsRow:
    """One sink's ``stats()`` summed over the workers that stopped gracefully, against
    what its store holds (``held``: points now stored, and those the operator's DROP
    removed; ``None`` for a sink without a store to read)."""

    sink: str
    emitted: int
    written: int
    dropped: dict[str, int]
    buffered: int
    events: dict[str, int]
    held: int | None
    balanced: bool  # emitted == written + dropped + buffered in every worker
    complete: bool  # no worker killed: every worker's stats are here

    @property
    def exact(self) -> bool:
        if not self.balanced:
            return False
        if not self.complete:
            return True  # a killed worker's counts died with it: only the balance holds
        nothing_lost = not any(self.dropped.values()) and self.buffered == 0
        return nothing_lost and (self.held is None or self.written == self.held)


def stats_rows(
    final: Mapping[int, Mapping[str, Any]], held: Mapping[str, int | None], killed: bool
) -> list[StatsRow]:
    """``final``: pid -> that worker's last ``stats()``; ``held``: sink -> points held."""
    rows: dict[str, StatsRow] = {}
    for stats in final.values():
        for sink, s in stats.items():
            row = rows.setdefault(
                sink, StatsRow(sink, 0, 0, {}, 0, {}, held.get(sink), True, not killed)
            )
            row.emitted += int(s["emitted"])
            row.written += int(s["written"])
            row.buffered += int(s["buffered"])
            for reason, n in s["dropped"].items():
                row.dropped[reason] = row.dropped.get(reason, 0) + int(n)
            for event, n in (s.get("events") or {}).items():
                row.events[event] = row.events.get(event, 0) + int(n)
            accounted = int(s["written"]) + sum(int(n) for n in s["dropped"].values())
            row.balanced &= int(s["emitted"]) == accounted + int(s["buffered"])
    return sorted(rows.values(), key=lambda r: r.sink)


def stats_markdown(rows: Sequence[StatsRow], workers: int) -> str:
    lines = [
        f"`stats()` of the {workers} workers that stopped gracefully, summed:",
        "",
        "| sink | emitted | written | dropped | buffered | events | the store holds"
        " | balanced | exact |",
        "|---|---:|---:|---|---:|---|---:|---|---|",
    ]
    for r in rows:
        dropped = ", ".join(f"{k} {n}" for k, n in sorted(r.dropped.items()) if n) or "0"
        events = ", ".join(f"{k} {n}" for k, n in sorted(r.events.items())) or "-"
        held = "-" if r.held is None else str(r.held)
        verdict = "**NO**"
        if r.exact:
            verdict = "yes" if r.complete else "balanced (a worker was killed)"
        lines.append(
            f"| {r.sink} | {r.emitted} | {r.written} | {dropped} | {r.buffered} | {events}"
            f" | {held} | {'yes' if r.balanced else '**NO**'} | {verdict} |"
        )
    return "\n".join(lines)
