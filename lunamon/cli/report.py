"""``lunamon report``: latency, sub-step and error tables from ``request``/``error`` points.

Points come from a line-protocol file (:func:`load_file`) or from InfluxDB
(:func:`lunamon.cli.influxql.query_points`); :func:`build_report` checks them
against the data rules of DESIGN.md §1 and summarises them per route.
Percentiles interpolate linearly between the two closest ranks (numpy's
default, ``statistics.quantiles(..., method="inclusive")``).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from lunamon.lineprotocol import LineProtocolError, parse_line_protocol
from lunamon.point import FieldValue, Point

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "ErrorGroup",
    "Report",
    "ReportInputError",
    "RouteSummary",
    "StepSummary",
    "build_report",
    "load_file",
    "percentile",
    "print_report",
]

REQUEST: Final = "request"
ERROR: Final = "error"
_EXCERPT: Final = 120


class ReportInputError(ValueError):
    """Input the report cannot use; the message is one line that says where and why."""


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class StepSummary:
    """One sub-step field of a route: how often it ran and its part of the route's time."""

    name: str
    requests: int  # requests of the route in which the step ran
    total: float  # seconds, summed over those requests
    mean: float  # seconds per request of the route (0 where it did not run)
    share: float  # total / the route's summed execution_time


@dataclass(frozen=True)
class RouteSummary:
    """Requests of one route: counts, error rate and execution_time percentiles (seconds)."""

    route: str
    requests: int
    errors: int
    minimum: float
    p25: float
    p50: float
    p75: float
    p95: float
    p99: float
    maximum: float
    mean: float
    steps: tuple[StepSummary, ...]

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class ErrorGroup:
    """Failed requests with one ``error_code`` and status."""

    error_code: int
    status: int
    count: int
    routes: dict[str, int]

    @property
    def label(self) -> str:
        return f"{self.error_code} ({self.status})"


@dataclass(frozen=True)
class Report:
    """What ``lunamon report`` shows, computed once from the points."""

    source: str
    services: tuple[str, ...]
    start_ns: int
    end_ns: int
    requests: int
    errors: int
    routes: tuple[RouteSummary, ...]
    error_groups: tuple[ErrorGroup, ...]
    # (time_ns, ErrorGroup.label) of every error point, in time order: the timeline chart.
    error_events: tuple[tuple[int, str], ...] = field(repr=False)
    request_times: tuple[int, ...] = field(repr=False)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data (``lunamon report --json``), times in seconds."""
        data = asdict(self)
        del data["error_events"], data["request_times"]
        for route, summary in zip(data["routes"], self.routes, strict=True):
            route["error_rate"] = summary.error_rate
        data["error_rate"] = self.error_rate
        return data


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of sorted values, linear between closest ranks."""
    if not ordered:
        raise ValueError("percentile of no values")
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    fraction = position - low
    return ordered[low] + (ordered[high] - ordered[low]) * fraction


# --------------------------------------------------------------------------- input


