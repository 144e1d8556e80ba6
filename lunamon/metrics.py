"""Prometheus metrics from the points lunamon records: LUNA's ``LUNA_SERVICE_METRICS``.

A request is instrumented once. :class:`MetricsSink` is one more sink behind the
flusher: each batch updates the counters and histograms, off the request path.
The exposition is prometheus_client's (classic text, or OpenMetrics when the
scraper asks for it, with the ``request_id`` of a request as the exemplar of its
histogram bucket: from a latency spike straight to that request's point).

- ``request_count_total`` {service, path, status_code}
- ``errors_count_total`` {service, path, error_code}
- ``requests`` histogram of ``execution_time`` {service, path, status_code}
- ``request_steps`` histogram of each ``<step>_time`` {service, path, step} (``steps``)

``path`` is the route tag (``METHOD:/template``), so cardinality stays bounded.
With ``multiprocess_dir``, each process also writes its state there after every
batch, and a scrape of any worker answers for all of them (a worker that died
stays counted, as counters must not go down; clear the folder at deployment).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST as TEXT_CONTENT_TYPE
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

from lunamon._log import logger
from lunamon.point import Point, TagSet
from lunamon.settings import MetricsSettings

__all__ = ["MetricsSink", "MetricsStore", "metrics_handler"]

_FILE_PREFIX: Final = "lunamon-metrics-"
# OpenMetrics allows 128 characters of exemplar labels; a longer client id is left out.
_MAX_EXEMPLAR: Final = 128 - len("request_id")

_STEP: Final = "_time"
_TOTAL: Final = "execution_time"

Key = tuple[str, str, str]


def _key(tags: Mapping[str, str], third: str) -> Key:
    """The label values of a request point; cached on the recorder's shared tag sets."""
    if type(tags) is TagSet:
        key = tags._metrics_key
        if key is None:
            key = tags._metrics_key = (
                tags.get("service", ""),
                tags.get("route", ""),
                tags.get(third, ""),
            )
        return key
    return (tags.get("service", ""), tags.get("route", ""), tags.get(third, ""))


class _Histogram:
    """Per-bucket counts (the last is +Inf), their sum, and each bucket's latest exemplar."""

    __slots__ = ("counts", "exemplars", "sum")

    def __init__(self, size: int) -> None:
        self.counts = [0] * (size + 1)
        self.sum = 0.0
        # (request_id, seconds, time_ns) of the latest request counted in each bucket
        self.exemplars: list[tuple[str, float, int] | None] = [None] * (size + 1)

    def merge(self, other: _Histogram) -> None:
        for index, count in enumerate(other.counts):
            self.counts[index] += count
            mine, theirs = self.exemplars[index], other.exemplars[index]
            if theirs is not None and (mine is None or theirs[2] > mine[2]):
                self.exemplars[index] = theirs
        self.sum += other.sum


