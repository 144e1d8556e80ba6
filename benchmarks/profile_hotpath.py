"""Where the microseconds of a monitored request go: lunamon's hot path taken apart.

``python -m benchmarks.profile_hotpath [--quick]`` times, in one process, each
step lunamon adds to a request (request id, header read, route lookup,
collector, clocks, context variable, tags, fields, point, emit, encoding) and
the whole of it in aiohttp's own ``Application._handle`` for the bare, empty
middleware, lunamon middleware and ``@monitor_request`` apps; then each step
of ``@timed``. Figures are CPU time (``process_time``), the best of several repeats (noise
only adds).

``--pyspy SECONDS`` also samples the lunamon middleware server under wrk with
py-spy and attributes every sample to the deepest lunamon frame on its stack,
giving µs per request as the real server spends them.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Final

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

import lunamon
from benchmarks._common import (
    PYTHON,
    SEED_PATH_TEMPLATE,
    SERVICE,
    RequestDriver,
    base_parser,
    fmt_float,
    fmt_int,
    markdown_table,
)
from benchmarks._server import EncodingSink, build_app, hello
from benchmarks.bench_service import Server, run_wrk, server_cpu_seconds
from lunamon._ids import new_request_id
from lunamon._recorder import RequestRecorder
from lunamon._validation import sanitize_tag_value
from lunamon.aiohttp import RECORDER_KEY
from lunamon.collector import RequestCollector, current
from lunamon.point import FieldValue, Point

__all__ = ["main"]

PATH: Final = "/handlers/3f0c6b1e-9d1a-4c55-8d0b-5b8a3c2e1f00/events"
Row = list[str]


def _best(samples: list[float]) -> float:
    return min(samples)


def per_call(func: Callable[[], object], n: int, repeat: int) -> float:
    """ns per ``func()`` (best of ``repeat`` loops of ``n``), the loop's own cost removed."""

    def loop(f: Callable[[], object]) -> float:
        perf = time.process_time_ns
        gc.disable()
        try:
            start = perf()
            for _ in range(n):
                f()
            return (perf() - start) / n
        finally:
            gc.enable()

    empty = _best([loop(_nothing) for _ in range(repeat)])
    return max(0.0, _best([loop(func) for _ in range(repeat)]) - empty)


def _nothing() -> None:
    return None


async def per_await(
    make: Callable[[], Awaitable[object]], n: int, repeat: int, between: Callable[[], Any]
) -> float:
    """ns per ``await make()`` (best of ``repeat`` loops of ``n``); ``between`` runs untimed."""
    results = []
    for _ in range(repeat):
        perf = time.process_time_ns
        gc.disable()  # as timeit: a collection's pause is not the step's cost (see bench_memory)
        try:
            start = perf()
            for _ in range(n):
                await make()
            results.append((perf() - start) / n)
        finally:
            gc.enable()
        await between()
    return _best(results)


async def _noop_between() -> None:
    return None


# --------------------------------------------------------------------------- the apps


def _app(kind: str) -> tuple[web.Application, lunamon.Monitoring | None]:
    if kind == "prometheus":  # the peer's middleware, as bench_service serves it
        app, _ = build_app("prometheus")
        app.freeze()
        return app, None
    monitoring = None
    middlewares: list[Any] = []
    if kind == "empty_middleware":

        @web.middleware
        async def passthrough(request: web.Request, handler: Any) -> web.StreamResponse:
            response: web.StreamResponse = await handler(request)
            return response

        middlewares.append(passthrough)
    app = web.Application(middlewares=middlewares)
    if kind.startswith("lunamon"):
        monitoring = lunamon.setup(
            app,
            service=SERVICE,
            sinks=[EncodingSink()],
            middleware=kind == "lunamon_middleware",
            batch_size=5000,
            buffer_size=100_000,
        )
    handler = lunamon.monitor_request(hello) if kind == "lunamon_decorator" else hello
    app.router.add_post(SEED_PATH_TEMPLATE, handler)
    app.freeze()
    return app, monitoring


async def _request(app: web.Application) -> web.Request:
    probe = make_mocked_request("POST", PATH, app=app)
    match_info = await app.router.resolve(probe)
    match_info.add_app(app)
    match_info.freeze()
    request = make_mocked_request("POST", PATH, app=app)
    request._match_info = match_info  # as aiohttp's Application._handle sets it
    return request


