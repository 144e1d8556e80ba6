"""What the benchmark scripts share: arguments, statistics, tables, the seed's point, and
the private servers.

The servers are the tests' own launchers (``tests/servers.py``): the benchmarks start
influxd with the same :class:`InfluxServer` (``with InfluxServer() as server:``) and
pick ports with the same :func:`free_port`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import statistics
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from lunamon import Monitoring, current_request
from lunamon._recorder import RequestRecorder
from lunamon.demo.service import SUBSTEPS
from lunamon.point import FieldValue

__all__ = [
    "PYTHON",
    "REPO",
    "SEED_PATH_TEMPLATE",
    "SEED_ROUTE",
    "SEED_STEPS",
    "SERVICE",
    "Record",
    "RequestDriver",
    "Summary",
    "InfluxServer",
    "base_parser",
    "fmt_float",
    "fmt_int",
    "fmt_ratio",
    "free_port",
    "hand_written_lines",
    "have",
    "influxd_available",
    "markdown_table",
    "paired_ratio",
    "python_module",
    "seed_records",
    "verdict",
]

REPO: Final = Path(__file__).resolve().parent.parent
PYTHON: Final = sys.executable

# tests/ is not a package: its modules import each other as top-level modules.
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))
from servers import InfluxServer, free_port, missing_binary  # noqa: E402

SERVICE: Final = "luna-handlers"
SEED_PATH_TEMPLATE: Final = "/handlers/{handlerId}/events"
SEED_ROUTE: Final = f"POST:{SEED_PATH_TEMPLATE}"
# The sub-step fields of the seed's POST /handlers/{handlerId}/events.
SEED_STEPS: Final = SUBSTEPS[SEED_ROUTE]

# One point as plain parts: (time_ns, tags, fields); each encoder builds its own object.
Record = tuple[int, dict[str, str], dict[str, FieldValue]]


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true", help="tiny inputs, one round: a smoke run, not a figure"
    )
    return parser


def null_span_provider() -> Any:
    """An OpenTelemetry SDK ``TracerProvider`` whose spans go through a
    ``BatchSpanProcessor`` to an exporter that drops them: the SDK's whole cost, no I/O.
    Only when ``opentelemetry.sdk`` is installed (the ``bench`` extra)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class NullExporter(SpanExporter):  # type: ignore[misc,unused-ignore]  # Any without the bench extra
        def export(self, spans: Sequence[Any]) -> Any:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(NullExporter()))
    return provider