def load_file(path: str | Path) -> list[Point]:
    """The points of a line-protocol file; :class:`ReportInputError` for anything unusable."""
    name = str(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ReportInputError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ReportInputError(f"{name}: is a directory, not a line-protocol file") from None
    except OSError as exc:
        raise ReportInputError(f"{name}: cannot read it: {exc.strerror or exc}") from None
    if not data:
        raise ReportInputError(f"{name}: the file is empty")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ReportInputError(
            f"{name}: not line protocol (not UTF-8 text: byte {exc.start})"
        ) from None
    try:
        points = parse_line_protocol(text)
    except LineProtocolError as exc:
        raise ReportInputError(f"{name}: {exc}") from None
    except (ValueError, IndexError) as exc:  # the parser's own checks should catch all
        raise ReportInputError(f"{name}: not line protocol ({exc})") from None
    if not points:
        raise ReportInputError(f"{name}: no points in the file (only blank lines or comments)")
    _check_not_truncated(name, text, points)
    return points


def _check_not_truncated(name: str, text: str, points: list[Point]) -> None:
    """A last line cut inside its timestamp still parses; catch it by its short timestamp."""
    if text.endswith("\n") or len(points) < 2:
        return
    last, previous = points[-1].time_ns, points[-2].time_ns
    if len(str(abs(last))) < len(str(abs(previous))):
        lineno = text.count("\n") + 1
        raise ReportInputError(
            f"{name}: line {lineno}: truncated (no newline at the end and a timestamp"
            f" of {len(str(abs(last)))} digits after ones of {len(str(abs(previous)))})"
        )


def _excerpt(point: Point) -> str:
    line = point.to_line_protocol().replace("\n", "\\n").replace("\r", "\\r")
    return line if len(line) <= _EXCERPT else line[: _EXCERPT - 3] + "..."


def _bad(source: str, point: Point, problem: str) -> ReportInputError:
    return ReportInputError(f"{source}: {problem} in: {_excerpt(point)}")


def _int_tag(source: str, point: Point, key: str) -> int:
    value = point.tags.get(key)
    if value is None:
        raise _bad(source, point, f"{point.series} point without tag {key!r}")
    try:
        return int(value)
    except ValueError:
        raise _bad(source, point, f"tag {key}={value!r} is not an integer") from None


def _route(source: str, point: Point) -> str:
    route = point.tags.get("route")
    if not route:
        raise _bad(source, point, f"{point.series} point without tag 'route'")
    return route


def _type_name(value: FieldValue) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}
    return names[type(value)]


def _seconds(source: str, point: Point, key: str, value: FieldValue) -> float:
    if type(value) is not float:
        raise _bad(source, point, f"field {key} is {_type_name(value)}, expected a float")
    if value < 0:
        raise _bad(source, point, f"field {key}={value!r} is negative")
    return value


# --------------------------------------------------------------------------- summary


def build_report(points: Iterable[Point], *, source: str, service: str | None = None) -> Report:
    """Summarise ``request`` and ``error`` points (other series are ignored).

    Raises :class:`ReportInputError` for a point that breaks the data rules
    (missing ``route``/``status_code``/``execution_time``, a ``*_time`` field
    that is not a float, ...) and when there is no ``request`` point at all.
    """
    durations: dict[str, list[float]] = defaultdict(list)
    step_totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    step_counts: dict[str, Counter[str]] = defaultdict(Counter)
    errors_by_route: Counter[str] = Counter()
    groups: dict[tuple[int, int], Counter[str]] = defaultdict(Counter)
    error_events: list[tuple[int, tuple[int, int]]] = []
    request_times: list[int] = []
    services: set[str] = set()
    for point in points:
        if point.series not in (REQUEST, ERROR):
            continue
        if service is not None and point.tags.get("service") != service:
            continue
        route = _route(source, point)
        status = _int_tag(source, point, "status_code")
        if "service" in point.tags:
            services.add(point.tags["service"])
        if point.series == ERROR:
            code = _int_tag(source, point, "error_code")
            errors_by_route[route] += 1
            groups[(code, status)][route] += 1
            error_events.append((point.time_ns, (code, status)))
            continue
        if "execution_time" not in point.fields:
            raise _bad(source, point, "request point without field 'execution_time'")
        totals = step_totals[route]
        counts = step_counts[route]
        for key, value in point.fields.items():
            if key == "execution_time":
                durations[route].append(_seconds(source, point, key, value))
            elif key.endswith("_time"):
                totals[key] += _seconds(source, point, key, value)
                counts[key] += 1
        request_times.append(point.time_ns)
    if not request_times:
        where = f" of service {service!r}" if service is not None else ""
        raise ReportInputError(f"{source}: no 'request' points{where}: nothing to report")
    routes = []
    for route in sorted(durations):
        values = sorted(durations[route])
        executed = math.fsum(values)
        steps = tuple(
            StepSummary(
                name=name,
                requests=step_counts[route][name],
                total=total,
                mean=total / len(values),
                share=total / executed if executed else 0.0,
            )
            for name, total in step_totals[route].items()
        )
        routes.append(
            RouteSummary(
                route=route,
                requests=len(values),
                errors=errors_by_route[route],
                minimum=values[0],
                p25=percentile(values, 25),
                p50=percentile(values, 50),
                p75=percentile(values, 75),
                p95=percentile(values, 95),
                p99=percentile(values, 99),
                maximum=values[-1],
                mean=executed / len(values),
                steps=tuple(sorted(steps, key=lambda s: -s.total)),
            )
        )
    error_groups = tuple(
        sorted(
            (
                ErrorGroup(code, status, sum(by_route.values()), dict(by_route.most_common()))
                for (code, status), by_route in groups.items()
            ),
            key=lambda g: (-g.count, g.error_code, g.status),
        )
    )
    error_events.sort()
    request_times.sort()
    return Report(
        source=source,
        services=tuple(sorted(services)),
        start_ns=request_times[0],
        end_ns=request_times[-1],
        requests=len(request_times),
        errors=len(error_events),
        routes=tuple(routes),
        error_groups=error_groups,
        error_events=tuple((t, f"{code} ({status})") for t, (code, status) in error_events),
        request_times=tuple(request_times),
    )