async def _whole_requests(n: int, repeat: int) -> tuple[list[Row], dict[str, float]]:
    """ns per ``Application._handle`` of each app (routing, middlewares, handler, lunamon)."""
    kinds = {
        "bare": "bare app",
        "empty_middleware": "empty pass-through middleware",
        "prometheus": "prometheus_client Histogram + Counter middleware",
        "lunamon_middleware": "lunamon middleware",
        "lunamon_decorator": "lunamon `@monitor_request` (no middleware)",
    }
    built = {}
    for kind in kinds:
        app, monitoring = _app(kind)
        built[kind] = (app, monitoring, await _request(app))
    samples: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(repeat):  # the apps alternate, repeat by repeat
        for kind, (app, monitoring, request) in built.items():
            samples[kind].append(
                await per_await(partial(app._handle, request), n, 1, _noop_between)
            )
            if monitoring is not None:
                await monitoring.flush()
    for _, monitoring, _ in built.values():
        if monitoring is not None:
            await monitoring.close()
    results = {kind: _best(values) for kind, values in samples.items()}
    bare = results["bare"]
    rows = [
        [f"`Application._handle`, {label}", fmt_int(ns), fmt_int(ns - bare)]
        for kind, label in kinds.items()
        for ns in [results[kind]]
    ]
    return rows, results


async def _steps(n: int, repeat: int) -> list[Row]:
    """ns of each step of ``RequestRecorder.run`` and ``_record``, timed one by one."""
    app, monitoring = _app("lunamon_middleware")
    assert monitoring is not None
    recorder: RequestRecorder = app[RECORDER_KEY]
    request = await _request(app)
    resource = request.match_info.route.resource
    route = recorder._route(request.method, resource)
    request_id = new_request_id()
    collector = RequestCollector(route.name, request_id)
    response = web.Response(text="Hello, World!")
    handler_value = response

    async def handler(_request: web.Request) -> web.StreamResponse:
        return handler_value

    def tags() -> dict[str, str]:
        shared = getattr(route, "tags", None)
        if callable(shared):  # tag dicts shared per (status, path values), cached on the route
            tags: dict[str, str] = shared(200, request)
            return tags
        assert isinstance(shared, dict)  # a copy of the route's tags per request
        tags = shared.copy()
        tags["status_code"] = "200"
        for param, tag in route.path_tags:
            value = request.match_info.get(param)
            if value:
                text = sanitize_tag_value(value)
                if text:
                    tags[tag] = text
        return tags

    built_tags = tags()

    def fields() -> dict[str, FieldValue]:
        return {"request_id": request_id, "execution_time": 0.000123}

    built_fields = fields()
    point = Point.trusted("request", time.time_ns(), built_tags, built_fields)
    emit = monitoring.emit

    def context_pair() -> None:
        current.reset(current.set(collector))

    def clocks() -> None:
        time.time_ns()
        time.perf_counter()
        time.perf_counter()

    steps: list[tuple[str, Callable[[], object]]] = [
        ("request id: `new_request_id()`", new_request_id),
        (
            "request id header read: `request.headers.get(...)` (absent)",
            lambda: request.headers.get("Luna-Request-Id"),
        ),
        (
            "route: `request.match_info.route.resource` + `_route()` (cached)",
            lambda: recorder._route(request.method, request.match_info.route.resource),
        ),
        ("`RequestCollector(...)`", lambda: RequestCollector(route.name, request_id)),
        ("clocks: `time_ns()` + 2 x `perf_counter()`", clocks),
        ("contextvar: `current.set()` + `current.reset()`", context_pair),
        ("tags: the route's tags with status and `handler_id`", tags),
        ("fields dict (request id, execution time)", fields),
        ("`Point.trusted(...)`", lambda: Point.trusted("request", 1, built_tags, built_fields)),
        (
            "`_record()` whole (tags, fields, point, emit, failed check)",
            lambda: recorder._record(request, route, collector, 1, 0.001, 200, response, False),
        ),
    ]
    rows = []
    for label, func in steps:
        try:
            rows.append([label, fmt_int(per_call(func, n, repeat)), ""])
        except Exception as exc:  # lunamon's internals moved: say so, time the rest
            rows.append([label, "n/a", f"{type(exc).__name__}: {exc}"[:80]])
        await monitoring.flush()
    # emit alone: flushed between loops so the buffer stays below a batch, as in a service
    emit_ns = per_call(lambda: emit(point), min(n, 4000), repeat)
    rows.insert(-1, ["`monitoring.emit(point)`", fmt_int(emit_ns), ""])
    await monitoring.flush()

    async def drain() -> None:
        await monitoring.flush()

    run_ns = await per_await(lambda: recorder.run(request, handler), n, repeat, drain)
    bare_ns = await per_await(lambda: handler(request), n, repeat, _noop_between)
    rows.append(
        [
            "`RequestRecorder.run()` whole, minus the handler's own await",
            fmt_int(run_ns - bare_ns),
            "",
        ]
    )
    sink = lunamon.MemorySink()
    collecting = lunamon.Monitoring(lunamon.MonitoringSettings(batch_size=5000), [sink])
    drive = await RequestDriver(collecting, steps=False).start()
    for _ in range(5000):
        await drive()
    await collecting.close()
    batch = sink.points
    started = time.process_time_ns()
    for _ in range(max(1, repeat)):
        lunamon.encode_lines(batch)
    encode_ns = (time.process_time_ns() - started) / (5000 * max(1, repeat))
    rows.append(
        [
            "encoding, per point (`encode_lines` of 5,000 such points, in the flusher)",
            fmt_int(encode_ns),
            "",
        ]
    )
    await monitoring.close()
    return rows


