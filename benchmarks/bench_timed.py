"""Table 2: the cost of one timed sub-step, in ns per call of an awaited no-op coroutine.

All variants run in one event loop, timeit-style (a calibrated number of
``await f()`` in a loop, the garbage collector off), alternating round by
round, timed in process CPU time (other processes on the machine do not
count). The peers' wrappers record into a context-variable dict the way
``@timed`` records into the request's collector.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final, ParamSpec, TypeVar

import wrapt

import lunamon
from benchmarks._common import (
    Summary,
    base_parser,
    fmt_int,
    fmt_ratio,
    have,
    markdown_table,
    null_span_provider,
    verdict,
)
from lunamon.collector import RequestCollector, current

__all__ = ["main"]

TITLE: Final = "2. Cost of one timed sub-step (awaited no-op coroutine, ns per call)"
P = ParamSpec("P")
T = TypeVar("T")
Coro = Callable[[], Awaitable[None]]

_steps: ContextVar[dict[str, float] | None] = ContextVar("bench_steps", default=None)
_perf_counter = time.perf_counter


async def noop() -> None:
    return None


def functools_timed(name: str) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
    """The hand-written decorator: ``functools.wraps``, a contextvar dict, try/finally."""

    def decorator(func: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(func)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            steps = _steps.get()
            if steps is None:
                return await func(*args, **kwargs)
            start = _perf_counter()
            try:
                return await func(*args, **kwargs)
            finally:
                steps[name] = steps.get(name, 0.0) + _perf_counter() - start

        return wrapper

    return decorator


def wrapt_timed(name: str) -> Any:
    """The same work as a plain ``async def`` wrapt decorator (prometheus-async's shape)."""

    @wrapt.decorator
    async def wrapper(
        wrapped: Callable[..., Awaitable[Any]], instance: Any, args: Any, kwargs: Any
    ) -> Any:
        steps = _steps.get()
        if steps is None:
            return await wrapped(*args, **kwargs)
        start = _perf_counter()
        try:
            return await wrapped(*args, **kwargs)
        finally:
            steps[name] = steps.get(name, 0.0) + _perf_counter() - start

    return wrapper


def otel_timed(tracer: Any, name: str) -> Callable[[Coro], Coro]:
    """A span around the call, as code instrumented with OpenTelemetry does it."""

    def decorator(func: Coro) -> Coro:
        @functools.wraps(func)
        async def wrapper() -> None:
            with tracer.start_as_current_span(name):
                await func()

        return wrapper

    return decorator


@contextmanager
def _in_steps_context() -> Iterator[None]:
    token = _steps.set({})
    try:
        yield
    finally:
        _steps.reset(token)


@contextmanager
def _in_request() -> Iterator[None]:
    token = current.set(RequestCollector("POST:/bench", "1700000000,bench"))
    try:
        yield
    finally:
        current.reset(token)


@dataclass
class Variant:
    key: str
    label: str
    func: Coro
    context: Callable[[], AbstractContextManager[None]]
    target: int | None = None


def _variants() -> tuple[list[Variant], list[tuple[str, str]]]:
    """The variants to run, and the (label, reason) of the skipped ones."""
    variants = [
        Variant("bare", "bare `await f()`", noop, nullcontext),
        Variant(
            "functools",
            "functools.wraps async wrapper recording into a contextvar dict",
            functools_timed("step_time")(noop),
            _in_steps_context,
        ),
        Variant(
            "wrapt",
            "plain wrapt async wrapper, same work",
            wrapt_timed("step_time")(noop),
            _in_steps_context,
        ),
        Variant(
            "lunamon_in",
            "**lunamon** `@timed` inside a request",
            lunamon.timed("step_time")(noop),
            _in_request,
            1000,
        ),
        Variant(
            "lunamon_out",
            "**lunamon** `@timed` outside a request",
            lunamon.timed("step_time")(noop),
            nullcontext,
            400,
        ),
    ]
    skipped: list[tuple[str, str]] = []
    if have("opentelemetry.trace"):
        from opentelemetry import trace

        # No provider is ever set globally here: this is the API's proxy, no SDK behind it.
        api_tracer = trace.get_tracer("benchmarks.bench_timed")
        variants.append(
            Variant(
                "otel_api",
                "OpenTelemetry API, no SDK",
                otel_timed(api_tracer, "step")(noop),
                nullcontext,
            )
        )
    else:
        skipped.append(("OpenTelemetry API, no SDK", "opentelemetry-api"))
    if have("opentelemetry.sdk"):
        provider = null_span_provider()
        variants.append(
            Variant(
                "otel_sdk",
                "OpenTelemetry SDK span (BatchSpanProcessor)",
                otel_timed(provider.get_tracer("benchmarks.bench_timed"), "step")(noop),
                nullcontext,
            )
        )
    else:
        skipped.append(("OpenTelemetry SDK span", "opentelemetry-sdk"))
    return variants, skipped


async def _loop(func: Coro, n: int) -> float:
    """CPU ns (all threads: the SDK's exporter thread counts) per ``await func()``."""
    perf = time.process_time_ns
    start = perf()
    for _ in range(n):
        await func()
    return (perf() - start) / n


async def _measure(variant: Variant, n: int) -> float:
    with variant.context():
        gc.collect()
        gc.disable()
        try:
            return await _loop(variant.func, n)
        finally:
            gc.enable()


async def measure(
    variants: Sequence[Variant], rounds: int, seconds: float, min_calls: int
) -> dict[str, list[float]]:
    """Per variant, the ns/call of every round (each round about ``seconds`` long)."""
    calls: dict[str, int] = {}
    for variant in variants:
        ns = await _measure(variant, min_calls)  # calibration, and the warm-up
        calls[variant.key] = max(min_calls, min(2_000_000, int(seconds * 1e9 / ns)))
    results: dict[str, list[float]] = {v.key: [] for v in variants}
    for round_no in range(rounds):
        shift = round_no % len(variants)
        for variant in [*variants[shift:], *variants[:shift]]:
            results[variant.key].append(await _measure(variant, calls[variant.key]))
    return results


def _self_check() -> None:
    """Each recording wrapper records (and @timed records only inside a request)."""
    lunamon_timed = lunamon.timed("check_time")(noop)

    async def run() -> tuple[RequestCollector, dict[str, float]]:
        collector = RequestCollector("POST:/check", "1,check")
        token = current.set(collector)
        try:
            await lunamon_timed()
        finally:
            current.reset(token)
        await lunamon_timed()
        steps: dict[str, float] = {}
        token2 = _steps.set(steps)
        try:
            await functools_timed("a_time")(noop)()
            await wrapt_timed("b_time")(noop)()
        finally:
            _steps.reset(token2)
        return collector, steps

    collector, steps = asyncio.run(run())
    if set(collector.steps) != {"check_time"} or set(steps) != {"a_time", "b_time"}:
        raise AssertionError(f"wrappers did not record: {collector.steps}, {steps}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.15, help="per variant and round")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds = 1, 0.0
    min_calls = 2000 if args.quick else 20_000
    _self_check()
    variants, skipped = _variants()
    results = asyncio.run(measure(variants, args.rounds, args.seconds, min_calls))
    bare = Summary(results["bare"]).median
    rows = []
    for variant in variants:
        summary = Summary(results[variant.key])
        target = ""
        if variant.target is not None:
            # BENCHMARKS.md puts the targets in the overhead column: ns over a bare await.
            overhead_ok = summary.median - bare <= variant.target
            target = f"<= {fmt_int(variant.target)} over bare: {verdict(overhead_ok)}"
        rows.append(
            [
                variant.label,
                fmt_int(summary.median),
                f"{fmt_int(summary.min)} / {fmt_int(summary.max)}",
                fmt_int(summary.median - bare),
                fmt_ratio(summary.median / bare),
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
                "ns/call (median)",
                "min / max",
                "overhead (ns)",
                "ratio to bare",
                "target",
            ],
            rows,
        )
    )
    print(
        f"\n{args.rounds} round(s), variants alternating, about {args.seconds} s each;"
        " overhead = median minus bare's median. Targets are overheads over bare (BENCHMARKS.md)."
    )


if __name__ == "__main__":
    main()