class MetricsStore:
    """The counters and histograms of one process, updated from batches of points."""

    def __init__(self, buckets: Sequence[float], steps: bool = False) -> None:
        self.buckets = tuple(buckets)
        self.steps = steps
        self.requests: dict[Key, int] = {}
        self.errors: dict[Key, int] = {}
        self.durations: dict[Key, _Histogram] = {}
        self.step_durations: dict[Key, _Histogram] = {}

    def add(self, points: Iterable[Point]) -> None:
        """Count the ``request`` and ``error`` points of a batch."""
        requests, observe = self.requests, self._observe
        for series, time_ns, tags, fields in points:
            if series == "request":
                key = _key(tags, "status_code")
                requests[key] = requests.get(key, 0) + 1
                seconds = fields.get(_TOTAL)
                if type(seconds) is float:
                    observe(self.durations, key, seconds, fields, time_ns)
                if self.steps:
                    for name, value in fields.items():
                        if type(value) is float and name.endswith(_STEP) and name != _TOTAL:
                            step = (key[0], key[1], name[: -len(_STEP)])
                            observe(self.step_durations, step, value, fields, time_ns)
            elif series == "error":
                key = (tags.get("service", ""), tags.get("route", ""), tags.get("error_code", ""))
                self.errors[key] = self.errors.get(key, 0) + 1

    def _observe(
        self,
        into: dict[Key, _Histogram],
        key: Key,
        seconds: float,
        fields: Mapping[str, object],
        time_ns: int,
    ) -> None:
        histogram = into.get(key)
        if histogram is None:
            histogram = into[key] = _Histogram(len(self.buckets))
        index = bisect.bisect_left(self.buckets, seconds)  # the first bound >= seconds
        histogram.counts[index] += 1
        histogram.sum += seconds
        rid = fields.get("request_id")
        if type(rid) is str and len(rid) <= _MAX_EXEMPLAR:
            histogram.exemplars[index] = (rid, seconds, time_ns)

    # ------------------------------------------------------------- across processes

    def snapshot(self) -> dict[str, Any]:
        """This store as JSON-ready data (for the other workers' scrapes)."""

        def histograms(source: dict[Key, _Histogram]) -> list[Any]:
            return [[*key, list(h.counts), h.sum, list(h.exemplars)] for key, h in source.items()]

        return {
            "buckets": list(self.buckets),
            "requests": [[*key, n] for key, n in self.requests.items()],
            "errors": [[*key, n] for key, n in self.errors.items()],
            "durations": histograms(self.durations),
            "steps": histograms(self.step_durations),
        }

    def merge_snapshot(self, data: dict[str, Any]) -> None:
        """Add another process's :meth:`snapshot` (same buckets) to this store."""
        if tuple(data.get("buckets", ())) != self.buckets:
            return  # another configuration: not comparable
        for *key, n in data["requests"]:
            k = (key[0], key[1], key[2])
            self.requests[k] = self.requests.get(k, 0) + int(n)
        for *key, n in data["errors"]:
            k = (key[0], key[1], key[2])
            self.errors[k] = self.errors.get(k, 0) + int(n)
        for name, target in (("durations", self.durations), ("steps", self.step_durations)):
            for service, path, label, counts, total, exemplars in data[name]:
                other = _Histogram(len(self.buckets))
                other.counts = [int(c) for c in counts]
                other.sum = float(total)
                other.exemplars = [(e[0], e[1], e[2]) if e else None for e in exemplars]
                mine = target.get((service, path, label))
                if mine is None:
                    mine = target[(service, path, label)] = _Histogram(len(self.buckets))
                mine.merge(other)

    def copy(self) -> MetricsStore:
        merged = MetricsStore(self.buckets, self.steps)
        merged.merge_snapshot(self.snapshot())
        return merged


