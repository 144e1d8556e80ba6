"""One process serving every variant of the cost ledger, each its own app on its own port.

``python -m benchmarks._ledger_server --first DIR [--today DIR] VARIANT...`` where a variant is
``bare``, ``prometheus``, or ``TREE`` / ``TREE-PIECE`` (TREE ``today`` or ``first``):
lunamon's hello-world app (``lunamon_middleware``) of that tree, with one piece of its
request path switched off. ``DIR`` holds the first release with its packages renamed
(``lunamon_first``, ``benchmarks_first``: bench_ledger does it), so that both lunamons
live in one process. It prints one JSON line, ``{variant: port}``, then serves until
SIGTERM; ``GET /gc`` on the ``control`` port answers the nanoseconds spent in the
garbage collector so far.

Why one process: a variant's CPU per request moves by several per cent from one process
to the next (hash seed, heap layout), more than most pieces cost. Measured in one
process, a piece's cost is a difference between two apps sharing all of that.

A piece is switched off by editing the recorder's source, for that app alone (a subclass
of its recorder): each edit names the exact text it replaces, and a tree whose text
differs refuses to start, so that a ledger row never silently measures nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import inspect
import json
import signal
import sys
import textwrap
import time
from types import ModuleType
from typing import Any, Final

from aiohttp import web

# Each piece: per tree kind, {method name: [(text, replacement), ...]}; None: not a piece
# of that tree. Replacements keep the code valid and do the least that keeps the request
# served and the point emitted (the point's contents may be constant).
# An edit: (text, replacement); ([text, other text], replacement): the first of them that
# is there (the code before and after a change); ((first line, last line), replacement):
# those lines and all between them.
Edit = tuple[str | list[str] | tuple[str, str], str]
Edits = dict[str, list[Edit]]
_ID: Final = "'0c1d2e3f-4a5b-4c6d-8e7f-8091a2b3c4d5'"
_ROUTE_CURRENT: Final = (
    "        resource = request.match_info.route.resource\n"
    "        route = self._routes.get((method, resource))\n"
    "        if route is None:\n"
    "            route = self._route(method, resource)\n"
)
_ROUTE_FIRST: Final = _ROUTE_CURRENT
_ROUTE_OFF: Final = "        route = self._ledger_route\n"
_ID_LINES: Final = (
    "        request_id = request.headers.get(header)\n"
    "        if request_id is None or not _plausible_request_id(request_id):\n"
    "            request_id = new_request_id(start_ns // 1_000_000_000)\n"
)
_POINT_OFF: Final = "        self.monitoring.emit(self._ledger_point)\n"
_RECORD_FIRST: Final = (
    "        tags: dict[str, str] = route.tags(status, request)\n",
    '        emit(_new_point(Point, ("request", start_ns, tags, fields)))\n',
)


PYTHON_RUN: Final = "python"

PIECES: Final[dict[str, str]] = {
    "none": "nothing (a second copy of the whole: the noise floor of the other rows)",
    "route": "route lookup (match_info, cached route)",
    "time": "clock readings (point time, two perf_counter)",
    "request_id": "request id (header read, check, new id)",
    "context": "collector object and context variable",
    "point": "the point (tags, fields dict, Point)",
    "echo": "the echoed request-id header",
    "prepare": "the prepare hook (on_response_prepare, Expect check)",
    "emit": "emit: buffering, and with it encoding and the points' memory",
    "encode": "encoding at flush (compiled encoder today, Python in the first release)",
}

EDITS: Final[dict[str, dict[str, Edits | None]]] = {
    "current": {
        "route": {"run": [(_ROUTE_CURRENT, _ROUTE_OFF)]},
        # The point time, the id, the collector and the context variable are one compiled
        # call (_speedups.begin): what can be switched off around it is below; "context"
        # is inside it.
        "time": {
            "run": [("time.time_ns(),", "1_764_979_200_000_000_000,")],
            "_end": [
                ("elapsed = (collector.ended or time.perf_counter()) - start", "elapsed = 0.001")
            ],
        },
        "request_id": {"run": [("request.headers.get(self.request_id_header),", f"{_ID},")]},
        "context": None,
        "point": {"_end": [("point := _request_point(", "point := self._ledger_point_of(")]},
        "echo": {"_end": [("response.headers[header] = request_id", "pass")]},
        "prepare": {"_end": [("if after or _EXPECT in request.headers:", "if after:")]},
        "emit": {},
        "encode": {},
        "none": {},
        # Not a piece: today's whole with run in Python (the compiled runner off), the
        # whole that today's pieces are switched off from (they are edits of that Python).
        PYTHON_RUN: {},
    },
    "first": {
        "route": {"run": [(_ROUTE_FIRST, _ROUTE_OFF)]},
        "time": {
            "run": [
                ("start_ns = time.time_ns()", "start_ns = 1_764_979_200_000_000_000"),
                ("start = time.perf_counter()", "start = 1.0"),
                ("elapsed = time.perf_counter() - start", "elapsed = 0.001"),
            ]
        },
        "request_id": {"run": [(_ID_LINES, f"        request_id = {_ID}\n")]},
        "context": {
            "run": [
                (
                    "collector = RequestCollector(route.name, request_id)",
                    "collector = self._ledger_collector",
                ),
                ("token = current.set(collector)", "token = None"),
                ("current.reset(token)", "pass"),
            ]
        },
        "point": {"_record": [(_RECORD_FIRST, _POINT_OFF)]},
        "echo": {"run": [("response.headers[header] = request_id", "pass")]},
        "prepare": None,  # the first release had no prepare hook
        "emit": {},
        "encode": {},
        "none": {},
    },
}


class LedgerError(RuntimeError):
    """An edit's text is not in the tree's source: the ledger would measure nothing."""


def _indented(text: str) -> str:
    """An edit's text (indented as in the file) as it is in the method's compiled body."""
    return textwrap.indent(text, "    ") if text.startswith("        ") else text


def _edited(module: ModuleType, cls: type, name: str, edits: list[Edit]) -> Any:
    """Method ``name`` of ``cls`` with ``edits`` applied, compiled in ``module``'s globals."""
    func = inspect.unwrap(getattr(cls, name))
    body = textwrap.indent(textwrap.dedent(inspect.getsource(func)), "        ")
    for old, new in edits:
        if isinstance(old, tuple):  # the lines from the first to the last
            start, end = body.find(_indented(old[0])), body.find(_indented(old[1]))
            if start < 0 or end < start:
                raise LedgerError(f"{name}: {old!r} not found")
            body = body[:start] + _indented(new) + body[end + len(_indented(old[1])) :]
            continue
        found = [
            text for text in ([old] if isinstance(old, str) else old) if _indented(text) in body
        ]
        if not found:
            raise LedgerError(f"{name}: {old!r} not found")
        body = body.replace(_indented(found[0]), _indented(new))
    namespace = dict(module.__dict__)  # the edited method sees the module's globals
    exec(compile(f"if True:\n{body}", module.__file__ or name, "exec"), namespace)
    method = namespace[name]
    if name == "run":
        method.__middleware_version__ = 1
    return method


