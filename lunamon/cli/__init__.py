"""The ``lunamon`` command: ``demo``, ``report``, ``trace`` and ``send``.

This module parses the command line and reports; the work is in
:mod:`lunamon.cli.report`, :mod:`~lunamon.cli.charts`, :mod:`~lunamon.cli.trace`,
:mod:`~lunamon.cli.send`,
:mod:`~lunamon.cli.influxql`, :mod:`~lunamon.cli.clickhouse` and the demo service's run,
:mod:`lunamon.demo.run`.
The library never imports this package.

Exit codes: 0 done; 1 the work failed (points not written, server unreachable,
a missing extra); 2 bad input or usage (a file that is not valid line
protocol, a bad URL or option). Every error is one line on stderr, never a
traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shlex
import sys
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

if TYPE_CHECKING:
    from rich.console import Console

    from lunamon.cli.clickhouse import ClickHouseTarget
    from lunamon.cli.influxql import InfluxTarget
    from lunamon.cli.report import Report
    from lunamon.flusher import SinkStats
    from lunamon.point import Point
    from lunamon.settings import MonitoringSettings
    from lunamon.sinks.base import Sink
    from lunamon.sinks.memory import MemorySink

__all__ = ["main"]

_T = TypeVar("_T")
_Target = TypeVar("_Target", "InfluxTarget", "ClickHouseTarget")

DEFAULT_REQUESTS = 2000
DEFAULT_OUT = "lunamon-demo.lp"
# With --config the points cannot be read back from arbitrary sinks: a copy is kept here.
REPORT_COPY = "report-copy"
EXTRA_HINT = "pip install 'lunamon[report]'"


class CommandError(Exception):
    """Ends a command with a one-line message and an exit code."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- helpers


def _require(module: str, what: str) -> None:
    try:
        __import__(module)
    except ImportError as exc:
        raise CommandError(
            f"{what} needs the 'report' extra ({exc}): {EXTRA_HINT}", code=1
        ) from None


def _console(stderr: bool = False) -> Console:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Piped output gets a fixed width, so tables do not depend on the caller's terminal.
    width = None if stream.isatty() else 120
    # No file given: the console writes to the sys.stdout/stderr of the moment, so lines
    # printed while a progress bar runs go through the bar's redirection, above it.
    return Console(stderr=stderr, width=width, highlight=False)


@contextlib.contextmanager
def _logging(verbose: bool) -> Iterator[None]:
    """lunamon's structlog events to stderr (warnings and up, ``-v`` for info), unless the
    caller already configured structlog; restored afterwards."""
    import structlog

    if structlog.is_configured():
        yield
        return
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%H:%M:%S"),
            structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.INFO if verbose else logging.WARNING
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    try:
        yield
    finally:
        structlog.reset_defaults()


def _file_size(path: str) -> int | None:
    """The size of ``path`` in bytes (a progress bar's total), ``None`` when unknown."""
    try:
        return Path(path).stat().st_size
    except OSError:
        return None  # the reader tells why, in its own words


class _Bar:
    """A progress bar on stderr when it is a terminal (else nothing), shown from ``start()``
    so that lines printed before it stay above it. ``unit="bytes"`` counts bytes (shown
    as MB), else items."""

    def __init__(self, total: int | None, label: str, enabled: bool, unit: str = "items") -> None:
        self.total = total
        self.label = label
        self.unit = unit
        self.enabled = enabled and sys.stderr.isatty()
        self._progress: Any = None
        self._task: Any = None

    def start(self) -> None:
        if not self.enabled or self._progress is not None:
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn() if self.unit == "bytes" else MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=_console(stderr=True),
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task(self.label, total=self.total)

    def advance(self, count: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, count)

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _say(console: Console, text: str = "") -> None:
    """A line of prose: not wrapped at the console width, no rich markup in it."""
    console.print(text, soft_wrap=True, markup=False)