async def _timed_steps(n: int, repeat: int) -> list[Row]:
    """ns of what one ``@timed`` coroutine call does, piece by piece."""
    from lunamon.timing import perf_counter

    async def noop() -> None:
        return None

    timed = lunamon.timed("x_time")(noop)
    collector = RequestCollector("POST:/x", "1,x")
    steps: dict[str, float] = {}

    def dict_update() -> None:
        steps["x_time"] = steps.get("x_time", 0.0) + 0.5

    async def extra_frame() -> None:
        await noop()

    rows = [
        ["`current.get()`", fmt_int(per_call(current.get, n, repeat)), ""],
        [
            "2 x `perf_counter()`",
            fmt_int(per_call(lambda: (perf_counter(), perf_counter()), n, repeat)),
            "",
        ],
        ["steps dict: `get` + store", fmt_int(per_call(dict_update, n, repeat)), ""],
    ]
    bare = await per_await(noop, n, repeat, _noop_between)
    frame = await per_await(extra_frame, n, repeat, _noop_between)
    outside = await per_await(timed, n, repeat, _noop_between)
    token = current.set(collector)
    try:
        inside = await per_await(timed, n, repeat, _noop_between)
    finally:
        current.reset(token)
    rows += [
        ["one more coroutine frame (`async def` awaiting the function)", fmt_int(frame - bare), ""],
        ["`@timed` outside a request, over bare `await f()`", fmt_int(outside - bare), ""],
        ["`@timed` inside a request, over bare `await f()`", fmt_int(inside - bare), ""],
        ["bare `await f()` itself", fmt_int(bare), ""],
    ]
    return rows


# --------------------------------------------------------------------------- py-spy


def _attribute(stack: list[str]) -> str:
    """The deepest lunamon frame of a sample, unless the handler runs below it."""
    for depth in range(len(stack) - 1, -1, -1):
        frame = stack[depth]
        if "lunamon/" in frame or "EncodingSink" in frame:
            below = stack[depth + 1 :]
            if any(f.startswith(("hello ", "_fix_request_current_app")) for f in below):
                return "(handler and aiohttp below lunamon)"
            return re.sub(r" \(.*?:\d+\)$", "", frame)
    return "(aiohttp, asyncio: not lunamon)"


def _py_spy() -> str:
    """py-spy from the venv (``pip install py-spy``) or else from PATH."""
    beside = Path(PYTHON).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy") or "py-spy"


