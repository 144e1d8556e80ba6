"""Table 7: the cost of ``client_trace_config`` per outgoing call, beside OpenTelemetry's.

One client session per variant calls a bare aiohttp hello world in another process
(``benchmarks._server --variant bare``) over one keep-alive loopback connection,
reading each body. Only the client process's CPU time counts (``process_time``: the
server's work, and other processes on the machine, do not), per call, variants
alternating round by round. The overhead is a variant's median minus the bare
session's: aiohttp's tracing signals, the hooks, the headers they add.
"""

from __future__ import annotations

import asyncio
import gc
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import aiohttp

import lunamon
from benchmarks._common import (
    Summary,
    base_parser,
    fmt_float,
    fmt_ratio,
    have,
    markdown_table,
    null_span_provider,
    paired_ratio,
    verdict,
)
from benchmarks.bench_service import Server
from lunamon.collector import RequestCollector, current

__all__ = ["main"]

TITLE: Final = "7. Cost of one outgoing call's instrumentation (aiohttp client, µs of client CPU)"
OTEL_PACKAGE: Final = "opentelemetry-instrumentation-aiohttp-client"


@dataclass
class Variant:
    key: str
    label: str
    trace_configs: Callable[[], list[aiohttp.TraceConfig]]
    context: Callable[[], AbstractContextManager[None]]


@contextmanager
def _in_request() -> Iterator[None]:
    token = current.set(RequestCollector("POST:/bench", "1700000000,bench-client"))
    try:
        yield
    finally:
        current.reset(token)


def _variants() -> tuple[list[Variant], list[tuple[str, str]]]:
    variants = [
        Variant("bare", "bare `ClientSession`, no trace config", list, nullcontext),
        Variant(
            "lunamon_out",
            "**lunamon** `client_trace_config`, outside a request",
            lambda: [lunamon.client_trace_config(step="downstream")],
            nullcontext,
        ),
        Variant(
            "lunamon_in",
            "**lunamon** `client_trace_config`, inside a request (id header, timed)",
            lambda: [lunamon.client_trace_config(step="downstream")],
            _in_request,
        ),
        Variant(
            "lunamon_tp",
            "**lunamon** `client_trace_config(traceparent=True)`, inside a request",
            lambda: [lunamon.client_trace_config(step="downstream", traceparent=True)],
            _in_request,
        ),
    ]
    skipped: list[tuple[str, str]] = []
    if have("opentelemetry.sdk") and have("opentelemetry.instrumentation.aiohttp_client"):
        from opentelemetry.instrumentation.aiohttp_client import create_trace_config

        provider = null_span_provider()
        variants.append(
            Variant(
                "otel",
                "OpenTelemetry aiohttp-client instrumentation + SDK (BatchSpanProcessor)",
                lambda: [create_trace_config(tracer_provider=provider)],
                nullcontext,
            )
        )
    else:
        skipped.append(("OpenTelemetry aiohttp-client instrumentation + SDK", OTEL_PACKAGE))
    return variants, skipped


async def _calls(session: aiohttp.ClientSession, url: str, n: int) -> float:
    """Client CPU µs per call (all threads of this process: an exporter thread counts)."""
    clock = time.process_time_ns
    start = clock()
    for _ in range(n):
        async with session.post(url) as response:
            await response.read()
    return (clock() - start) / n / 1000


async def measure(
    variants: Sequence[Variant], url: str, rounds: int, calls: int
) -> dict[str, list[float]]:
    sessions = {
        v.key: aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1), trace_configs=v.trace_configs()
        )
        for v in variants
    }
    results: dict[str, list[float]] = {v.key: [] for v in variants}
    try:
        for variant in variants:  # warm-up: connection, caches
            with variant.context():
                await _calls(sessions[variant.key], url, max(10, calls // 10))
        for round_no in range(rounds):
            shift = round_no % len(variants)
            for variant in [*variants[shift:], *variants[:shift]]:
                with variant.context():
                    gc.collect()
                    gc.disable()
                    try:
                        results[variant.key].append(await _calls(sessions[variant.key], url, calls))
                    finally:
                        gc.enable()
    finally:
        for session in sessions.values():
            await session.close()
    return results


async def _self_check(url: str) -> None:
    """lunamon's hooks send the id and time the call inside a request, and only there."""
    collector = RequestCollector("POST:/check", "1700000000,check")
    async with aiohttp.ClientSession(
        trace_configs=[lunamon.client_trace_config(step="check")]
    ) as session:
        token = current.set(collector)
        try:
            await _calls(session, url, 1)
        finally:
            current.reset(token)
        await _calls(session, url, 1)
    if set(collector.steps) != {"check_time"}:
        raise AssertionError(f"client_trace_config did not time the call: {collector.steps}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=2000, help="per variant and round")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.calls = 1, 50
    variants, skipped = _variants()
    with tempfile.TemporaryDirectory(prefix="bench-client-") as workdir:
        server = Server("bare", Path(workdir))
        try:
            server.wait_ready()
            asyncio.run(_self_check(server.url))
            results = asyncio.run(measure(variants, server.url, args.rounds, args.calls))
        finally:
            server.stop()
    bare = Summary(results["bare"]).median
    otel = Summary(results["otel"]).median - bare if "otel" in results else None
    rows = []
    for variant in variants:
        summary = Summary(results[variant.key])
        overhead = summary.median - bare
        target = ""
        if variant.key.startswith("lunamon_in"):
            target = (
                f"below OpenTelemetry's: {verdict(overhead < otel)}"
                if otel is not None
                else f"below OpenTelemetry's: not measured ({OTEL_PACKAGE} not installed)"
            )
        rows.append(
            [
                variant.label,
                fmt_float(summary.median, 1),
                f"{fmt_float(summary.min, 1)} / {fmt_float(summary.max, 1)}",
                fmt_float(overhead, 1),
                fmt_ratio(paired_ratio(results[variant.key], results["bare"])),
                target,
            ]
        )
    rows.extend(
        [label, f"skipped: {package} not installed", "", "", "", ""] for label, package in skipped
    )
    print(f"### {TITLE}\n")
    print(
        markdown_table(
            [
                "variant",
                "µs/call (median)",
                "min / max",
                "overhead (µs)",
                "ratio to bare",
                "target",
            ],
            rows,
        )
    )
    print(
        f"\n{args.rounds} round(s) of {args.calls} sequential calls per variant, alternating,"
        " one keep-alive loopback connection to a bare aiohttp server in another process;"
        " client process CPU time only. overhead = median minus bare's median; ratio = median"
        " of the round-by-round ratios to bare (drift of the machine cancels within a round)."
    )


if __name__ == "__main__":
    main()