def _stats_lines(stats: dict[str, SinkStats]) -> list[str]:
    lines = ["monitoring stats per sink (emitted = written + dropped + buffered):"]
    for name, s in stats.items():
        dropped = sum(s["dropped"].values())
        balanced = s["emitted"] == s["written"] + dropped + s["buffered"]
        reasons = ", ".join(f"{k} {v:,}" for k, v in s["dropped"].items() if v)
        lines.append(
            f"  {name}: {s['emitted']:,} = {s['written']:,} + {dropped:,} + {s['buffered']:,}"
            f"  {'ok' if balanced else 'MISMATCH'}; retries {s['retries']:,}"
            + (f"; dropped: {reasons}" if reasons else "")
        )
    return lines


def _check_delivered(stats: dict[str, SinkStats], what: str) -> None:
    for name, s in stats.items():
        dropped = sum(s["dropped"].values())
        if s["emitted"] != s["written"] + dropped + s["buffered"]:
            raise CommandError(f"sink {name}: the counters do not add up: {s}", code=1)
        missing = s["emitted"] - s["written"]
        if missing:
            raise CommandError(
                f"{missing:,} of {s['emitted']:,} points were not written to {name}"
                f" ({what}); see the log above",
                code=1,
            )


# Credentials kept out of the URL (where `ps` shows them): the variables the stores' own
# clients read (influx 1.x, clickhouse-client), or a file given with --password-file.
_CREDENTIAL_VARIABLES: dict[str, tuple[str, str]] = {
    "influx": ("INFLUX_USERNAME", "INFLUX_PASSWORD"),
    "clickhouse": ("CLICKHOUSE_USER", "CLICKHOUSE_PASSWORD"),
}


def _with_credentials(target: _Target, option: str, password_file: str | None) -> _Target:
    """``target`` with the credentials of the environment or ``--password-file`` when its
    URL holds none (the URL's win; both a URL password and a file are refused)."""
    if target.username is not None or target.password is not None:
        if password_file:
            raise CommandError(
                f"--{option}: the URL holds credentials and --password-file gives a password:"
                " give one of them"
            )
        return target
    user_variable, password_variable = _CREDENTIAL_VARIABLES[option]
    username = os.environ.get(user_variable) or None
    password = os.environ.get(password_variable) or None
    if password_file:
        try:
            with open(password_file, encoding="utf-8") as file:
                password = file.readline().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise CommandError(
                f"--password-file {password_file}: {exc.__class__.__name__}"
            ) from None
    if password is not None and username is None and option == "clickhouse":
        username = "default"  # clickhouse-client's user when none is named
    if username is None and password is None:
        return target
    return dataclasses.replace(target, username=username, password=password)


def _influx_target(
    url: str, database: str | None = None, password_file: str | None = None
) -> InfluxTarget:
    from lunamon.cli.influxql import InfluxURLError, parse_influx_url

    try:
        target = _with_credentials(parse_influx_url(url, database), "influx", password_file)
    except InfluxURLError as exc:
        raise CommandError(f"--influx {exc}") from None
    try:
        target.sink()  # the sink's own checks
    except ValueError as exc:
        if "plain HTTP" in str(exc):
            raise CommandError(
                f"--influx: credentials would go to {target.host} over plain HTTP; use https://"
            ) from None
        raise CommandError(f"--influx: {exc}") from None
    return target


def _clickhouse_target(
    url: str, database: str | None = None, password_file: str | None = None
) -> ClickHouseTarget:
    from lunamon.cli.clickhouse import ClickHouseURLError, parse_clickhouse_url

    try:
        target = _with_credentials(parse_clickhouse_url(url, database), "clickhouse", password_file)
    except ClickHouseURLError as exc:
        raise CommandError(f"--clickhouse {exc}") from None
    try:
        target.sink()  # the sink's own checks
    except ValueError as exc:
        if "plain HTTP" in str(exc):
            raise CommandError(
                f"--clickhouse: credentials would go to {target.url} over plain HTTP; use https://"
            ) from None
        raise CommandError(f"--clickhouse: {exc}") from None
    return target