# --------------------------------------------------------------------------- terminal


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def _percent(value: float) -> str:
    return f"{value * 100:.1f}%"


def _when(time_ns: int) -> str:
    moment = datetime.fromtimestamp(time_ns / 1e9, tz=timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _top_routes(routes: dict[str, int], shown: int = 2) -> str:
    """The busiest routes of an error group, e.g. ``POST:/detector 12, ... +3 more``."""
    items = list(routes.items())
    text = ", ".join(f"{route} {n}" for route, n in items[:shown])
    return text + (f", +{len(items) - shown} more" if len(items) > shown else "")


def print_report(report: Report, console: Console) -> None:
    """The three tables of the report: routes, sub-steps, errors."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    span = (report.end_ns - report.start_ns) / 1e9
    services = escape(", ".join(report.services) or "(no service tag)")
    console.print(
        f"[bold]{services}[/bold]: {report.requests:,} requests, {report.errors:,} failed"
        f" ({_percent(report.error_rate)}), {_when(report.start_ns)} + {span:.1f} s"
        f"  [dim](from {escape(report.source)})[/dim]",
        soft_wrap=True,
    )

    routes = Table(title="Requests by route (execution_time in ms)", box=box.SIMPLE_HEAD)
    routes.add_column("route", no_wrap=True)
    for name in ("requests", "errors", "error rate", "p50", "p95", "p99", "max"):
        routes.add_column(name, justify="right", no_wrap=True)
    for r in report.routes:
        routes.add_row(
            escape(r.route),
            f"{r.requests:,}",
            f"{r.errors:,}",
            _percent(r.error_rate),
            _ms(r.p50),
            _ms(r.p95),
            _ms(r.p99),
            _ms(r.maximum),
        )
    console.print(routes)

    steps = Table(
        title="Sub-steps: share of the route's time",
        caption="steps of one request may run concurrently: shares can add up to over 100%",
        box=box.SIMPLE_HEAD,
    )
    steps.add_column("route", no_wrap=True)
    steps.add_column("sub-step", no_wrap=True)
    steps.add_column("ran in", justify="right", no_wrap=True)
    steps.add_column("mean ms", justify="right", no_wrap=True)
    steps.add_column("share", justify="right", no_wrap=True)
    for r in report.routes:
        for index, step in enumerate(r.steps):
            steps.add_row(
                escape(r.route) if index == 0 else "",
                escape(step.name),
                _percent(step.requests / r.requests),
                _ms(step.mean),
                _percent(step.share),
                end_section=index == len(r.steps) - 1,
            )
    if any(r.steps for r in report.routes):
        console.print(steps)

    if not report.error_groups:
        console.print("No failed requests.")
        return
    errors = Table(title="Errors by error_code and status", box=box.SIMPLE_HEAD)
    for name in ("error_code", "status", "count", "of requests"):
        errors.add_column(name, justify="right", no_wrap=True, min_width=len(name))
    errors.add_column("busiest routes", no_wrap=True, overflow="ellipsis", max_width=72)
    for group in report.error_groups:
        errors.add_row(
            str(group.error_code),
            str(group.status),
            f"{group.count:,}",
            _percent(group.count / report.requests),
            escape(_top_routes(group.routes)),
        )
    console.print(errors)
