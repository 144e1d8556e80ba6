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

Counting is in memory and happens once per batch: :meth:`MetricsSink.write` never
fails, so the flusher never delivers a batch twice. With ``multiprocess_dir``, each
process also keeps its whole cumulative state in a file of its own there (named by
pid and a random part: pids repeat, and in containers they are all 1), rewritten
after each batch in the background, again a second later when a write failed, and
whenever the file vanished (the folder is recreated). The file is derived state: a
failed write is logged (rate-limited) and costs no count. A scrape of any worker
answers from those files alone, its own included as last written, so every worker
gives the same answer; it never counts a worker twice, and a file that vanished
(an operator cleared the folder) keeps counting as the scraping worker last read it
until its worker writes it again, so the counters do not drop (Prometheus would read
a drop as a reset). A worker that died stays counted, as counters must not go down:
clear the folder when the service is deployed, before its workers start.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import json
import os
import sys
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

from lunamon._log import RateLimitedLogger, logger
from lunamon.errors import SettingsError
from lunamon.point import Point, TagSet
from lunamon.settings import MetricsSettings

if sys.version_info >= (3, 11):
    from asyncio import timeout as _timeout
else:  # pragma: no cover - aiohttp brings async_timeout on 3.10
    from async_timeout import timeout as _timeout  # type: ignore[import-not-found,unused-ignore]

__all__ = [
    "MetricsPort",
    "MetricsSink",
    "MetricsStore",
    "SharedFolder",
    "add_metrics_route",
    "check_folder",
    "check_metrics_route",
    "metrics_handler",
]

_FILE_PREFIX: Final = "lunamon-metrics-"
# OpenMetrics allows 128 characters of exemplar labels; a longer client id is left out.
_MAX_EXEMPLAR: Final = 128 - len("request_id")

# Seconds between checks that this process's file is there (rewritten when it is not,
# or when its last write failed).
_RECHECK: Final = 1.0
_LOG_INTERVAL: Final = 30.0
# Seconds between a worker's attempts to bind the metrics port another process holds.
_PORT_RETRY: Final = 5.0

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
            latest = histogram.exemplars[index]
            if latest is None or time_ns >= latest[2]:  # never older: Prometheus refuses that
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

    def merge_snapshot(self, data: dict[str, Any]) -> bool:
        """Add another process's :meth:`snapshot` to this store; false (and nothing added)
        when its buckets differ: another configuration, not comparable."""
        if tuple(data.get("buckets", ())) != self.buckets:
            return False
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
        return True


class _Collector:
    """prometheus_client's view of a store (set before each scrape)."""

    def __init__(self, store: MetricsStore, settings: MetricsSettings) -> None:
        self.store = store
        self.extra_names = list(settings.extra_labels)
        self.extra_values = list(settings.extra_labels.values())

    def collect(self) -> Iterator[Metric]:
        store = self.store
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