def pyspy_rows(seconds: int, rate: int) -> list[Row]:
    """Sample the lunamon middleware server under wrk; µs per request by lunamon function."""
    with tempfile.TemporaryDirectory(prefix="lunamon-pyspy-") as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text('wrk.method = "POST"\n')
        raw = Path(tmp) / "stacks.txt"
        server = Server("lunamon_middleware", Path(tmp))
        url = server.url
        try:
            server.wait_ready()
            wrk = ["wrk", "-t1", "-c32", "-s", str(script)]
            subprocess.run([*wrk, "-d2s", url], capture_output=True, check=True, timeout=60)  # warm
            spy = subprocess.Popen(
                [
                    _py_spy(),
                    "record",
                    "--nonblocking",
                    "-r",
                    str(rate),
                    "-d",
                    str(seconds),
                    "-f",
                    "raw",
                    "-o",
                    str(raw),
                    "--pid",
                    str(server.proc.pid),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            load = subprocess.run(
                [*wrk, f"-d{seconds}s", url], capture_output=True, text=True, timeout=seconds + 60
            )
            spy.wait(seconds + 60)
        finally:
            server.stop()
        match = re.search(r"([0-9]+) requests in", load.stdout)
        requests = int(match.group(1)) if match else 0
        counts: collections.Counter[str] = collections.Counter()
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if stack and count.isdigit():
                counts[_attribute(stack.split(";"))] += int(count)
    total = sum(counts.values())
    us_per_sample = 1e6 / rate
    rows = []
    for name, n in counts.most_common():
        us = n * us_per_sample / requests if requests else 0.0
        rows.append([name, f"{100 * n / total:.1f} %", fmt_float(us, 1)])
    rows.append(
        [
            "**all samples (CPU busy)**",
            "100 %",
            fmt_float(total * us_per_sample / max(requests, 1), 1),
        ]
    )
    rows.append([f"requests served during the {seconds} s sample", fmt_int(requests), ""])
    return rows


# (label, server variant, extra arguments) of the in-situ runs.
INSITU: Final = (
    ("bare", "bare", ()),
    ("empty middleware (its own µs: the tracing's floor)", "empty_middleware", ("--trace-costs",)),
    ("lunamon middleware", "lunamon_middleware", ("--trace-costs",)),
    (
        "… without `new_request_id()`",
        "lunamon_middleware",
        ("--trace-costs", "--ablate", "request_id"),
    ),
    ("… without the contextvar", "lunamon_middleware", ("--trace-costs", "--ablate", "context")),
    (
        "… without `_record()` (tags, fields, point, emit)",
        "lunamon_middleware",
        ("--trace-costs", "--ablate", "record"),
    ),
    ("… without `emit()`", "lunamon_middleware", ("--trace-costs", "--ablate", "emit")),
    ("lunamon `@monitor_request`", "lunamon_decorator", ("--trace-costs",)),
)


def insitu_rows(seconds: int, rounds: int) -> list[Row]:
    """Server CPU per request under wrk, and lunamon's own time per request measured inside
    its server (``_server --trace-costs``), also with single pieces made no-ops."""
    labels = [label for label, _, _ in INSITU]
    cpu: dict[str, list[float]] = {label: [] for label in labels}
    costs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="lunamon-insitu-") as tmp:
        workdir = Path(tmp)
        script = workdir / "post.lua"
        script.write_text('wrk.method = "POST"\n')
        servers: dict[str, Server] = {}
        try:
            for i, (label, variant, extra) in enumerate(INSITU):
                servers[label] = Server(variant, workdir, extra, name=f"insitu-{i}")
            for server in servers.values():
                server.wait_ready()
                run_wrk(server.url, 1, 32, script)
            for round_no in range(rounds):
                shift = round_no % len(labels)
                for label in [*labels[shift:], *labels[:shift]]:
                    server = servers[label]
                    before = server_cpu_seconds(server.proc.pid)
                    _, requests = run_wrk(server.url, seconds, 32, script)
                    cpu[label].append(
                        (server_cpu_seconds(server.proc.pid) - before) / requests * 1e6
                    )
        finally:
            for label, server in servers.items():
                costs[label] = server.stop().get("costs", {})
    bare = statistics.median(cpu["bare"])
    rows = []
    for label in labels:
        median = statistics.median(cpu[label])
        c = costs.get(label) or {}
        own = (
            f"{fmt_float(c['own_median_us'], 1)} / {fmt_float(c['own_mean_us'], 1)}"
            f" / {fmt_float(c['own_p90_us'], 1)}"
            if c
            else ""
        )
        encode = fmt_float(c["encode_us_per_point"], 1) if c.get("encode_us_per_point") else ""
        gc_us = f"{fmt_float(c['gc_us_per_request'], 1)} ({c['gc_full']} full)" if c else ""
        rows.append([label, fmt_float(median, 1), fmt_float(median - bare, 1), own, encode, gc_us])
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument(
        "--pyspy", type=int, default=0, metavar="SECONDS", help="also sample with py-spy"
    )
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument(
        "--insitu", type=int, default=0, metavar="SECONDS", help="also measure inside the servers"
    )
    parser.add_argument("--rounds", type=int, default=5, help="of --insitu")
    args = parser.parse_args(argv)
    n, repeat = (2000, 2) if args.quick else (20_000, 7)

    async def run() -> tuple[list[Row], list[Row], list[Row]]:
        whole, _ = await _whole_requests(n // 4, repeat)
        return whole, await _steps(n, repeat), await _timed_steps(n, repeat)

    whole, steps, timed = asyncio.run(run())
    print("### The request path, in process (ns per request)\n")
    print(markdown_table(["what", "ns", "over bare"], whole))
    print("\n### lunamon's steps on the request path (ns each)\n")
    print(markdown_table(["step", "ns", ""], steps))
    print("\n### One `@timed` coroutine call (ns)\n")
    print(markdown_table(["piece", "ns", ""], timed))
    if args.insitu:
        print(f"\n### In the server, under wrk ({args.rounds} rounds of {args.insitu} s, µs)\n")
        headers = [
            "server",
            "CPU µs/request",
            "over bare",
            "lunamon's own µs/request (median / mean / p90)",
            "encoding µs/point",
            "GC µs/request",
        ]
        print(markdown_table(headers, insitu_rows(args.insitu, args.rounds)))
    if args.pyspy:
        print(f"\n### py-spy, lunamon middleware server under wrk ({args.rate} Hz)\n")
        print(
            markdown_table(
                ["deepest lunamon frame", "samples", "µs per request"],
                pyspy_rows(args.pyspy, args.rate),
            )
        )


if __name__ == "__main__":
    main()