class _Tree:
    """One lunamon (this repository's, or the first release's renamed) and its server."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        suffix = "" if kind == "today" else "_first"
        self.lunamon: Any = importlib.import_module("lunamon" + suffix)
        self.server = importlib.import_module(f"benchmarks{suffix}._server")
        name = "lunamon._recorder" if kind == "today" else "lunamon_first.aiohttp"
        self.module = importlib.import_module(name)
        self.aiohttp = importlib.import_module(f"lunamon{suffix}.aiohttp")

    def app(self, piece: str) -> web.Application:
        """The tree's lunamon_middleware app with ``piece`` switched off."""
        captured: dict[str, Any] = {}
        original = self.lunamon.setup

        def setup(app: web.Application, **kwargs: Any) -> Any:
            captured["sink"] = kwargs["sinks"][0]
            return original(app, **kwargs)

        self.lunamon.setup = setup
        try:
            app: web.Application
            app, _stats = self.server.build_app("lunamon_middleware")
        finally:
            self.lunamon.setup = original
        if not piece:
            return app
        edits = EDITS["current" if self.kind == "today" else "first"][piece]
        if edits is None:
            raise LedgerError(f"{piece!r} is not a piece of the {self.kind} tree")
        recorder = app[self.aiohttp.RECORDER_KEY]
        base = type(recorder)
        methods = {name: _edited(self.module, base, name, e) for name, e in edits.items()}
        recorder.__class__ = type(f"{base.__name__}_{piece}", (base,), methods)
        recorder._ledger_route = None
        recorder._ledger_collector = self.module.RequestCollector("POST:/ledger", _ID.strip("'"))
        recorder._ledger_point = self.lunamon.Point(
            "request", 1_764_979_200_000_000_000, {"service": "ledger"}, {"request_id": "x"}
        )
        recorder._ledger_point_of = lambda *args: recorder._ledger_point
        app.middlewares[0] = recorder.run  # the edited one
        if piece == "route":
            resource = next(iter(app.router.resources()))
            recorder._ledger_route = recorder._route("POST", resource)
        if piece == "prepare":
            app.on_response_prepare.remove(recorder.prepare_hook)
        if piece == "emit":
            app[self.lunamon.MONITORING_KEY].emit = lambda point: None
        if piece == "encode":
            sink = captured["sink"]

            async def write(points: Any) -> None:
                sink.points += len(points)

            sink.write = write
        return app


