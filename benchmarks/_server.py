"""The hello-world service that ``bench_service`` loads with wrk, one process per variant.

``python -m benchmarks._server --variant lunamon_middleware --port 8123 [--stats FILE]``
serves ``POST /handlers/{handlerId}/events`` (the seed's route, so lunamon does
its full work: request id, route, status and ``handler_id`` tags, the point)
answering ``Hello, World!``. On shutdown (SIGTERM) it writes what it recorded
to ``--stats`` as JSON, so the benchmark can check every variant did its work.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from array import array
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final

from aiohttp import web

import lunamon
from benchmarks._common import SEED_PATH_TEMPLATE, SERVICE

__all__ = ["REQUIRES", "VARIANTS", "EncodingSink", "build_app", "main"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Stats = Callable[[], dict[str, Any]]

VARIANTS: Final = (
    "bare",
    "empty_middleware",
    "minimal_timing",
    "prometheus",
    "opentelemetry",
    "lunamon_middleware",
    "lunamon_metrics",
    "lunamon_spool",
    "lunamon_decorator",
)
# The peer packages a variant needs (the `bench` extra); absent ones are skipped.
REQUIRES: Final[dict[str, tuple[str, ...]]] = {
    "prometheus": ("prometheus_client",),
    "lunamon_metrics": ("prometheus_client",),
    "opentelemetry": ("opentelemetry.sdk", "opentelemetry.instrumentation.aiohttp_server"),
}

_BODY: Final = "Hello, World!"


async def hello(request: web.Request) -> web.Response:
    return web.Response(text=_BODY)


class EncodingSink:
    """Encodes every batch to line protocol, as a network sink must, and drops the bytes."""

    name = "encode"

    def __init__(self) -> None:
        self.points = 0
        self.bytes = 0
        self.encode_ns = 0

    async def start(self) -> None:
        return None

    async def write(self, points: Sequence[lunamon.Point]) -> None:
        start = time.perf_counter_ns()
        body = lunamon.encode_lines(points if isinstance(points, list) else list(points))
        self.encode_ns += time.perf_counter_ns() - start
        self.points += len(points)
        self.bytes += len(body)

    async def close(self) -> None:
        return None


def _application(middlewares: Sequence[Any] = ()) -> web.Application:
    # Looked up at call time: the OpenTelemetry instrumentor replaces web.Application.
    app: web.Application = web.Application(middlewares=list(middlewares))
    return app


def _bare() -> tuple[web.Application, Stats]:
    app = _application()
    app.router.add_post(SEED_PATH_TEMPLATE, hello)
    return app, dict


def _empty_middleware(trace_costs: bool = False) -> tuple[web.Application, Stats]:
    @web.middleware
    async def passthrough(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await handler(request)

    if not trace_costs:
        app = _application([passthrough])
        app.router.add_post(SEED_PATH_TEMPLATE, hello)
        return app, dict
    # The floor of --trace-costs: the tracing itself around a middleware doing nothing.
    trace = CostTrace()
    app = _application([trace.outer_middleware(passthrough)])
    app.router.add_post(SEED_PATH_TEMPLATE, trace.inner(hello))
    return app, lambda: {"costs": trace.stats(0, 0)}


def _minimal_timing() -> tuple[web.Application, Stats]:
    durations: list[float] = []
    seen = [0]
    perf_counter = time.perf_counter

    @web.middleware
    async def timing(request: web.Request, handler: Handler) -> web.StreamResponse:
        start = perf_counter()
        try:
            return await handler(request)
        finally:
            durations.append(perf_counter() - start)
            if len(durations) >= 100_000:  # bounded: this variant never ships anything
                seen[0] += len(durations)
                durations.clear()

    app = _application([timing])
    app.router.add_post(SEED_PATH_TEMPLATE, hello)
    return app, lambda: {"recorded": seen[0] + len(durations)}


def _prometheus() -> tuple[web.Application, Stats]:
    from prometheus_client import CollectorRegistry, Counter, Histogram

    registry = CollectorRegistry()
    labels = ("method", "route", "status")
    latency = Histogram(
        "http_request_duration_seconds", "Request latency", labels, registry=registry
    )
    requests = Counter("http_requests", "Requests served", labels, registry=registry)
    perf_counter = time.perf_counter

    @web.middleware
    async def prometheus(request: web.Request, handler: Handler) -> web.StreamResponse:
        start = perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else "<unmatched>"
            values = (request.method, route, str(status))
            latency.labels(*values).observe(perf_counter() - start)
            requests.labels(*values).inc()

    app = _application([prometheus])
    app.router.add_post(SEED_PATH_TEMPLATE, hello)

    def stats() -> dict[str, Any]:
        value = registry.get_sample_value(
            "http_requests_total",
            {"method": "POST", "route": SEED_PATH_TEMPLATE, "status": "200"},
        )
        return {"recorded": int(value or 0)}

    return app, stats


def _opentelemetry() -> tuple[web.Application, Stats]:
    from opentelemetry import metrics, trace
    from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    exported = [0]

    class CountingExporter(SpanExporter):  # type: ignore[misc,unused-ignore]  # Any without the bench extra
        """Takes the batches the SDK would send to a collector, and only counts them."""

        def export(self, spans: Sequence[Any]) -> Any:
            exported[0] += len(spans)
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            return None

    tracer_provider = TracerProvider()
    processor = BatchSpanProcessor(CountingExporter())
    tracer_provider.add_span_processor(processor)
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(MeterProvider(metric_readers=[InMemoryMetricReader()]))
    AioHttpServerInstrumentor().instrument()

    app = _application()
    app.router.add_post(SEED_PATH_TEMPLATE, hello)

    def stats() -> dict[str, Any]:
        processor.force_flush()
        return {"recorded": exported[0]}

    return app, stats


class CostTrace:
    """lunamon's own time per request, measured inside the serving process (``--trace-costs``).

    The route handler is timed, and so is the whole of lunamon's middleware (or
    the ``@monitor_request`` handler): their difference is what lunamon spent on
    the request itself, with the real server's caches and allocator. Encoding
    (in the sink) and the garbage collector's pauses are added up separately.
    """

    MAX_SAMPLES: Final = 2_000_000

    def __init__(self) -> None:
        self.own = array("q")
        self._handler_ns = 0
        self.gc_ns = 0
        self.gc_full = 0
        self._gc_start = 0
        gc.callbacks.append(self._gc)

    def _gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter_ns()
        else:
            self.gc_ns += time.perf_counter_ns() - self._gc_start
            self.gc_full += info["generation"] == 2

    def inner(self, handler: Handler) -> Handler:
        async def timed_handler(request: web.Request) -> web.StreamResponse:
            start = time.perf_counter_ns()
            try:
                return await handler(request)
            finally:
                self._handler_ns = time.perf_counter_ns() - start

        return timed_handler

    def _add(self, start: int) -> None:
        if len(self.own) < self.MAX_SAMPLES:
            self.own.append(time.perf_counter_ns() - start - self._handler_ns)

    def outer_handler(self, handler: Handler) -> Handler:
        async def traced(request: web.Request) -> web.StreamResponse:
            start = time.perf_counter_ns()
            try:
                return await handler(request)
            finally:
                self._add(start)

        return traced

    def outer_middleware(self, middleware: Any) -> Any:
        @web.middleware
        async def traced(request: web.Request, handler: Handler) -> web.StreamResponse:
            start = time.perf_counter_ns()
            try:
                response: web.StreamResponse = await middleware(request, handler)
                return response
            finally:
                self._add(start)

        return traced

    def stats(self, requests_encoded: int, encode_ns: int) -> dict[str, Any]:
        own = sorted(self.own)
        n = len(own)
        return {
            "traced": n,
            "own_median_us": own[n // 2] / 1000 if n else 0.0,
            "own_mean_us": sum(own) / n / 1000 if n else 0.0,
            "own_p90_us": own[int(n * 0.9)] / 1000 if n else 0.0,
            "encode_us_per_point": encode_ns / requests_encoded / 1000 if requests_encoded else 0.0,
            "gc_us_per_request": self.gc_ns / n / 1000 if n else 0.0,
            "gc_full": self.gc_full,
        }


def _lunamon(
    middleware: bool,
    trace_costs: bool = False,
    batch_size: int = 5000,
    metrics: bool = False,
    spool: bool = False,
) -> tuple[web.Application, Stats]:
    sink = EncodingSink()
    app = _application()
    monitoring = lunamon.setup(
        app,
        service=SERVICE,
        sinks=[sink],
        middleware=middleware,
        batch_size=batch_size,
        metrics={"enabled": True} if metrics else None,
        # Each process's folder in it is removed at a clean exit.
        spool_dir=os.path.join(tempfile.gettempdir(), "lunamon-bench-spool") if spool else None,
    )
    trace = CostTrace() if trace_costs else None
    handler: Handler = hello if trace is None else trace.inner(hello)
    if not middleware:
        handler = lunamon.monitor_request(handler)
        if trace is not None:
            handler = trace.outer_handler(handler)
    elif trace is not None:
        app.middlewares[0] = trace.outer_middleware(app.middlewares[0])
    app.router.add_post(SEED_PATH_TEMPLATE, handler)

    def stats() -> dict[str, Any]:
        data = {
            "recorded": sink.points,
            "encoded_bytes": sink.bytes,
            "lunamon": monitoring.stats(),
        }
        if trace is not None:
            data["costs"] = trace.stats(sink.points, sink.encode_ns)
        return data

    return app, stats


def build_app(
    variant: str, trace_costs: bool = False, batch_size: int = 5000
) -> tuple[web.Application, Stats]:
    """The application of ``variant`` and a function reporting what it recorded.

    ``trace_costs`` (lunamon variants only) adds the :class:`CostTrace` figures.
    """
    if variant == "bare":
        return _bare()
    if variant == "empty_middleware":
        return _empty_middleware(trace_costs)
    if variant == "minimal_timing":
        return _minimal_timing()
    if variant == "prometheus":
        return _prometheus()
    if variant == "opentelemetry":
        return _opentelemetry()
    if variant == "lunamon_middleware":
        return _lunamon(middleware=True, trace_costs=trace_costs, batch_size=batch_size)
    if variant == "lunamon_decorator":
        return _lunamon(middleware=False, trace_costs=trace_costs, batch_size=batch_size)
    if variant == "lunamon_metrics":
        return _lunamon(
            middleware=True, trace_costs=trace_costs, batch_size=batch_size, metrics=True
        )
    if variant == "lunamon_spool":
        return _lunamon(middleware=True, trace_costs=trace_costs, batch_size=batch_size, spool=True)
    raise ValueError(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")


class _NoContext:
    """Stands in for lunamon's context variable: ``set``/``reset`` do nothing."""

    def set(self, value: object) -> None:
        return None

    def reset(self, token: object) -> None:
        return None

    def get(self) -> None:
        return None


