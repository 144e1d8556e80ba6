"""``lunamon trace REQUEST_ID SOURCE...``: one request across services, as a waterfall.

Every ``request`` and ``error`` point whose ``request_id`` field is the id is gathered
from the sources (line-protocol files, streamed; InfluxDB; ClickHouse), one service's
point per call it served. A point is drawn from its start (the point's time, wall
clock) for its ``execution_time``; a point that starts inside another's interval is
its child (the call that one made), the innermost such. Offsets are from the earliest
start. Points of services on different hosts are placed by those hosts' clocks: a
skew between them shows as an offset, and a child may then seem to start before, or
end after, its parent.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Final

from lunamon.cli.report import ERROR, REQUEST, file_records
from lunamon.lineprotocol import Record, to_point
from lunamon.point import Point

if TYPE_CHECKING:
    from lunamon.cli.clickhouse import ClickHouseTarget
    from lunamon.cli.influxql import InfluxTarget

__all__ = [
    "Span",
    "Trace",
    "TraceBuilder",
    "format_trace",
    "query_clickhouse",
    "query_influx",
    "trace_html",
    "write_trace_html",
]

_BAR: Final = 40  # characters of the text waterfall


@dataclass
class Span:
    """One service's ``request`` point of the request, with its ``error`` point if any."""

    service: str
    route: str
    status: str
    start_ns: int
    execution_time: float  # seconds
    steps: tuple[tuple[str, float], ...]  # (field, seconds), in the point's order
    source: str
    error_code: str | None = None
    children: list[Span] = field(default_factory=list)

    @property
    def end_ns(self) -> int:
        return self.start_ns + round(self.execution_time * 1e9)


@dataclass
class Trace:
    """The request's spans nested by time, and error points without a request point."""

    request_id: str
    roots: list[Span]
    orphan_errors: list[Point]
    sources: dict[str, int]  # source -> points found there

    @property
    def start_ns(self) -> int:
        starts = [span.start_ns for span in self.roots]
        starts += [point.time_ns for point in self.orphan_errors]
        return min(starts)

    @property
    def end_ns(self) -> int:
        ends = [span.end_ns for span, _ in self.walk()]
        ends += [point.time_ns for point in self.orphan_errors]
        return max(ends)

    @property
    def services(self) -> list[str]:
        return sorted({span.service for span, _ in self.walk()})

    def walk(self) -> Iterator[tuple[Span, int]]:
        """Every span with its depth, parents before children, each level by start."""
        stack = [(span, 0) for span in reversed(self.roots)]
        while stack:
            span, depth = stack.pop()
            yield span, depth
            stack.extend((child, depth + 1) for child in reversed(span.children))