def build(variant: str, trees: dict[str, _Tree]) -> web.Application:
    if variant in ("bare", "prometheus"):
        app: web.Application = trees["today"].server.build_app(variant)[0]
        return app
    kind, _, piece = variant.partition("-")
    if kind not in trees or (piece and piece not in EDITS["current"]):
        raise LedgerError(f"unknown variant {variant!r}")
    return trees[kind].app(piece)


class _Writer:
    """The request's payload writer without a socket: the headers are serialized as
    aiohttp's writer does (an echoed header costs its bytes), nothing is sent."""

    buffer_size = 0
    output_size = 0

    async def write_headers(self, status_line: str, headers: Any) -> None:
        from aiohttp.http_writer import _serialize_headers

        self.output_size += len(_serialize_headers(status_line, headers))

    async def write(self, data: Any) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None

    async def drain(self) -> None:
        return None

    def enable_compression(self, *args: Any) -> None:
        return None

    def enable_chunking(self) -> None:
        return None

    def send_headers(self, *args: Any) -> None:
        return None

    def set_eof(self) -> None:
        return None


class _Driver:
    """One variant's app serving mocked requests in process: ``Application._handle``, then
    ``prepare`` and ``write_eof`` as aiohttp's ``finish_response`` does; CPU time only."""

    def __init__(self, app: web.Application, requests: list[Any]) -> None:
        self.app = app
        self.requests = requests

    @classmethod
    async def make(cls, app: web.Application) -> _Driver:
        from aiohttp.test_utils import make_mocked_request

        path = "/handlers/3f0c6b1e-9d1a-4c55-8d0b-5b8a3c2e1f00/events"
        requests = []
        for _ in range(64):
            request = make_mocked_request("POST", path, app=app, writer=_Writer())
            requests.append(request)
        return cls(app, requests)

    async def run(self, count: int) -> float:
        """CPU ns per request over ``count`` requests (the loop's turns between included:
        the flusher encodes and frees batches in them, as in a server)."""
        handle = self.app._handle
        requests = self.requests
        started = time.process_time_ns()
        for i in range(count):
            request = requests[i % 64]
            response = await handle(request)
            await response.prepare(request)
            await response.write_eof()
            if i % 32 == 31:  # a loop turn per 32 requests, as under wrk -c32
                await asyncio.sleep(0)
        return (time.process_time_ns() - started) / count


async def serve(variants: list[str], first: str) -> None:
    sys.path.insert(0, first)
    trees = {kind: _Tree(kind) for kind in ("today", "first")}
    gc_ns = [0, 0]

    def on_gc(phase: str, _info: dict[str, int]) -> None:
        if phase == "start":
            gc_ns[1] = time.perf_counter_ns()
        else:
            gc_ns[0] += time.perf_counter_ns() - gc_ns[1]

    gc.callbacks.append(on_gc)

    async def gc_time(_request: web.Request) -> web.Response:
        return web.json_response({"gc_ns": gc_ns[0]})

    control = web.Application()
    control.router.add_get("/gc", gc_time)
    apps = {variant: build(variant, trees) for variant in variants}
    drivers: dict[str, _Driver] = {}

    async def drive(request: web.Request) -> web.Response:
        variant, count = request.match_info["variant"], int(request.match_info["count"])
        driver = drivers.get(variant)
        if driver is None:
            driver = drivers[variant] = await _Driver.make(apps[variant])
        return web.json_response({"ns": await driver.run(count)})

    control.router.add_get("/drive/{variant}/{count}", drive)
    apps["control"] = control
    runners, ports = [], {}
    for variant, app in apps.items():
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        ports[variant] = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(json.dumps(ports), flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    for runner in reversed(runners):
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--first", required=True, help="the renamed first release's folder")
    parser.add_argument("--today", default="", help="another checkout as today's lunamon")
    parser.add_argument("variants", nargs="+")
    args = parser.parse_args()
    if args.today:
        sys.path.insert(0, args.today)
    asyncio.run(serve(args.variants, args.first))


if __name__ == "__main__":
    main()