class SharedFolder:
    """This process's file in ``multiprocess_dir``, and what a scrape reads there.

    The file holds the process's whole cumulative state, so rewriting it from memory
    restores it whatever happened to the folder; it is named by pid and a random part
    drawn in the process (again after ``fork``), so a new process never takes over
    the file of one that died, even with the same pid.
    """

    def __init__(self, folder: Path, store: MetricsStore) -> None:
        self.folder = folder
        self.store = store
        self.published: dict[str, Any] | None = None  # the snapshot the file last got
        self.seen: dict[str, dict[str, Any]] = {}  # other files, as last read
        self.failing = False
        self.closed = False
        self._pid = 0
        self._name = ""
        self._changed = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._log = RateLimitedLogger(_LOG_INTERVAL)

    @property
    def path(self) -> Path:
        pid = os.getpid()
        if pid != self._pid:  # first use, or a forked child: a name of its own
            self._pid = pid
            self._name = f"{_FILE_PREFIX}{pid}-{os.urandom(8).hex()}.json"
        return self.folder / self._name

    async def start(self) -> None:
        """Write the file now (the folder too, if it went), and keep it from then on."""
        await self.save(force=True)
        self._keep_going()

    def changed(self) -> None:
        """The store counted a batch: write the file soon (never waited for)."""
        self._changed.set()
        self._keep_going()

    def _keep_going(self) -> None:
        if not self.closed and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._keep())

    async def _keep(self) -> None:
        """Write after each batch; every ``_RECHECK`` s, again if it failed or vanished."""
        while not self.closed:
            with contextlib.suppress(asyncio.TimeoutError):
                async with _timeout(_RECHECK):
                    await self._changed.wait()
            if self.closed:
                return  # close() writes the final state
            await self.save(force=False)
            # The others' files, read every time too: a worker that was never scraped
            # still knows them when the folder is cleared (and writes back the dead's).
            await self.refresh()

    async def save(self, *, force: bool) -> bool:
        """Write the store's state (unless ``force`` is false and the file is there: then
        it holds that state already); whether the file holds it now. Never raises for the
        file system."""
        async with self._lock:
            force = force or self.failing or self._changed.is_set()  # counted since the call
            self._changed.clear()
            snapshot = self.store.snapshot()  # on the loop: one consistent state
            path = self.path
            try:
                await asyncio.to_thread(_write_snapshot, path, snapshot, force)
            except (OSError, ValueError) as exc:
                self.failing = True
                self._log.log(
                    "warning",
                    "metrics_file_write_failed",
                    key=str(path),
                    path=str(path),
                    error=repr(exc)[:200],
                    consequence="scrapes show this worker's counts as last written",
                )
                return False
            self.published = snapshot
            if self.failing:
                self.failing = False
                logger.info("metrics_file_written_again", path=str(path))
            return True

    async def close(self) -> None:
        """Stop the background writes, then write the final state once."""
        self.closed = True
        task, self._task = self._task, None
        if task is not None:
            self._changed.set()
            await task
        await self.save(force=True)

    def read_others(self, seen: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The other processes' files (blocking reads: call it in a thread).

        A file this process read before and that is gone now (the folder was cleared) is
        written back as last read, unless its owner wrote it again meanwhile: a worker
        that died cannot rewrite its own, and a worker started since must count it too.
        """
        own = self._name
        found: dict[str, dict[str, Any]] = {}
        listed = {path.name for path in self.folder.glob(f"{_FILE_PREFIX}*.json")}
        for name in sorted(seen.keys() - listed):
            _restore(self.folder / name, seen[name])
        for path in sorted(self.folder.glob(f"{_FILE_PREFIX}*.json")):  # none if it is gone
            if path.name == own:
                continue
            try:
                snapshot = json.loads(path.read_text())
                if not MetricsStore(self.store.buckets).merge_snapshot(snapshot):  # its shape
                    raise ValueError("other buckets: written with another configuration")
            except FileNotFoundError:
                continue  # removed since the listing: as last read, if ever
            except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
                self._log.log(
                    "warning",
                    "metrics_file_unreadable",
                    key=path.name,
                    path=str(path),
                    error=repr(exc)[:200],
                )
            else:
                found[path.name] = snapshot
        return found

    async def merged(self) -> MetricsStore:
        """Every process's state as written: this one's last file, the others' as read now
        or, for a file gone since, as last read."""
        await self.save(force=False)  # what was counted, and a file that never vanished
        await self.refresh()
        merged = MetricsStore(self.store.buckets, self.store.steps)
        for state in (self.published, *self.seen.values()):
            if state is not None:
                merged.merge_snapshot(state)
        return merged

    async def refresh(self) -> None:
        """Read the other processes' files into :attr:`seen` (in a thread)."""
        try:
            found = await asyncio.to_thread(self.read_others, dict(self.seen))
        except OSError as exc:  # the folder cannot be listed: as last read
            self._log.log("warning", "metrics_folder_unreadable", key="list", error=repr(exc)[:200])
            return
        for name, snapshot in found.items():
            known = self.seen.get(name)
            # Counts only grow: an older copy (written back by a worker that read less)
            # never replaces what this worker has seen.
            if known is None or _total(snapshot) >= _total(known):
                self.seen[name] = snapshot


class MetricsSink:
    """The sink that keeps the metrics: every batch the flusher delivers is counted once."""

    def __init__(self, settings: MetricsSettings, *, name: str = "metrics") -> None:
        self.name = name
        self.settings = settings
        self.store = MetricsStore(settings.buckets, settings.steps)
        self.collector = _Collector(self.store, settings)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        folder = settings.multiprocess_dir
        self.shared = SharedFolder(Path(folder), self.store) if folder else None
        if folder:
            check_folder(folder)

    def __repr__(self) -> str:
        return f"MetricsSink(name={self.name!r}, path={self.settings.path!r})"

    async def start(self) -> None:
        if self.shared is not None:
            await self.shared.start()

    async def write(self, points: Sequence[Point]) -> None:
        """Count ``points``. Never raises: a retried batch would be counted twice."""
        self.store.add(points)
        if self.shared is not None:
            self.shared.changed()

    async def close(self) -> None:
        if self.shared is not None:
            await self.shared.close()

    async def exposition(self, accept: str) -> tuple[bytes, str]:
        """The scrape's body and content type: OpenMetrics when ``accept`` asks for it.

        On the loop, like the updates (no lock needed); the other workers' files are
        read in a thread first.
        """
        view = self.store if self.shared is None else await self.shared.merged()
        self.collector.store = view  # no await until rendered: concurrent scrapes are safe
        if "application/openmetrics-text" in accept:
            return _openmetrics_text(self.registry), openmetrics.CONTENT_TYPE_LATEST
        return _text(self.registry), TEXT_CONTENT_TYPE


def check_folder(folder: str) -> None:
    """Refuse a ``multiprocess_dir`` that cannot be a writable folder (at setup).

    Creates it when missing, and writes and removes a file there to be sure.
    """
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".{_FILE_PREFIX}probe-{os.getpid()}-{os.urandom(4).hex()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        if isinstance(exc, FileExistsError):
            reason = "it is a file, not a folder"
        elif isinstance(exc, NotADirectoryError):
            reason = "a part of it is a file, not a folder"
        raise SettingsError(
            f"{folder!r} cannot be a writable folder ({reason}): the workers keep their"
            " counts there; choose a folder they may write, or leave it empty for one process",
            key="monitoring.metrics.multiprocess_dir",
        ) from None


# prometheus_client leaves these two untyped.
_le: Callable[[float], str] = floatToGoString
_text: Callable[[CollectorRegistry], bytes] = generate_latest
_openmetrics_text: Callable[[CollectorRegistry], bytes] = openmetrics.generate_latest


def _total(snapshot: dict[str, Any]) -> int:
    """The requests a snapshot counted: it grows with every write of its process."""
    return sum(int(row[-1]) for row in snapshot.get("requests", ()))


def _restore(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` only if no file is there (a newer one, its owner's, is
    never replaced): a temporary file linked into place. Never raises."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.restore")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps(data))
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
    except OSError:
        return  # the folder cannot be written: scrapes count it as last read meanwhile
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink()


def _write_snapshot(path: Path, data: dict[str, Any], force: bool) -> None:
    """Write ``data`` to ``path`` atomically (creating its folder again when it was
    removed); unless ``force``, only when the file is missing."""
    if not force and path.is_file():
        return
    text = json.dumps(data)
    temporary = path.with_name(path.name + ".tmp")
    try:
        temporary.write_text(text)
    except FileNotFoundError:  # the folder was removed: recreate it
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(text)
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


# ------------------------------------------------------------------------------ aiohttp wiring

_ROUTE_NAME: Final = "lunamon_metrics"
_PATH_KEY: Final = "monitoring.metrics.path"


def add_metrics_route(app: web.Application, path: str, sink: MetricsSink) -> None:
    """Serve ``sink`` at ``path`` of ``app`` (``[monitoring.metrics] path``)."""
    # Named, so that aiohttp never adds an app's later GET route to this resource (which
    # raises an error naming no setting): check_metrics_route refuses it at startup.
    app.router.add_get(path, metrics_handler(sink), name=_ROUTE_NAME)


def check_metrics_route(app: web.Application, path: str) -> None:
    """Refuse a GET (or HEAD, or any-method) route of ``app`` at ``path``, other than
    lunamon's: it would hide the metrics page, or the page would hide it, silently.
    At setup, and again at startup for the routes added after setup."""
    for resource in app.router.resources():
        if resource.name == _ROUTE_NAME or resource.canonical != path:
            continue
        methods = {route.method for route in resource}
        if methods & {"GET", "HEAD", "*"}:
            raise SettingsError(
                f"{path!r} is already a route of the application ({', '.join(sorted(methods))}):"
                " the metrics page and that route would hide each other; set another path",
                key=_PATH_KEY,
            )


class MetricsPort:
    """The metrics on a port of their own (``[monitoring.metrics] port``), unmonitored.

    Workers that share ``multiprocess_dir`` all answer for every worker, so one
    listener is enough: the first process to bind serves, the others try again every
    ``_PORT_RETRY`` seconds (one takes over when that process stops). Not
    ``SO_REUSEPORT``: a stale process of an earlier deployment, or another service
    given the same port, could bind beside it silently and answer with its own counts
    every other scrape, which Prometheus reads as resets. Without ``multiprocess_dir``
    a port in use is refused: each worker could only answer for itself.
    """

    def __init__(self, sink: MetricsSink) -> None:
        self.sink = sink
        self.settings = sink.settings
        self.bound = False
        self._runner: web.AppRunner | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(self.settings.path, metrics_handler(self.sink))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        if await self._bind():
            return
        where = f"{self.settings.host}:{self.settings.port}"
        if self.sink.shared is None:
            await self.close()
            raise SettingsError(
                f"{where} is in use: another program, or another worker of this service"
                " (each would answer for itself only). With several workers set"
                " monitoring.metrics.multiprocess_dir to a folder they share (one of them"
                " then serves all), or set port = 0 and scrape path on the app's port",
                key="monitoring.metrics.port",
            )
        logger.info(
            "metrics_port_in_use",
            address=where,
            consequence="served by another worker sharing multiprocess_dir (or another"
            f" program); trying again every {_PORT_RETRY:g} s",
        )
        self._task = asyncio.get_running_loop().create_task(self._take_over())

    async def _bind(self) -> bool:
        assert self._runner is not None
        site = web.TCPSite(self._runner, self.settings.host, self.settings.port)
        try:
            await site.start()
        except OSError as exc:
            await site.stop()  # unregistered from the runner
            if exc.errno != errno.EADDRINUSE:
                raise
            return False
        self.bound = True
        return True

    async def _take_over(self) -> None:
        while True:
            await asyncio.sleep(_PORT_RETRY)
            if await self._bind():
                break
        logger.info("metrics_port_taken_over", address=f"{self.settings.host}:{self.settings.port}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.bound = False