def _run(coro: Coroutine[Any, Any, _T]) -> _T:
    """``asyncio.run``; InfluxDB and ClickHouse failures become a one-line error (exit 1)."""
    from lunamon.cli.clickhouse import ClickHouseQueryError
    from lunamon.cli.influxql import InfluxQueryError

    try:
        return asyncio.run(coro)
    except (InfluxQueryError, ClickHouseQueryError) as exc:
        raise CommandError(str(exc), code=1) from None


def _write_html(report: Report, path: str, console: Console) -> None:
    _require("plotly", "--html")
    from lunamon.cli.charts import write_html

    try:
        written = write_html(report, path)
    except OSError as exc:
        raise CommandError(f"cannot write {path}: {exc.strerror or exc}") from None
    _say(console, f"HTML report with charts: {written}")


# --------------------------------------------------------------------------- demo


def _load_settings(path: str) -> MonitoringSettings:
    from lunamon.errors import SettingsError
    from lunamon.settings import MonitoringSettings

    try:
        settings = MonitoringSettings.load(path)
    except SettingsError as exc:
        raise CommandError(f"--config {exc}") from None
    except OSError as exc:
        raise CommandError(f"--config {path}: {exc.strerror or exc}") from None
    if not settings.enabled:
        raise CommandError(f"--config {path}: monitoring is disabled there (enabled = false)")
    return settings


@dataclass
class _DemoOutput:
    """Where ``lunamon demo`` writes its points, and where it reads them back from."""

    destination: str  # for people
    sinks: list[Sink]
    file: Path | None = None
    influx: InfluxTarget | None = None
    clickhouse: ClickHouseTarget | None = None
    copy: MemorySink | None = None  # with --config: every point, for the report
    # The faces-like service's sinks, and where they write (a file, a database).
    faces_sinks: list[Sink] | None = None
    faces_file: Path | None = None
    faces_database: InfluxTarget | ClickHouseTarget | None = None

    def trace_sources(self) -> str | None:
        """The sources of ``lunamon trace`` holding the points of both services."""
        if self.influx is not None:
            return f"--influx {self.influx} --influx {self.faces_database}"
        if self.clickhouse is not None:
            return f"--clickhouse {self.clickhouse} --clickhouse {self.faces_database}"
        if self.file is None or self.faces_file is None:
            return None  # --config: the handlers' points are where the settings say
        return f"{shlex.quote(str(self.file))} {shlex.quote(str(self.faces_file))}"

    def read_back(self, started_ns: int) -> tuple[list[Point], str]:
        """The points of the run that started at ``started_ns``, and their source for the
        report."""
        from lunamon.cli.report import ReportInputError, load_file

        if self.influx is not None:
            from lunamon.cli.influxql import query_points
            from lunamon.demo.service import SERVICE

            where = f"time >= {started_ns} AND \"service\" = '{SERVICE}'"
            points = _run(query_points(self.influx, ("request", "error"), where))
            return points, f"{self.influx}, this run"
        if self.clickhouse is not None:
            from lunamon.cli import clickhouse
            from lunamon.demo.service import SERVICE

            read = clickhouse.query_points(self.clickhouse, ("request", "error"), since=started_ns)
            points = [p for p in _run(read) if p.tags.get("service") == SERVICE]
            return points, f"ClickHouse {self.clickhouse}, this run"
        if self.copy is not None:
            return self.copy.points, "an in-memory copy"
        assert self.file is not None
        try:
            return load_file(self.file), self.destination
        except ReportInputError as exc:  # the points read back are not what was written
            raise CommandError(str(exc), code=1) from None