ABLATIONS: Final = ("request_id", "record", "emit", "context")


def ablate(app: web.Application, piece: str) -> None:
    """Profiling only: make one piece of lunamon's request path a no-op in this process,
    so that the difference in lunamon's own time per request is that piece's cost."""
    import lunamon._recorder as integration

    if piece == "request_id":
        from lunamon._ids import new_request_id

        fixed = new_request_id()
        setattr(integration, "new_request_id", lambda seconds=None: fixed)  # noqa: B010
    elif piece == "record":
        integration.RequestRecorder._record = lambda *args: None  # type: ignore[method-assign]
    elif piece == "emit":
        app[lunamon.MONITORING_KEY].emit = lambda point: None
    elif piece == "context":
        setattr(integration, "current", _NoContext())  # noqa: B010  (not in its __all__)
    else:
        raise ValueError(f"unknown piece {piece!r}; one of {', '.join(ABLATIONS)}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--stats", type=Path, help="write what was recorded here on shutdown")
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.freeze() once started: the collector no longer scans the startup objects",
    )
    parser.add_argument(
        "--trace-costs",
        action="store_true",
        help="lunamon variants: measure lunamon's own time per request in the process",
    )
    parser.add_argument(
        "--ablate",
        default="",
        help="profiling: comma-separated lunamon pieces made no-ops, of: " + ",".join(ABLATIONS),
    )
    parser.add_argument("--batch-size", type=int, default=5000, help="lunamon variants")
    args = parser.parse_args(argv)
    app, stats = build_app(args.variant, args.trace_costs, args.batch_size)
    for piece in filter(None, args.ablate.split(",")):
        ablate(app, piece)

    async def freeze(_app: web.Application) -> None:
        gc.collect()
        gc.freeze()

    if args.gc_freeze:
        app.on_startup.append(freeze)

    async def write_stats(_app: web.Application) -> None:
        if args.stats is not None:
            data = {"variant": args.variant, **stats()}
            args.stats.write_text(json.dumps(data))

    app.on_cleanup.append(write_stats)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
