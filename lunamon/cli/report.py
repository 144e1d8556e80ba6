"""``lunamon report``: latency, sub-step and error tables from ``request``/``error`` points.

Points come from a line-protocol file (:func:`report_file`, which streams it) or
from InfluxDB / ClickHouse (:func:`lunamon.cli.influxql.query_points`); a
:class:`ReportBuilder` checks them against the data rules of DESIGN.md §1 and
sums them up per route as they come, without keeping them: counts, per-step
sums, and each request's ``execution_time`` in an ``array('d')`` (8 bytes a
request), so that the percentiles stay exact. They interpolate linearly between
the two closest ranks (numpy's default, ``statistics.quantiles(...,
method="inclusive")``). With ``slowest=N`` it also keeps, per route, the ids of
its N slowest requests (a heap of N), for ``lunamon trace``.
"""

from __future__ import annotations

import heapq
import math
import os
import struct
from array import array
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from itertools import islice, repeat
from operator import floordiv, itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, overload

from lunamon.lineprotocol import (
    FastLine,
    Head,
    LineProtocolError,
    LineReader,
    NotTextError,
    Record,
    Shape,
    to_point,
)
from lunamon.point import FieldValue, Point

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "ErrorGroup",
    "Report",
    "ReportBuilder",
    "ReportInputError",
    "RouteSummary",
    "StepSummary",
    "TIMELINE_BUCKETS",
    "TIMELINE_WIDTHS_NS",
    "Timeline",
    "build_report",
    "file_records",
    "load_file",
    "percentile",
    "print_report",
    "report_file",
    "timeline_width",
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
    # (request_id, execution_time) of the slowest requests, slowest first (``slowest=N``).
    slowest: tuple[tuple[str, float], ...] = ()

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


# The bucket widths of the errors-over-time chart (``--html``), in ns: it takes the first
# that cuts the requests' time span into at most TIMELINE_BUCKETS buckets, else the last.
TIMELINE_WIDTHS_NS: Final = tuple(
    round(seconds * 10**9)
    for seconds in (0.1, 0.25, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 86400)
)
TIMELINE_BUCKETS: Final = 40


def timeline_width(span_ns: int) -> int:
    """The chart's bucket width (ns) for requests spanning ``span_ns``."""
    for width in TIMELINE_WIDTHS_NS:
        if span_ns / width <= TIMELINE_BUCKETS:
            return width
    return TIMELINE_WIDTHS_NS[-1]