def _demo_output(
    out: Path | None,
    influx: InfluxTarget | None,
    settings: MonitoringSettings | None,
    clickhouse: ClickHouseTarget | None = None,
) -> _DemoOutput:
    """The sinks of the run: into InfluxDB or ClickHouse, the sinks of ``settings`` (plus a
    copy for the report), or the line-protocol file ``out``. The faces-like service writes
    as one more service would: into a database of its own on the same server
    (``<database>_faces``), a file of its own beside ``out`` (``lunamon-demo-faces.lp``),
    or, with ``settings``, into memory only."""
    import dataclasses

    from lunamon.sinks.file import LineProtocolFileSink
    from lunamon.sinks.memory import MemorySink

    if influx is not None:
        faces_influx = dataclasses.replace(influx, database=f"{influx.database}_faces")
        return _DemoOutput(
            f"InfluxDB {influx}",
            [influx.sink()],
            influx=influx,
            faces_sinks=[faces_influx.sink()],
            faces_database=faces_influx,
        )
    if clickhouse is not None:
        faces_house = dataclasses.replace(clickhouse, database=f"{clickhouse.database}_faces")
        return _DemoOutput(
            f"ClickHouse {clickhouse}",
            [clickhouse.sink()],
            clickhouse=clickhouse,
            faces_sinks=[faces_house.sink()],
            faces_database=faces_house,
        )
    if settings is not None:
        from lunamon.errors import SettingsError

        try:
            sinks = settings.build_sinks()
        except SettingsError as exc:
            raise CommandError(f"--config {exc}") from None
        copy = MemorySink(REPORT_COPY)
        return _DemoOutput(
            f"the sinks of {settings.source}",
            [*sinks, copy],
            copy=copy,
            faces_sinks=[MemorySink("faces-memory")],
        )
    path = out if out is not None else Path(DEFAULT_OUT)
    faces_file = path.with_name(f"{path.stem}-faces{path.suffix}")
    faces_sinks: list[Sink] = [LineProtocolFileSink(faces_file, name="faces-file")]
    return _DemoOutput(
        str(path),
        [LineProtocolFileSink(path)],
        file=path,
        faces_sinks=faces_sinks,
        faces_file=faces_file,
    )


def _demo(args: argparse.Namespace) -> int:
    _require("rich", "lunamon demo")
    if args.html:
        _require("plotly", "--html")
    from lunamon.cli.report import ReportInputError, build_report, print_report
    from lunamon.demo.run import run_demo

    requests = args.requests
    if requests is None and args.duration is None:
        requests = DEFAULT_REQUESTS
    secret = args.password_file
    influx = _influx_target(args.influx, password_file=secret) if args.influx else None
    clickhouse = (
        _clickhouse_target(args.clickhouse, password_file=secret) if args.clickhouse else None
    )
    settings = _load_settings(args.config) if args.config else None
    elsewhere = influx is not None or clickhouse is not None or settings is not None
    out = Path(args.out or DEFAULT_OUT) if not elsewhere else None
    if out is not None:
        try:
            out.write_bytes(b"")  # each run starts a fresh file; fail now when not writable
        except OSError as exc:
            raise CommandError(f"--out {out}: {exc.strerror or exc}") from None
    output = _demo_output(out, influx, settings, clickhouse)
    if output.faces_file is not None:
        try:
            output.faces_file.write_bytes(b"")  # a fresh file each run, as --out's
        except OSError as exc:
            raise CommandError(f"{output.faces_file}: {exc.strerror or exc}") from None
    console = _console()

    bar = _Bar(requests, "requests", not args.no_progress)

    def on_start(url: str) -> None:
        amount = f"{requests:,} requests" if requests is not None else "requests"
        limit = f" for up to {args.duration:g} s" if args.duration is not None else ""
        _say(
            console,
            f"lunamon demo: luna-handlers on {url}; {amount}{limit},"
            f" concurrency {args.concurrency} -> {output.destination}",
        )
        bar.start()

    if influx is not None:
        from lunamon.cli.influxql import ping

        _run(ping(influx))  # an unreachable server is told before the service starts
    if clickhouse is not None:
        from lunamon.cli import clickhouse as clickhouse_cli

        _run(clickhouse_cli.ping(clickhouse))
    with bar:
        result = _run(
            run_demo(
                output.sinks,
                requests=requests,
                concurrency=args.concurrency,
                duration=args.duration,
                latency=args.latency,
                settings=settings,
                seed=args.seed,
                on_start=on_start,
                on_request=lambda: bar.advance(1),
                metrics=args.metrics,
                faces_sinks=output.faces_sinks,
            )
        )
    points, source = output.read_back(result.started_ns)

    traffic = result.traffic
    statuses = ", ".join(f"{code}: {n:,}" for code, n in sorted(traffic.statuses.items()))
    _say(
        console,
        f"sent {traffic.sent:,} requests in {traffic.elapsed:.1f} s ({traffic.rate:,.0f}/s);"
        f" answers {statuses}; abandoned by the client: {traffic.abandoned:,}"
        + (f"; timeouts: {traffic.timeouts:,}" if traffic.timeouts else "")
        + (f"; client errors: {dict(traffic.client_errors)}" if traffic.client_errors else ""),
    )
    try:
        report = build_report(points, source=source)
    except ReportInputError as exc:
        raise CommandError(str(exc), code=1) from None
    _say(console)
    print_report(report, console)
    for line in _stats_lines(result.stats):
        _say(console, line)
    if args.metrics:
        _say(console, "\nPrometheus /metrics of the service (request_count_total):")
        for line in result.metrics.splitlines():
            if line.startswith("request_count_total{"):
                _say(console, f"  {line}")
    if result.faces_stats is not None:
        for name, s in result.faces_stats.items():
            _say(
                console,
                f"  luna-faces (called by the handlers) -> {name}: {s['written']:,} of"
                f" {s['emitted']:,} points written",
            )
    if args.html:
        _write_html(report, args.html, console)
    _check_delivered(result.stats, output.destination)
    if result.faces_stats is not None:
        _check_delivered(result.faces_stats, "luna-faces' points")
    if settings is None:  # a file, InfluxDB or ClickHouse: what is there is what the stats say
        (written,) = (s["written"] for name, s in result.stats.items() if name != "metrics")
        if len(points) != written:
            raise CommandError(
                f"{output.destination} holds {len(points):,} points of this run,"
                f" but the stats say {written:,} were written",
                code=1,
            )
    if out is not None:
        _say(
            console,
            f"\nnext: lunamon report {out} --slowest 3 --html lunamon-report.html"
            f"\n      lunamon send {out} --influx http://127.0.0.1:8086/luna_monitoring",
        )
    slowest = _slowest_calling_faces(points)
    sources = output.trace_sources()
    if slowest is not None and sources is not None:
        _say(
            console,
            "\nthe slowest request that called luna-faces, across both services:"
            f"\n      lunamon trace {shlex.quote(slowest)} {sources}",
        )
    return 0