class _Collector:
    """prometheus_client's view of a store (and of the other workers' files)."""

    def __init__(self, store: MetricsStore, settings: MetricsSettings) -> None:
        self.store = store
        self.extra_names = list(settings.extra_labels)
        self.extra_values = list(settings.extra_labels.values())
        self.shared = Path(settings.multiprocess_dir) if settings.multiprocess_dir else None
        self.others: list[dict[str, Any]] = []  # set before each scrape

    def read_others(self) -> list[dict[str, Any]]:
        """The other workers' snapshots (blocking file reads: call it in a thread)."""
        if self.shared is None:
            return []
        own = f"{_FILE_PREFIX}{os.getpid()}.json"
        found = []
        for path in sorted(self.shared.glob(f"{_FILE_PREFIX}*.json")):
            if path.name == own:
                continue
            try:
                found.append(json.loads(path.read_text()))
            except (OSError, ValueError) as exc:
                logger.warning("metrics_file_unreadable", path=str(path), error=repr(exc)[:200])
        return found

    def _merged(self) -> MetricsStore:
        if not self.others:
            return self.store
        merged = self.store.copy()
        for snapshot in self.others:
            try:
                merged.merge_snapshot(snapshot)
            except (KeyError, TypeError, ValueError) as exc:
                logger.warning("metrics_file_unreadable", error=repr(exc)[:200])
        return merged

    def collect(self) -> Iterator[Metric]:
        store = self._merged()
        extra = self.extra_names
        requests = CounterMetricFamily(
            "request_count",
            "Requests served, by route and status sent.",
            labels=["service", "path", "status_code", *extra],
        )
        for key, n in sorted(store.requests.items()):
            requests.add_metric([*key, *self.extra_values], n)
        yield requests
        errors = CounterMetricFamily(
            "errors_count",
            "Failed requests, by route and error code.",
            labels=["service", "path", "error_code", *extra],
        )
        for key, n in sorted(store.errors.items()):
            errors.add_metric([*key, *self.extra_values], n)
        yield errors
        yield self._histograms(
            "requests",
            "Request durations in seconds (execution_time).",
            "status_code",
            store.durations,
            store.buckets,
        )
        if store.steps:
            yield self._histograms(
                "request_steps",
                "Durations of the timed sub-steps of requests, in seconds.",
                "step",
                store.step_durations,
                store.buckets,
            )

    def _histograms(
        self,
        name: str,
        documentation: str,
        third: str,
        source: dict[Key, _Histogram],
        bounds: Sequence[float],
    ) -> HistogramMetricFamily:
        family = HistogramMetricFamily(
            name, documentation, labels=["service", "path", third, *self.extra_names]
        )
        les = [_le(bound) for bound in bounds] + ["+Inf"]
        for key, histogram in sorted(source.items()):
            buckets: list[Any] = []
            cumulative = 0
            for le, count, exemplar in zip(les, histogram.counts, histogram.exemplars, strict=True):
                cumulative += count
                if exemplar is None:
                    buckets.append((le, cumulative))
                else:
                    rid, value, when_ns = exemplar
                    labels = {"request_id": rid}
                    buckets.append((le, cumulative, Exemplar(labels, value, when_ns / 1e9)))
            family.add_metric([*key, *self.extra_values], buckets, histogram.sum)
        return family


class MetricsSink:
    """The sink that keeps the metrics: every batch the flusher delivers is counted."""

    def __init__(self, settings: MetricsSettings, *, name: str = "metrics") -> None:
        self.name = name
        self.settings = settings
        self.store = MetricsStore(settings.buckets, settings.steps)
        self.collector = _Collector(self.store, settings)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        shared = settings.multiprocess_dir
        self._file = Path(shared) / f"{_FILE_PREFIX}{os.getpid()}.json" if shared else None

    def __repr__(self) -> str:
        return f"MetricsSink(name={self.name!r}, path={self.settings.path!r})"

    async def start(self) -> None:
        if self._file is not None:
            self._file = self._file.with_name(f"{_FILE_PREFIX}{os.getpid()}.json")  # forked
            await asyncio.to_thread(self._file.parent.mkdir, parents=True, exist_ok=True)

    async def write(self, points: Sequence[Point]) -> None:
        self.store.add(points)
        if self._file is not None:
            await asyncio.to_thread(_write_atomically, self._file, self.store.snapshot())

    async def close(self) -> None:
        return None

    async def exposition(self, accept: str) -> tuple[bytes, str]:
        """The scrape's body and content type: OpenMetrics when ``accept`` asks for it.

        On the loop, like the updates (no lock needed); the other workers' files are
        read in a thread first.
        """
        self.collector.others = await asyncio.to_thread(self.collector.read_others)
        if "application/openmetrics-text" in accept:
            return _openmetrics_text(self.registry), openmetrics.CONTENT_TYPE_LATEST
        return _text(self.registry), TEXT_CONTENT_TYPE


# prometheus_client leaves these two untyped.
_le: Callable[[float], str] = floatToGoString
_text: Callable[[CollectorRegistry], bytes] = generate_latest
_openmetrics_text: Callable[[CollectorRegistry], bytes] = openmetrics.generate_latest


def _write_atomically(path: Path, data: dict[str, Any]) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data))
    with contextlib.suppress(FileNotFoundError):
        os.replace(temporary, path)


def metrics_handler(
    sink: MetricsSink,
) -> Callable[[web.Request], Any]:
    """The aiohttp handler serving ``sink``'s metrics."""

    async def serve_metrics(request: web.Request) -> web.Response:
        body, content_type = await sink.exposition(request.headers.get("Accept", ""))
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    return serve_metrics