class Timeline:
    """Requests, and errors per :attr:`ErrorGroup.label`, counted per slot of
    ``grid_ns``: ``time_ns // grid_ns`` -> count. The grid divides every width the chart
    can still take for the span seen so far, so a bucket of the chart is a whole number
    of slots; it coarsens as the span grows, so the slots stay a few hundred at most,
    however many the requests (the last width, a day, aside)."""

    def __init__(self) -> None:
        self.grid_ns = math.gcd(*TIMELINE_WIDTHS_NS)
        self.requests: Counter[int] = Counter()
        self.errors: dict[str, Counter[int]] = {}

    def per(self, width_ns: int, slots: Mapping[int, int]) -> Counter[int]:
        """``slots`` as counts per ``time_ns // width_ns`` (a multiple of the grid)."""
        grid = self.grid_ns
        if width_ns % grid:
            raise ValueError(f"width {width_ns} ns is not a multiple of the grid {grid} ns")
        counts: Counter[int] = Counter()
        for slot, count in slots.items():
            counts[slot * grid // width_ns] += count
        return counts

    def coarsen(self, span_ns: int) -> None:
        """The widest grid that still divides every width left for a span of ``span_ns``."""
        first = TIMELINE_WIDTHS_NS.index(timeline_width(span_ns))
        grid = math.gcd(*TIMELINE_WIDTHS_NS[first:])
        if grid == self.grid_ns:
            return
        self.requests = self.per(grid, self.requests)
        self.errors = {label: self.per(grid, slots) for label, slots in self.errors.items()}
        self.grid_ns = grid


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
    # Requests and errors per slot of time: the errors-over-time chart.
    timeline: Timeline = field(repr=False)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data (``lunamon report --json``), times in seconds."""
        data = asdict(replace(self, timeline=Timeline()))
        del data["timeline"]
        for route, summary in zip(data["routes"], self.routes, strict=True):
            route["error_rate"] = summary.error_rate
            if summary.slowest:
                route["slowest"] = [
                    {"request_id": request_id, "execution_time": seconds}
                    for request_id, seconds in summary.slowest
                ]
            else:
                del route["slowest"]
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


def file_records(
    path: str | Path, *, on_read: Callable[[int], None] | None = None
) -> Iterator[Record]:
    """The records of a line-protocol file, read in blocks as they are consumed
    (constant memory); :class:`ReportInputError` for anything unusable, raised where
    it is met (an error on line 900,000 comes after the records before it)."""
    name = str(path)
    try:
        stream = open(path, "rb")  # noqa: SIM115 - closed in the finally below
    except FileNotFoundError:
        raise ReportInputError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ReportInputError(f"{name}: is a directory, not a line-protocol file") from None
    except OSError as exc:
        raise ReportInputError(f"{name}: cannot read it: {exc.strerror or exc}") from None
    try:
        if os.fstat(stream.fileno()).st_size == 0:
            raise ReportInputError(f"{name}: the file is empty")
        reader = LineReader(stream, on_read=on_read)
        count = 0
        last = previous = 0
        try:
            for record in reader:
                count += 1
                previous, last = last, record[1] if type(record) is Point else record[4]
                yield record
        except NotTextError as exc:
            raise ReportInputError(f"{name}: not line protocol ({exc})") from None
        except LineProtocolError as exc:
            raise ReportInputError(f"{name}: {exc}") from None
        except (ValueError, IndexError) as exc:  # the parser's own checks should catch all
            raise ReportInputError(f"{name}: not line protocol ({exc})") from None
        except OSError as exc:
            raise ReportInputError(f"{name}: cannot read it: {exc.strerror or exc}") from None
        if not count:
            raise ReportInputError(f"{name}: no points in the file (only blank lines or comments)")
        stream.seek(-1, os.SEEK_END)
        if stream.read(1) != b"\n" and count >= 2:
            _check_not_truncated(name, reader.lines, last, previous)
    finally:
        stream.close()


def load_file(path: str | Path) -> list[Point]:
    """The points of a line-protocol file; :class:`ReportInputError` for anything unusable.

    Every point in memory: :func:`report_file` and ``lunamon send`` stream instead."""
    return [to_point(record) for record in file_records(path)]


def report_file(
    path: str | Path,
    *,
    service: str | None = None,
    on_read: Callable[[int], None] | None = None,
    slowest: int = 0,
) -> Report:
    """The report of a line-protocol file, summed up while it is read (``on_read`` gets the
    size of each block read); :class:`ReportInputError` for anything unusable."""
    builder = ReportBuilder(source=str(path), service=service, slowest=slowest)
    builder.add_records(file_records(path, on_read=on_read))
    return builder.build()


def _check_not_truncated(name: str, lineno: int, last: int, previous: int) -> None:
    """A last line cut inside its timestamp still parses; catch it by its short timestamp
    (the file does not end with a newline; ``lineno`` is its last line)."""
    if len(str(abs(last))) < len(str(abs(previous))):
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


def build_report(
    points: Iterable[Point], *, source: str, service: str | None = None, slowest: int = 0
) -> Report:
    """Summarise ``request`` and ``error`` points (other series are ignored).

    Raises :class:`ReportInputError` for a point that breaks the data rules
    (missing ``route``/``status_code``/``execution_time``, a ``*_time`` field
    that is not a float, ...) and when there is no ``request`` point at all.
    """
    builder = ReportBuilder(source=source, service=service, slowest=slowest)
    for point in points:
        builder.add(point)
    return builder.build()


class _Ranked(Sequence[float]):
    """Non-negative floats in ascending order, without a sorted copy of them all: sorted
    runs of 65,536 (the list each sort makes is 2 MB, where ``sorted()`` of a million
    values makes a 32 MB one), the ``k``-th smallest found by a binary search over the
    floats' bit patterns (monotonic for non-negative floats), counting in each run with
    ``bisect``. The same values as ``sorted()``, at the same ranks."""

    def __init__(self, values: array[float]) -> None:
        self._runs: list[Sequence[float]] = [
            array("d", sorted(values[start : start + _RUN]))
            for start in range(0, len(values), _RUN)
        ]
        self._length = len(values)
        if any(_negative_zero(run) for run in self._runs):  # its place among the zeros
            self._runs = [sorted(values)]  # counts, so the plain sort (never in practice)

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, index: int) -> float: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[float]: ...

    def __getitem__(self, index: int | slice) -> float | Sequence[float]:
        if isinstance(index, slice):
            return [self[k] for k in range(*index.indices(self._length))]
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError("rank out of range")
        runs = self._runs
        if len(runs) == 1:
            return runs[0][index]
        # The smallest value with more than `index` values at most it: bit patterns.
        low = _bits(min(run[0] for run in runs))
        high = _bits(max(run[-1] for run in runs))
        while low < high:
            middle = (low + high) // 2
            value = _float(middle)
            if sum(bisect_right(run, value) for run in runs) > index:
                high = middle
            else:
                low = middle + 1
        return _float(low)

    def __iter__(self) -> Iterator[float]:
        for run in self._runs:
            yield from run


_RUN: Final = 1 << 16
_BITS: Final = struct.Struct("<q")
_DOUBLE: Final = struct.Struct("<d")


def _bits(value: float) -> int:
    return _BITS.unpack(_DOUBLE.pack(value + 0.0))[0]  # type: ignore[no-any-return]


def _float(bits: int) -> float:
    return _DOUBLE.unpack(_BITS.pack(bits))[0]  # type: ignore[no-any-return]


def _negative_zero(run: Sequence[float]) -> bool:
    start, end = bisect_left(run, 0.0), bisect_right(run, 0.0)
    return any(math.copysign(1.0, run[i]) < 0 for i in range(start, end))


class _Route:
    """What the report keeps of one route: compact, whatever the number of requests."""

    __slots__ = (
        "_ranked",
        "durations",
        "errors",
        "slowest",
        "step_counts",
        "step_totals",
        "steps",
    )

    def __init__(self) -> None:
        self.durations = array("d")  # execution_time of each request: exact percentiles
        # A min-heap of (execution_time, request_id): the slowest N seen (``slowest=N``).
        self.slowest: list[tuple[float, str]] = []
        self._ranked: _Ranked | None = None
        self.errors = 0
        self.steps: dict[str, int] = {}  # step field -> its slot, in order of appearance
        self.step_totals: list[float] = []  # summed in reading order, as ever
        self.step_counts: list[int] = []

    def ranked(self) -> _Ranked:
        """The durations in ascending order (made once, when the report is built)."""
        if self._ranked is None or len(self._ranked) != len(self.durations):
            self._ranked = _Ranked(self.durations)
        return self._ranked

    def slot(self, step: str) -> int:
        index = self.steps.get(step)
        if index is None:
            index = self.steps[step] = len(self.steps)
            self.step_totals.append(0.0)
            self.step_counts.append(0)
        return index


_PLANS_LIMIT: Final = 65_536
_FOLD_EVERY: Final = 65_536  # records between two countings of the times into the timeline
# The plans of a layout: how its lines add up.
_SKIP: Final = ()  # left out: another series, another service
_REQUEST: Final = 1
_ERROR: Final = 2
_SLOW: Final = 3  # through add(), which tells what is wrong with the line
_SLOWEST: Final = 4  # as _REQUEST, keeping the ids of the slowest requests (``slowest=N``)


class ReportBuilder:
    """Sums points up for the report as they come (:meth:`add`, :meth:`add_records`).

    Memory: per route a few counters and 8 bytes per request (its
    ``execution_time``, for exact percentiles), a :class:`Timeline` of a few hundred
    slots, and the times of the last 65,536 records; no point is kept. The lines of
    :class:`~lunamon.lineprotocol.LineReader`'s fast path are added through a plan per
    layout (which field is which), with the same checks and in the same order as
    :meth:`add`, so the numbers are the same.
    """

    def __init__(self, *, source: str, service: str | None = None, slowest: int = 0) -> None:
        self.source = source
        self.service = service
        self.slowest = max(0, slowest)  # per route, the ids of this many slowest requests
        self._routes: dict[str, _Route] = {}
        self._groups: dict[tuple[int, int], Counter[str]] = {}
        # Times not yet counted in the timeline (it counts them a block at a time).
        self._error_times: dict[tuple[int, int], array[int]] = {}
        self._request_times = array("q")
        self._timeline = Timeline()
        self._start_ns: int | None = None
        self._end_ns: int | None = None
        self._services: set[str] = set()
        self._plans: dict[tuple[Head, Shape], tuple[Any, ...]] = {}

    def _route(self, route: str) -> _Route:
        state = self._routes.get(route)
        if state is None:
            state = self._routes[route] = _Route()
        return state

    def _group(self, code: int, status: int) -> tuple[Counter[str], array[int]]:
        key = (code, status)
        counter = self._groups.get(key)
        if counter is None:
            counter = self._groups[key] = Counter()
            self._error_times[key] = array("q")
        return counter, self._error_times[key]

    def add(self, point: Point) -> None:
        """One point (other series than ``request`` and ``error`` are ignored)."""
        if point.series not in (REQUEST, ERROR):
            return
        if self.service is not None and point.tags.get("service") != self.service:
            return
        source = self.source
        route = _route(source, point)
        status = _int_tag(source, point, "status_code")
        if "service" in point.tags:
            self._services.add(point.tags["service"])
        if point.series == ERROR:
            code = _int_tag(source, point, "error_code")
            self._route(route).errors += 1
            counter, times = self._group(code, status)
            counter[route] += 1
            times.append(point.time_ns)
            return
        if "execution_time" not in point.fields:
            raise _bad(source, point, "request point without field 'execution_time'")
        state = self._route(route)
        totals, counts = state.step_totals, state.step_counts
        for key, value in point.fields.items():
            if key == "execution_time":
                seconds = _seconds(source, point, key, value)
                state.durations.append(seconds)
                request_id = point.fields.get("request_id")
                if self.slowest and isinstance(request_id, str):
                    _keep_slowest(state.slowest, self.slowest, seconds, request_id)
            elif key.endswith("_time"):
                seconds = _seconds(source, point, key, value)
                index = state.slot(key)
                totals[index] += seconds
                counts[index] += 1
        self._request_times.append(point.time_ns)
        if len(self._request_times) >= _FOLD_EVERY:
            self._fold()

    def add_records(self, records: Iterable[Record]) -> None:
        """Records of a :class:`~lunamon.lineprotocol.LineReader` (points or fast lines)."""
        stream = iter(records)
        while self._add_some(islice(stream, _FOLD_EVERY)) == _FOLD_EVERY:
            self._fold()
        self._fold()

    def _fold(self) -> None:
        """Count the times kept so far into the timeline (whose grid may coarsen first)."""
        timeline = self._timeline
        times = self._request_times
        if times:
            low, high = min(times), max(times)
            self._start_ns = low if self._start_ns is None else min(self._start_ns, low)
            self._end_ns = high if self._end_ns is None else max(self._end_ns, high)
            timeline.coarsen(self._end_ns - self._start_ns)
            timeline.requests.update(map(floordiv, times, repeat(timeline.grid_ns)))
            del times[:]
        for (code, status), times in self._error_times.items():
            if times:
                slots = timeline.errors.setdefault(f"{code} ({status})", Counter())
                slots.update(map(floordiv, times, repeat(timeline.grid_ns)))
                del times[:]

    def _add_some(self, records: Iterable[Record]) -> int:
        """Add ``records``; how many there were."""
        count = 0
        plans = self._plans
        request_times = self._request_times.append
        add = self.add
        for record in records:
            count += 1
            if type(record) is Point:
                add(record)
                continue
            line: FastLine = record
            head, shape, _, floats, time_ns, _ = line
            plan = plans.get((head, shape))
            if plan is None:
                plan = self._plan(line)
            if not plan:
                continue
            kind = plan[0]
            if kind == _REQUEST:
                _, durations, at, steps, totals, counts, times_of = plan
                if min(times_of(floats)) < 0:
                    add(to_point(line))  # raises, naming the field
                    continue
                durations(floats[at])
                for index, slot in steps:
                    totals[slot] += floats[index]
                    counts[slot] += 1
                request_times(time_ns)
            elif kind == _ERROR:
                _, state, counter, route, error_times = plan
                state.errors += 1
                counter[route] += 1
                error_times(time_ns)
            elif kind == _SLOWEST:  # _REQUEST, and the request id kept when among the slowest
                _, durations, at, steps, totals, counts, times_of, heap, id_at = plan
                if min(times_of(floats)) < 0:
                    add(to_point(line))
                    continue
                durations(floats[at])
                _keep_slowest(heap, self.slowest, floats[at], line[2][id_at])
                for index, slot in steps:
                    totals[slot] += floats[index]
                    counts[slot] += 1
                request_times(time_ns)
            else:
                add(to_point(line))
        return count

    def _plan(self, line: FastLine) -> tuple[Any, ...]:
        """How the lines of a head and layout add up: which float is which. The tags are
        checked once, on the first line (which raises as :meth:`add` would)."""
        head, shape = line[0], line[1]
        if len(self._plans) >= _PLANS_LIMIT:
            self._plans.clear()
        try:
            plan = self._new_plan(head, shape)
        except ReportInputError:
            self.add(to_point(line))  # the same error, about the line itself
            raise
        self._plans[(head, shape)] = plan
        return plan

    def _new_plan(self, head: Head, shape: Shape) -> tuple[Any, ...]:
        tags = head.tags
        if head.series not in (REQUEST, ERROR):
            return _SKIP
        if self.service is not None and tags.get("service") != self.service:
            return _SKIP
        # The tags are checked by the checks of add(), on a stand-in point.
        probe = Point.trusted(head.series, 0, tags, dict.fromkeys(shape.keys, 0.0))
        route = _route(self.source, probe)
        status = _int_tag(self.source, probe, "status_code")
        if head.series == ERROR:
            code = _int_tag(self.source, probe, "error_code")
            if "service" in tags:
                self._services.add(tags["service"])
            counter, times = self._group(code, status)
            return (_ERROR, self._route(route), counter, route, times.append)
        floats = {key: index for index, key in enumerate(shape.float_keys)}
        timed = [key for key in shape.keys if key == "execution_time" or key.endswith("_time")]
        if "execution_time" not in floats or any(key not in floats for key in timed):
            return (_SLOW,)  # missing, or a string: add() tells which
        if "service" in tags:
            self._services.add(tags["service"])
        state = self._route(route)
        steps = tuple((floats[key], state.slot(key)) for key in timed if key != "execution_time")
        at = floats["execution_time"]
        plan = (
            _REQUEST,
            state.durations.append,
            at,
            steps,
            state.step_totals,
            state.step_counts,
            _floats_getter([floats[key] for key in timed]),
        )
        if self.slowest and "request_id" in shape.keys and "request_id" not in floats:
            # The id's regex group: the text of the string field.
            return (_SLOWEST, *plan[1:], state.slowest, shape.keys.index("request_id"))
        return plan

    def build(self) -> Report:
        """The report; :class:`ReportInputError` when there was no ``request`` point."""
        self._fold()
        if self._start_ns is None or self._end_ns is None:
            where = f" of service {self.service!r}" if self.service is not None else ""
            raise ReportInputError(f"{self.source}: no 'request' points{where}: nothing to report")
        routes = []
        for route in sorted(self._routes):
            state = self._routes[route]
            if not state.durations:
                continue
            values = state.ranked()
            executed = math.fsum(values)
            steps = tuple(
                StepSummary(
                    name=name,
                    requests=state.step_counts[index],
                    total=state.step_totals[index],
                    mean=state.step_totals[index] / len(values),
                    share=state.step_totals[index] / executed if executed else 0.0,
                )
                for name, index in state.steps.items()
            )
            routes.append(
                RouteSummary(
                    route=route,
                    requests=len(values),
                    errors=state.errors,
                    minimum=values[0],
                    p25=percentile(values, 25),
                    p50=percentile(values, 50),
                    p75=percentile(values, 75),
                    p95=percentile(values, 95),
                    p99=percentile(values, 99),
                    maximum=values[-1],
                    mean=executed / len(values),
                    steps=tuple(sorted(steps, key=lambda s: -s.total)),
                    slowest=tuple(
                        (request_id, seconds)
                        for seconds, request_id in sorted(state.slowest, reverse=True)
                    ),
                )
            )
        error_groups = tuple(
            sorted(
                (
                    ErrorGroup(code, status, sum(by_route.values()), dict(by_route.most_common()))
                    for (code, status), by_route in self._groups.items()
                ),
                key=lambda g: (-g.count, g.error_code, g.status),
            )
        )
        return Report(
            source=self.source,
            services=tuple(sorted(self._services)),
            start_ns=self._start_ns,
            end_ns=self._end_ns,
            requests=sum(len(state.durations) for state in self._routes.values()),
            errors=sum(group.count for group in error_groups),
            routes=tuple(routes),
            error_groups=error_groups,
            timeline=self._timeline,
        )


def _keep_slowest(
    heap: list[tuple[float, str]], limit: int, seconds: float, request_id: str
) -> None:
    """Keep ``(seconds, request_id)`` in ``heap`` if it is among the ``limit`` slowest."""
    if len(heap) < limit:
        heapq.heappush(heap, (seconds, request_id))
    elif seconds >= heap[0][0] and (seconds, request_id) > heap[0]:  # ties: by id, any order
        heapq.heapreplace(heap, (seconds, request_id))


def _floats_getter(indexes: list[int]) -> Callable[[list[float]], Sequence[float]]:
    if len(indexes) == 1:
        (only,) = indexes
        return lambda floats: (floats[only],)
    return itemgetter(*indexes)


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
    if any(r.slowest for r in report.routes):
        slowest = Table(
            title="Slowest requests by route (lunamon trace REQUEST_ID ... shows one whole)",
            box=box.SIMPLE_HEAD,
        )
        slowest.add_column("route", no_wrap=True)
        slowest.add_column("ms", justify="right", no_wrap=True)
        slowest.add_column("request_id", no_wrap=True)
        for r in report.routes:
            for index, (request_id, seconds) in enumerate(r.slowest):
                slowest.add_row(
                    escape(r.route) if index == 0 else "",
                    _ms(seconds),
                    escape(request_id),
                    end_section=index == len(r.slowest) - 1,
                )
        console.print(slowest)

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