def _slowest_calling_faces(points: Sequence[Point]) -> str | None:
    """The id of the slowest request point with a ``faces_time`` step (a call to luna-faces)."""
    from lunamon.demo.faces import FACES_STEP

    step = f"{FACES_STEP}_time"
    best: tuple[float, str] | None = None
    for point in points:
        if point.series != "request" or step not in point.fields:
            continue
        seconds, request_id = point.fields.get("execution_time"), point.fields.get("request_id")
        if not isinstance(seconds, float) or not isinstance(request_id, str):
            continue
        if best is None or seconds > best[0]:
            best = (seconds, request_id)
    return best[1] if best is not None else None


# --------------------------------------------------------------------------- report


def _report(args: argparse.Namespace) -> int:
    _require("rich", "lunamon report")
    if args.html:
        _require("plotly", "--html")
    from lunamon.cli.report import ReportInputError, build_report, print_report, report_file

    sources = [args.file, args.influx, args.clickhouse]
    if sum(source is not None for source in sources) != 1:
        raise CommandError("give either a line-protocol FILE or --influx URL (or --clickhouse URL)")
    if args.influx is None and args.clickhouse is None and (args.database or args.since):
        raise CommandError("--database and --since go with --influx or --clickhouse")
    try:
        if args.file is not None:
            with _Bar(_file_size(args.file), "reading", not args.no_progress, unit="bytes") as bar:
                bar.start()
                report = report_file(
                    args.file, service=args.service, on_read=bar.advance, slowest=args.slowest
                )
        elif args.clickhouse is not None:
            from lunamon.cli.clickhouse import query_points as clickhouse_points
            from lunamon.cli.clickhouse import since_ns

            clickhouse = _clickhouse_target(args.clickhouse, args.database, args.password_file)
            try:
                cutoff = since_ns(args.since or "1h")
            except ValueError as exc:
                raise CommandError(f"--since: {exc}") from None
            read = clickhouse_points(clickhouse, ("request", "error"), since=cutoff)
            source = f"ClickHouse {clickhouse}, last {args.since or '1h'}"
            report = build_report(
                _run(read), source=source, service=args.service, slowest=args.slowest
            )
        else:
            from lunamon.cli.influxql import parse_duration, query_points

            target = _influx_target(args.influx, args.database, args.password_file)
            try:
                since = parse_duration(args.since or "1h")
            except ValueError as exc:
                raise CommandError(f"--since: {exc}") from None
            points = _run(query_points(target, ("request", "error"), f"time > now() - {since}"))
            report = build_report(
                points,
                source=f"{target}, last {since}",
                service=args.service,
                slowest=args.slowest,
            )
    except ReportInputError as exc:
        raise CommandError(str(exc)) from None
    console = _console()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print_report(report, console)
    if args.html:
        _write_html(report, args.html, _console(stderr=args.json))
    return 0


