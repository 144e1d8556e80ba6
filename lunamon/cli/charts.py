"""``lunamon report --html``: one self-contained page with plotly charts.

plotly.js is inlined once (no CDN, works offline); the charts are the
latency distribution per route, the sub-step breakdown per route and the
errors over time by error code, followed by the report's tables.
"""

from __future__ import annotations

import html
from collections import Counter
from pathlib import Path
from typing import Any, Final

from lunamon.cli.report import Report, timeline_width

__all__ = ["render_html", "write_html"]

_STYLE: Final = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 1.4em; margin-bottom: 0; }
p.meta { color: #555; margin-top: 4px; }
table { border-collapse: collapse; margin: 8px 0 24px; font-size: 0.9em; }
th, td { padding: 3px 10px; border-bottom: 1px solid #ddd; text-align: right; }
.text { text-align: left; }
.chart { margin-bottom: 16px; }
"""


def _plotly() -> tuple[Any, Any]:
    import plotly.graph_objects as go  # type: ignore[import-untyped,import-not-found,unused-ignore]
    import plotly.io as pio  # type: ignore[import-untyped,import-not-found,unused-ignore]

    return go, pio


def _palette() -> list[str]:
    """24 distinct colours: the handler-events route alone has 9 sub-steps."""
    import plotly.colors  # type: ignore[import-untyped,import-not-found,unused-ignore]

    colours: list[str] = plotly.colors.qualitative.Dark24
    return colours


_LOG_TICKS: Final = [0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000]
_LEGEND_BELOW: Final = {"orientation": "h", "yanchor": "top", "y": -0.3, "x": 0}


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def latency_figure(report: Report) -> Any:
    """Box per route (p25-p75, median; whiskers min-p99) and markers for p95 and p99."""
    go, _ = _plotly()
    fig = go.Figure()
    names = [r.route for r in report.routes]
    for r in report.routes:
        fig.add_trace(
            go.Box(
                name=r.route,
                x=[r.route],
                q1=[_ms(r.p25)],
                median=[_ms(r.p50)],
                q3=[_ms(r.p75)],
                lowerfence=[_ms(r.minimum)],
                upperfence=[_ms(r.p99)],
                mean=[_ms(r.mean)],
                boxmean=True,
                showlegend=False,
            )
        )
    for label, attr, symbol in (
        ("p95", "p95", "diamond"),
        ("p99", "p99", "x"),
        ("max", "maximum", "circle-open"),
    ):
        fig.add_trace(
            go.Scatter(
                name=label,
                x=names,
                y=[_ms(getattr(r, attr)) for r in report.routes],
                mode="markers",
                marker={"symbol": symbol, "size": 10},
            )
        )
    fig.update_layout(
        title="Latency per route: execution_time (box p25-p75, line median, whiskers min-p99)",
        yaxis={"title": "ms (log scale)", "type": "log", "tickvals": _LOG_TICKS},
        height=480,
    )
    return fig


def steps_figure(report: Report) -> Any:
    """Stacked bars: mean time of each sub-step per request of the route, and the mean
    execution_time beside them (concurrent steps make a stack taller than the request)."""
    go, _ = _plotly()
    fig = go.Figure()
    names = [r.route for r in report.routes]
    step_names: list[str] = []
    for r in report.routes:
        for step in r.steps:
            if step.name not in step_names:
                step_names.append(step.name)
    palette = _palette()
    for index, step_name in enumerate(step_names):
        values = []
        for r in report.routes:
            found = next((s for s in r.steps if s.name == step_name), None)
            values.append(_ms(found.mean) if found is not None else 0.0)
        fig.add_trace(
            go.Bar(
                name=step_name.removesuffix("_time"),
                x=names,
                y=values,
                marker={"color": palette[index % len(palette)]},
            )
        )
    fig.add_trace(
        go.Scatter(
            name="mean execution_time",
            x=names,
            y=[_ms(r.mean) for r in report.routes],
            mode="markers",
            marker={"symbol": "line-ew-open", "size": 40, "line": {"width": 3}, "color": "#111"},
        )
    )
    fig.update_layout(
        barmode="stack",
        title="Sub-step breakdown: mean ms per request, by route",
        yaxis={"title": "ms per request"},
        xaxis={"tickangle": 0},
        legend=_LEGEND_BELOW,
        height=620,
    )
    return fig


def errors_figure(report: Report) -> Any:
    """Stacked bars of failed requests per time bucket, one colour per error code (status)."""
    go, _ = _plotly()
    from datetime import datetime, timezone

    width_ns = timeline_width(report.end_ns - report.start_ns)
    width = width_ns / 1e9
    first = report.start_ns // width_ns  # the bucket of the first request
    buckets = range(first * width_ns, report.end_ns + 1, width_ns)
    labels = [datetime.fromtimestamp(t / 1e9, tz=timezone.utc) for t in buckets]
    timeline = report.timeline
    by_label: dict[str, Counter[int]] = {g.label: Counter() for g in report.error_groups}
    for label, slots in timeline.errors.items():
        counts = timeline.per(width_ns, slots)
        by_label.setdefault(label, Counter()).update({k - first: n for k, n in counts.items()})
    requests = Counter({k - first: n for k, n in timeline.per(width_ns, timeline.requests).items()})
    fig = go.Figure()
    for label, counts in by_label.items():
        fig.add_trace(go.Bar(name=label, x=labels, y=[counts[i] for i in range(len(labels))]))
    fig.add_trace(
        go.Scatter(
            name="requests",
            x=labels,
            y=[requests[i] for i in range(len(labels))],
            mode="lines",
            yaxis="y2",
            line={"color": "#999", "dash": "dot"},
        )
    )
    fig.update_layout(
        barmode="stack",
        title=f"Failed requests over time by error_code (status), per {width:g} s",
        yaxis={"title": "failed requests"},
        yaxis2={
            "title": "requests (dotted)",
            "overlaying": "y",
            "side": "right",
            "rangemode": "tozero",
            "showgrid": False,
            "tickformat": ",d",
        },
        legend={**_LEGEND_BELOW, "y": -0.15, "title": {"text": "error_code (status)"}},
        height=460,
    )
    return fig


def _tables(report: Report) -> str:
    def row(cells: list[str], header: bool = False, text: tuple[int, ...] = (0,)) -> str:
        """One table row; the columns in ``text`` are left-aligned, the numbers right."""
        tag = "th" if header else "td"
        out = []
        for index, cell in enumerate(cells):
            attr = ' class="text"' if index in text else ""
            out.append(f"<{tag}{attr}>{html.escape(cell)}</{tag}>")
        return "<tr>" + "".join(out) + "</tr>"

    parts = ["<h2>Requests by route (execution_time, ms)</h2><table>"]
    parts.append(
        row(["route", "requests", "errors", "error rate", "p50", "p95", "p99", "max"], True)
    )
    for r in report.routes:
        parts.append(
            row(
                [
                    r.route,
                    f"{r.requests:,}",
                    f"{r.errors:,}",
                    f"{r.error_rate * 100:.1f}%",
                    f"{r.p50 * 1000:.2f}",
                    f"{r.p95 * 1000:.2f}",
                    f"{r.p99 * 1000:.2f}",
                    f"{r.maximum * 1000:.2f}",
                ]
            )
        )
    parts.append("</table><h2>Sub-steps: share of the route's time</h2><table>")
    parts.append(row(["route", "sub-step", "ran in", "mean ms", "share"], True, text=(0, 1)))
    for r in report.routes:
        for step in r.steps:
            parts.append(
                row(
                    [
                        r.route,
                        step.name,
                        f"{step.requests / r.requests * 100:.1f}%",
                        f"{step.mean * 1000:.2f}",
                        f"{step.share * 100:.1f}%",
                    ],
                    text=(0, 1),
                )
            )
    parts.append("</table><h2>Errors by error_code and status</h2><table>")
    parts.append(row(["error_code", "status", "count", "of requests", "routes"], True, text=(4,)))
    for g in report.error_groups:
        routes = ", ".join(f"{route} ({n})" for route, n in g.routes.items())
        parts.append(
            row(
                [
                    str(g.error_code),
                    str(g.status),
                    f"{g.count:,}",
                    f"{g.count / report.requests * 100:.1f}%",
                    routes,
                ],
                text=(4,),
            )
        )
    parts.append("</table>")
    return "\n".join(parts)


def render_html(report: Report) -> str:
    """The whole page as one string (plotly.js inlined)."""
    _, pio = _plotly()
    figures = [latency_figure(report), steps_figure(report), errors_figure(report)]
    charts = [
        pio.to_html(
            fig,
            include_plotlyjs=index == 0,
            full_html=False,
            div_id=f"chart-{name}",
            config={"displaylogo": False, "responsive": True},
        )
        for index, (name, fig) in enumerate(
            zip(("latency", "steps", "errors"), figures, strict=True)
        )
    ]
    services = ", ".join(report.services) or "lunamon"
    span = (report.end_ns - report.start_ns) / 1e9
    meta = (
        f"{report.requests:,} requests, {report.errors:,} failed"
        f" ({report.error_rate * 100:.1f}%) over {span:.1f} s, from {report.source}"
    )
    body = "\n".join(f'<div class="chart">{chart}</div>' for chart in charts)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>lunamon report: {html.escape(services)}</title>"
        f"<style>{_STYLE}</style></head><body>"
        f"<h1>lunamon report: {html.escape(services)}</h1>"
        f'<p class="meta">{html.escape(meta)}</p>\n'
        f"{body}\n{_tables(report)}\n</body></html>\n"
    )


def write_html(report: Report, path: str | Path) -> Path:
    """Write the page to ``path``; returns the path."""
    target = Path(path)
    target.write_text(render_html(report), encoding="utf-8")
    return target