class TraceBuilder:
    """Gathers the points of one request id from any number of sources."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._needle = f'request_id="{request_id}"'
        self.points: list[tuple[Point, str]] = []
        self.sources: dict[str, int] = {}

    def add(self, point: Point, source: str) -> None:
        """Keep ``point`` when it is a ``request``/``error`` point of the request."""
        if point.series in (REQUEST, ERROR) and point.fields.get("request_id") == self.request_id:
            self.points.append((point, source))
            self.sources[source] = self.sources.get(source, 0) + 1

    def add_points(self, points: Iterable[Point], source: str) -> None:
        self.sources.setdefault(source, 0)
        for point in points:
            self.add(point, source)

    def add_records(self, records: Iterable[Record], source: str) -> None:
        """Records of a line-protocol reader: a line is parsed only when it names the id."""
        self.sources.setdefault(source, 0)
        needle = self._needle
        for record in records:
            if type(record) is Point:
                self.add(record, source)
            elif needle in record[5]:
                self.add(to_point(record), source)

    def add_file(self, path: str | Path) -> None:
        """The points of a line-protocol file (streamed); ``ReportInputError`` if unusable."""
        self.add_records(file_records(path), str(path))

    def build(self) -> Trace | None:
        """The trace, ``None`` when no source holds a point of the request."""
        if not self.points:
            return None
        errors: dict[tuple[int, str, str], Point] = {}
        spans: list[Span] = []
        for point, source in self.points:
            tags = point.tags
            if point.series == ERROR:
                errors[(point.time_ns, tags.get("service", ""), tags.get("route", ""))] = point
                continue
            execution = point.fields.get("execution_time")
            steps = tuple(
                (key, float(value))
                for key, value in point.fields.items()
                if key != "execution_time"
                and key.endswith("_time")
                and isinstance(value, (int, float))
                and not isinstance(value, bool)
            )
            spans.append(
                Span(
                    service=tags.get("service", "?"),
                    route=tags.get("route", "?"),
                    status=tags.get("status_code", "?"),
                    start_ns=point.time_ns,
                    execution_time=(
                        float(execution)
                        if isinstance(execution, (int, float)) and math.isfinite(execution)
                        else 0.0
                    ),
                    steps=steps,
                    source=source,
                )
            )
        for span in spans:
            error = errors.pop((span.start_ns, span.service, span.route), None)
            if error is not None:
                span.error_code = error.tags.get("error_code", "?")
        return Trace(self.request_id, _nest(spans), list(errors.values()), dict(self.sources))


def _nest(spans: list[Span]) -> list[Span]:
    """Each span under the innermost span whose interval holds its start."""
    roots: list[Span] = []
    open_spans: list[Span] = []
    for span in sorted(spans, key=lambda s: (s.start_ns, -s.execution_time)):
        while open_spans and not (open_spans[-1].start_ns <= span.start_ns < open_spans[-1].end_ns):
            open_spans.pop()
        (open_spans[-1].children if open_spans else roots).append(span)
        open_spans.append(span)
    return roots


# --------------------------------------------------------------------------- the stores


def _influx_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


async def query_influx(target: InfluxTarget, request_id: str) -> list[Point]:
    """The ``request`` and ``error`` points of ``request_id`` in an InfluxDB 1.x database."""
    from lunamon.cli.influxql import query_points

    where = f'"request_id" = {_influx_string(request_id)}'
    return await query_points(target, (REQUEST, ERROR), where)


async def query_clickhouse(
    target: ClickHouseTarget, request_id: str, *, timeout: float = 60.0
) -> list[Point]:
    """The rows of ``request_id`` in the ``request`` and ``error`` tables of ClickHouse."""
    from lunamon.cli.clickhouse import query_points
    from lunamon.sinks.clickhouse import quote_string

    # visitParamExtractString: flat JSON, and on every server version.
    matches = f"visitParamExtractString(data, 'request_id') = {quote_string(request_id)}"
    return await query_points(target, (REQUEST, ERROR), where=matches, timeout=timeout)


# --------------------------------------------------------------------------- text


def _points(count: int) -> str:
    return f"{count} point{'s' if count != 1 else ''}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}"


def _when(time_ns: int) -> str:
    moment = datetime.fromtimestamp(time_ns / 1e9, tz=timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def _bar(trace: Trace, start_ns: int, end_ns: int, width: int = _BAR) -> str:
    total = max(trace.end_ns - trace.start_ns, 1)
    left = min(width - 1, int((start_ns - trace.start_ns) / total * width))
    right = max(left + 1, min(width, math.ceil((end_ns - trace.start_ns) / total * width)))
    return "|" + " " * left + "#" * (right - left) + " " * (width - right) + "|"


def format_trace(trace: Trace) -> str:
    """The waterfall as text: one line per service's point, its steps and error below it."""
    span_ms = (trace.end_ns - trace.start_ns) / 1e6
    services = len(trace.services)
    lines = [
        f"request {trace.request_id}: {_points(sum(1 for _ in trace.walk()))} from"
        f" {services} service{'s' if services != 1 else ''}, {span_ms:.3f} ms from the first"
        f" start to the last end, starting {_when(trace.start_ns)}",
        "",
    ]
    rows: list[tuple[str, str, str, str, str]] = []
    for span, depth in trace.walk():
        indent = "  " * depth
        rows.append(
            (
                f"{indent}{span.service} {span.route}",
                span.status,
                f"+{(span.start_ns - trace.start_ns) / 1e6:.3f}",
                _ms(span.execution_time),
                _bar(trace, span.start_ns, span.end_ns),
            )
        )
        for name, seconds in span.steps:
            rows.append((f"{indent}    step {name}", "", "", _ms(seconds), ""))
        if span.error_code is not None:
            rows.append((f"{indent}    error: error_code {span.error_code}", "", "", "", ""))
    for point in trace.orphan_errors:
        tags = point.tags
        rows.append(
            (
                f"{tags.get('service', '?')} {tags.get('route', '?')} error point only:"
                f" error_code {tags.get('error_code', '?')}",
                tags.get("status_code", "?"),
                f"+{(point.time_ns - trace.start_ns) / 1e6:.3f}",
                "",
                "",
            )
        )
    header = ("service route", "status", "start ms", "time ms", "waterfall")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        lines.append(
            f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}"
            f"  {row[3]:>{widths[3]}}  {row[4]}".rstrip()
        )
    lines.append("")
    lines.append(
        "from: "
        + ", ".join(f"{source} ({_points(count)})" for source, count in trace.sources.items())
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- HTML

_CSS: Final = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1d2330; }
h1 { font-size: 18px; margin: 0 0 4px; }
p.meta { color: #5b6475; margin: 0 0 16px; }
table { border-collapse: collapse; width: 100%; }
th, td { padding: 3px 8px; text-align: left; white-space: nowrap; }
th { border-bottom: 2px solid #c9cfdb; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.span td { border-top: 1px solid #e3e7ee; }
tr.step td { color: #5b6475; font-size: 12px; }
tr.error td { color: #b3261e; font-weight: 600; }
td.bar { width: 50%; }
svg { display: block; width: 100%; height: 14px; }
rect.span { fill: #3a6ea5; }
rect.failed { fill: #c0392b; }
rect.step { fill: #8fb3da; }
"""


def _svg_bar(trace: Trace, start_ns: int, end_ns: int, kind: str) -> str:
    total = max(trace.end_ns - trace.start_ns, 1)
    x = (start_ns - trace.start_ns) / total * 100
    width = max((end_ns - start_ns) / total * 100, 0.3)
    return (
        '<svg viewBox="0 0 100 10" preserveAspectRatio="none">'
        f'<rect class="{kind}" x="{x:.3f}" y="1" width="{width:.3f}" height="8"></rect></svg>'
    )


def trace_html(trace: Trace) -> str:
    """A self-contained page (inline CSS and SVG, no script, nothing fetched)."""
    e = html.escape
    rows: list[str] = []
    for span, depth in trace.walk():
        pad = f' style="padding-left: {8 + depth * 20}px"'
        kind = "failed" if span.error_code is not None else "span"
        rows.append(
            f'<tr class="span"><td{pad}>{e(span.service)} <b>{e(span.route)}</b></td>'
            f'<td class="num">{e(span.status)}</td>'
            f'<td class="num">+{(span.start_ns - trace.start_ns) / 1e6:.3f}</td>'
            f'<td class="num">{_ms(span.execution_time)}</td>'
            f'<td class="bar">{_svg_bar(trace, span.start_ns, span.end_ns, kind)}</td></tr>'
        )
        step_pad = f' style="padding-left: {28 + depth * 20}px"'
        for name, seconds in span.steps:
            rows.append(
                f'<tr class="step"><td{step_pad}>step {e(name)}</td><td></td><td></td>'
                f'<td class="num">{_ms(seconds)}</td><td class="bar"></td></tr>'
            )
        if span.error_code is not None:
            rows.append(
                f'<tr class="error"><td{step_pad}>error: error_code {e(span.error_code)}</td>'
                "<td></td><td></td><td></td><td></td></tr>"
            )
    for point in trace.orphan_errors:
        tags = point.tags
        rows.append(
            f'<tr class="error"><td>{e(tags.get("service", "?"))} {e(tags.get("route", "?"))}'
            f" error point only: error_code {e(tags.get('error_code', '?'))}</td>"
            f'<td class="num">{e(tags.get("status_code", "?"))}</td>'
            f'<td class="num">+{(point.time_ns - trace.start_ns) / 1e6:.3f}</td><td></td>'
            "<td></td></tr>"
        )
    sources = ", ".join(f"{e(source)} ({count})" for source, count in trace.sources.items())
    span_ms = (trace.end_ns - trace.start_ns) / 1e6
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>lunamon trace {e(trace.request_id)}</title><style>{_CSS}</style></head><body>"
        f"<h1>request {e(trace.request_id)}</h1>"
        f'<p class="meta">{len(trace.services)} services ({e(", ".join(trace.services))}),'
        f" {span_ms:.3f} ms from the first start to the last end, starting"
        f" {e(_when(trace.start_ns))}; from {sources}</p>"
        '<table id="waterfall"><thead><tr><th>service route</th><th class="num">status</th>'
        '<th class="num">start ms</th><th class="num">time ms</th><th>waterfall</th></tr>'
        f"</thead><tbody>{''.join(rows)}</tbody></table></body></html>\n"
    )


def write_trace_html(trace: Trace, path: str | Path) -> Path:
    target = Path(path)
    target.write_text(trace_html(trace), encoding="utf-8")
    return target