# --------------------------------------------------------------------------- trace


def _trace(args: argparse.Namespace) -> int:
    from lunamon.cli.report import ReportInputError
    from lunamon.cli.trace import (
        TraceBuilder,
        format_trace,
        query_clickhouse,
        query_influx,
        write_trace_html,
    )

    if not (args.sources or args.influx or args.clickhouse):
        raise CommandError(
            "give at least one SOURCE: a line-protocol FILE, --influx or --clickhouse"
        )
    request_id = args.request_id
    if not request_id:
        raise CommandError("REQUEST_ID is empty")
    # Every URL is checked before any source is read.
    influx = [_influx_target(url, args.database, args.password_file) for url in args.influx]
    houses = [_clickhouse_target(url, args.database, args.password_file) for url in args.clickhouse]
    builder = TraceBuilder(request_id)
    for path in args.sources:
        try:
            builder.add_file(path)
        except ReportInputError as exc:
            raise CommandError(str(exc)) from None
    for target in influx:
        builder.add_points(_run(query_influx(target, request_id)), f"InfluxDB {target}")
    for house in houses:
        builder.add_points(_run(query_clickhouse(house, request_id)), f"ClickHouse {house}")
    trace = builder.build()
    if trace is None:
        searched = ", ".join(builder.sources)
        raise CommandError(
            f"no request or error point with request_id {request_id!r} in {searched}", code=1
        )
    print(format_trace(trace))
    if args.html:
        try:
            written = write_trace_html(trace, args.html)
        except OSError as exc:
            raise CommandError(f"cannot write {args.html}: {exc.strerror or exc}") from None
        print(f"HTML trace: {written}")
    return 0


# --------------------------------------------------------------------------- send