def have(module: str) -> bool:
    """Whether ``module`` can be imported (a benchmark-only peer may be absent)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def influxd_available() -> bool:
    """Whether influxd is on PATH (a script needing it prints "skipped" without it)."""
    return missing_binary(InfluxServer.binary) is None


def python_module(module: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``python -m module args`` from the repository root; its output as text."""
    env = dict(os.environ, PYTHONHASHSEED="0")
    return subprocess.run(
        [PYTHON, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# --------------------------------------------------------------------------- statistics


class Summary:
    """Median, min and max of one variant's per-round values."""

    def __init__(self, values: Sequence[float]) -> None:
        if not values:
            raise ValueError("no values")
        self.values = list(values)
        self.median = statistics.median(values)
        self.min = min(values)
        self.max = max(values)


def paired_ratio(values: Sequence[float], reference: Sequence[float]) -> float:
    """Median of the round-by-round ratios: drift of the machine cancels within a round."""
    return statistics.median(v / r for v, r in zip(values, reference, strict=True))


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def fmt_int(value: float) -> str:
    return f"{value:,.0f}"


def fmt_float(value: float, digits: int = 2) -> str:
    return f"{value:,.{digits}f}"


def fmt_ratio(value: float) -> str:
    return f"{value:.3f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return "\n".join(lines)


# --------------------------------------------------------------------------- the seed's point


def _uuid4(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def seed_records(n: int, *, seed: int = 0, start_ns: int = 0, handlers: int = 16) -> list[Record]:
    """``n`` request points of the seed's POST /handlers/{handlerId}/events, as parts.

    Tags and fields in the order lunamon's recorder makes them; every request id
    distinct, handler ids from a small set (as in a real deployment), the times
    plausible floats of seconds, timestamps 1 µs apart from ``start_ns``.
    """
    rng = random.Random(seed)
    start_ns = start_ns or 1_700_000_000 * 10**9
    handler_ids = [_uuid4(rng) for _ in range(handlers)]
    records: list[Record] = []
    for i in range(n):
        time_ns = start_ns + i * 1000
        tags = {
            "service": SERVICE,
            "route": SEED_ROUTE,
            "status_code": "200",
            "handler_id": handler_ids[i % handlers],
        }
        fields: dict[str, FieldValue] = {
            "request_id": f"{time_ns // 10**9},{_uuid4(rng)}",
            "execution_time": rng.uniform(0.005, 0.5),
        }
        for step in SEED_STEPS:
            fields[step] = rng.uniform(0.0001, 0.05)
        records.append((time_ns, tags, fields))
    return records


class RequestDriver:
    """Serves requests through lunamon's real ``RequestRecorder`` (no network, no server).

    Each ``await driver()`` is one ``POST /handlers/{handlerId}/events`` (a
    mocked aiohttp request, resolved by a real router) run by
    ``RequestRecorder.run``: the point emitted is exactly the middleware's,
    request id, shared tags and all. With ``steps`` the handler records the
    seed's nine sub-step times, as ``@timed`` would.
    """

    def __init__(self, monitoring: Monitoring, *, steps: bool = True, handlers: int = 16) -> None:
        self.recorder = RequestRecorder(monitoring, monitoring.settings)
        self._handler_ids = [_uuid4(random.Random(i)) for i in range(handlers)]
        self._steps = SEED_STEPS if steps else ()
        self._requests: list[web.Request] = []
        self._response = web.Response(text="Hello, World!")
        self._i = 0

    async def _handler(self, request: web.Request) -> web.StreamResponse:
        collector = current_request()
        if collector is not None:
            for step in self._steps:
                collector.add_step(step, 0.00123)
        return self._response

    async def start(self) -> RequestDriver:
        """Build the requests (needs the running loop)."""
        app = web.Application()
        app.router.add_post(SEED_PATH_TEMPLATE, self._handler)
        app.freeze()
        for handler_id in self._handler_ids:
            path = SEED_PATH_TEMPLATE.replace("{handlerId}", handler_id)
            probe = make_mocked_request("POST", path, app=app)
            match_info = await app.router.resolve(probe)
            match_info.add_app(app)
            match_info.freeze()
            request = make_mocked_request("POST", path, app=app)
            request._match_info = match_info  # as Application._handle sets it
            self._requests.append(request)
        return self

    async def __call__(self) -> None:
        self._i += 1
        request = self._requests[self._i % len(self._requests)]
        await self.recorder.run(request, self._handler)


def _escape(text: str) -> str:
    if "," in text or "=" in text or " " in text:
        return text.replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")
    return text


def hand_written_lines(records: Sequence[Record]) -> bytes:
    """The hand-written f-string encoder of BENCHMARKS.md: escape when needed, no caching."""
    lines = []
    for t, tags, fields in records:
        tag_text = ",".join(f"{_escape(k)}={_escape(v)}" for k, v in tags.items())
        parts = []
        for key, value in fields.items():
            if isinstance(value, str):
                value = value.replace("\\", "\\\\").replace('"', '\\"')
                parts.append(f'{_escape(key)}="{value}"')
            elif isinstance(value, bool):
                parts.append(f"{_escape(key)}={'true' if value else 'false'}")
            elif isinstance(value, int):
                parts.append(f"{_escape(key)}={value}i")
            else:
                parts.append(f"{_escape(key)}={value!r}")
        lines.append(f"request,{tag_text} {','.join(parts)} {t}")
    return ("\n".join(lines) + "\n").encode()