def _send(args: argparse.Namespace) -> int:
    _require("rich", "lunamon send")
    import itertools
    import time

    from lunamon.cli.report import ReportInputError, file_records
    from lunamon.cli.send import deliver, forwarded
    from lunamon.lineprotocol import to_point

    sinks: list[Sink]
    if args.clickhouse is not None:
        from lunamon.cli import clickhouse

        house = _clickhouse_target(args.clickhouse, args.database, args.password_file)
        kind, shown = "ClickHouse", str(house)
        reach: Callable[[], Coroutine[Any, Any, None]] = lambda: clickhouse.ping(house)  # noqa: E731
        sinks = [house.sink() for _ in range(args.connections)]
    else:
        from lunamon.cli.influxql import ping

        influx = _influx_target(args.influx, args.database, args.password_file)
        kind, shown = "InfluxDB", str(influx)
        reach = lambda: ping(influx)  # noqa: E731
        sinks = [influx.sink() for _ in range(args.connections)]

    console = _console()
    stopped: list[ReportInputError] = []
    read = 0

    def points(records: Iterator[Any]) -> Iterator[Point]:
        """The points of the file until its first bad line, which stops the reading (the
        points before it are delivered, then the error is told)."""
        nonlocal read
        items = forwarded(records) if args.clickhouse is None else map(to_point, records)
        try:
            for point in items:
                read += 1
                yield point
        except ReportInputError as exc:
            stopped.append(exc)

    with _Bar(_file_size(args.file), "sending", not args.no_progress, unit="bytes") as bar:
        stream = points(file_records(args.file, on_read=bar.advance))
        # The first batch is read before the server is contacted: a file that is not
        # line protocol at all is told as such, whatever the server.
        first = list(itertools.islice(stream, args.batch_size))
        if stopped and not first:
            raise CommandError(str(stopped[0]))
        _say(console, f"lunamon send: {args.file} -> {kind} {shown}")
        bar.start()
        started = time.monotonic()

        async def send() -> dict[str, SinkStats]:
            await reach()
            return await deliver(
                itertools.chain(first, stream),
                sinks,
                batch_size=args.batch_size,
                max_retries=args.max_retries,
            )

        stats = _run(send())
    took = time.monotonic() - started
    _say(console, f"{read:,} points from {args.file} in {took:.1f} s ({read / took:,.0f}/s)")
    for line in _stats_lines(stats):
        _say(console, line)
    _check_delivered(stats, shown)
    if stopped:
        raise CommandError(f"{stopped[0]}; the {read:,} points before it were written")
    return 0


# --------------------------------------------------------------------------- parser


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number, at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_count = _int_at_least(0)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 <= value < 3600:
        raise argparse.ArgumentTypeError(f"must be in 0..3600 seconds, got {value:g}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    from lunamon.settings import MonitoringSettings

    defaults = MonitoringSettings()  # the library's own, defined once

    parser = _Parser(
        prog="lunamon",
        description="lunamon: per-request monitoring for aiohttp services, points to InfluxDB.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show lunamon's info logs")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="run the luna-handlers-like demo service under generated traffic, then report",
        description="Start the instrumented demo service on a free 127.0.0.1 port, send it"
        " generated traffic (with failures), write the points, and print the report and the"
        " monitoring stats.",
    )
    demo.set_defaults(func=_demo)
    demo.add_argument(
        "--requests",
        type=_positive_int,
        help=f"requests to send (default {DEFAULT_REQUESTS}; unlimited with --duration)",
    )
    demo.add_argument("--concurrency", type=_positive_int, default=16, help="default 16")
    demo.add_argument("--duration", type=_seconds, help="stop sending after this many seconds")
    demo.add_argument(
        "--latency",
        type=_seconds,
        default=0.002,
        help="mean simulated time of one sub-step, seconds (default 0.002)",
    )
    demo.add_argument("--seed", type=int, help="seed of the traffic mix (reproducible runs)")
    demo.add_argument(
        "--metrics",
        action="store_true",
        help="serve Prometheus /metrics too, and print its request counters after the run",
    )
    where = demo.add_mutually_exclusive_group()
    where.add_argument(
        "--out", metavar="FILE", help=f"line-protocol file to write (default {DEFAULT_OUT})"
    )
    where.add_argument(
        "--influx", metavar="URL", help="InfluxDB 1.x to write to: http://host:8086/database"
    )
    where.add_argument(
        "--clickhouse",
        metavar="URL",
        help="ClickHouse to write to: http://host:8123[/database] (default luna_monitoring)",
    )
    where.add_argument(
        "--config", metavar="FILE", help="write to the sinks of a lunamon settings file"
    )
    _password_option(demo)
    demo.add_argument("--html", metavar="FILE", help="also write the HTML report with charts")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")

    report = commands.add_parser(
        "report",
        help="latency, sub-step and error tables from a line-protocol file, InfluxDB or ClickHouse",
        description="Per route: requests, error rate, p50/p95/p99 execution_time, the share of"
        " each sub-step in the route's time, and errors by error_code and status.",
    )
    report.set_defaults(func=_report)
    report.add_argument("file", nargs="?", metavar="FILE", help="a line-protocol file")
    report.add_argument("--influx", metavar="URL", help="read from InfluxDB 1.x: http://host:8086")
    report.add_argument(
        "--clickhouse", metavar="URL", help="read from ClickHouse: http://host:8123"
    )
    report.add_argument("--database", metavar="DB", help="the database (or as the URL's path)")
    report.add_argument(
        "--since", metavar="DURATION", help="InfluxDB / ClickHouse time range: 15m, 1h, 7d"
    )
    _password_option(report)
    report.add_argument("--service", help="only points of this service tag")
    report.add_argument("--html", metavar="FILE", help="write a self-contained page with charts")
    report.add_argument(
        "--slowest",
        type=_count,
        default=0,
        metavar="N",
        help="name the ids of the N slowest requests of each route (for lunamon trace)",
    )
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    report.add_argument("--no-progress", action="store_true", help="no progress bar")

    trace = commands.add_parser(
        "trace",
        help="one request across services as a waterfall, from files, InfluxDB or ClickHouse",
        description="Gather every request and error point of REQUEST_ID from the sources (one"
        " line-protocol file per service, say, and stores) and print them as a waterfall: each"
        " service's point with its start offset and execution time, nested by time (a point"
        " that starts inside another's interval is its child), its steps and its error.",
    )
    trace.set_defaults(func=_trace)
    trace.add_argument("request_id", metavar="REQUEST_ID", help="the request id (Luna-Request-Id)")
    trace.add_argument("sources", nargs="*", metavar="SOURCE", help="line-protocol files")
    trace.add_argument(
        "--influx",
        metavar="URL",
        action="append",
        default=[],
        help="an InfluxDB 1.x to search: http://host:8086/database (repeatable)",
    )
    trace.add_argument(
        "--clickhouse",
        metavar="URL",
        action="append",
        default=[],
        help="a ClickHouse to search: http://host:8123[/database] (repeatable)",
    )
    trace.add_argument("--database", metavar="DB", help="the database of URLs without one")
    _password_option(trace)
    trace.add_argument("--html", metavar="FILE", help="also write the waterfall as a page")

    send = commands.add_parser(
        "send",
        help="ship a line-protocol file into InfluxDB or ClickHouse in batches",
        description="Write the points of a line-protocol file (the demo's, a file sink's) to"
        " InfluxDB 1.x or ClickHouse through lunamon's flusher: batches, retries with backoff,"
        " stats.",
    )
    send.set_defaults(func=_send)
    send.add_argument("file", metavar="FILE", help="a line-protocol file")
    into = send.add_mutually_exclusive_group(required=True)
    into.add_argument("--influx", metavar="URL", help="http://[user:pass@]host:8086/database")
    into.add_argument("--clickhouse", metavar="URL", help="http://[user:pass@]host:8123[/database]")
    send.add_argument("--database", metavar="DB", help="the database (or as the URL's path)")
    send.add_argument(
        "--batch-size",
        type=_positive_int,
        default=defaults.batch_size,
        help=f"default {defaults.batch_size}",
    )
    send.add_argument(
        "--max-retries",
        type=_count,
        default=defaults.max_retries,
        help=f"retries of one batch (default {defaults.max_retries})",
    )
    send.add_argument(
        "--connections",
        type=_positive_int,
        default=2,
        help="batches written at the same time, each on its own connection (default 2)",
    )
    _password_option(send)
    send.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _password_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--password-file",
        metavar="FILE",
        help="the store's password, first line of FILE (else INFLUX_USERNAME/INFLUX_PASSWORD"
        " or CLICKHOUSE_USER/CLICKHOUSE_PASSWORD; credentials in a URL show in `ps`)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lunamon`` command; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    command = args.func.__name__.lstrip("_")
    with _logging(args.verbose):
        try:
            code: int = args.func(args)
        except CommandError as exc:
            print(f"lunamon {command}: error: {exc}", file=sys.stderr)
            return exc.code
        except KeyboardInterrupt:
            print(f"lunamon {command}: interrupted", file=sys.stderr)
            return 130
    return code
