"""Writing the seed's request points into a real ClickHouse (18.16 from Debian), in points/s.

A private clickhouse-server (free 127.0.0.1 port, temporary data, the tests'
launcher) receives the same points along each path, the paths alternating round
by round, each (path, round) into a database of its own whose tables were
created before the clock starts. The reference is a raw aiohttp POST of bodies
pre-encoded as LUNA's rows (``INSERT ... FORMAT JSONEachRow``, uncompressed): the
server's ceiling here; a second raw POST sends the same bodies gzip-compressed (level 1,
compressed before the clock starts), the reference for the sink with gzip, whose ratio to
the uncompressed POST measured deflate rather than lunamon. lunamon's ``ClickHouseSink``
runs end to end (emit every point into a ``Monitoring``, then ``flush()``), with and
without gzip, and without gzip once more as installed without orjson. Afterwards
every table is counted: a path whose points were not all stored fails the run.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import aiohttp

import lunamon
from benchmarks._common import (
    Summary,
    base_parser,
    fmt_int,
    fmt_ratio,
    markdown_table,
    paired_ratio,
    seed_records,
)
from lunamon.sinks import clickhouse
from lunamon.sinks.clickhouse import ClickHouseSink, encode_rows

if TYPE_CHECKING:
    from servers import ClickHouseServer

__all__ = ["main"]

TITLE: Final = "7. Writing into a real ClickHouse (seed request points, batches)"


@dataclass
class Inputs:
    url: str
    batch: int
    points: list[lunamon.Point]
    bodies: list[bytes]
    gzipped: list[bytes]


def gzip_body(body: bytes) -> bytes:
    """``body`` as the sink sends it with gzip: level 1, a gzip header."""
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
    return compressor.compress(body) + compressor.flush()


async def raw_post(inputs: Inputs, db: str) -> None:
    await _post(inputs.url, db, inputs.bodies, {})


async def raw_post_gzip(inputs: Inputs, db: str) -> None:
    await _post(inputs.url, db, inputs.gzipped, {"Content-Encoding": "gzip"})


async def _post(url: str, db: str, bodies: list[bytes], headers: dict[str, str]) -> None:
    query = {"query": f"INSERT INTO {db}.request FORMAT JSONEachRow"}
    async with aiohttp.ClientSession() as session:
        for body in bodies:
            async with session.post(url, params=query, data=body, headers=headers) as response:
                if response.status != 200:
                    raise RuntimeError(
                        f"INSERT answered {response.status}: {await response.text()}"
                    )


async def _sink(inputs: Inputs, db: str, gzip: bool) -> float:
    """Emit every point into a Monitoring with a ClickHouseSink, then flush: the seconds taken.

    The sink is started (session, schema looked up) before the clock starts.
    """
    sink = ClickHouseSink(inputs.url, db, gzip=gzip, create_tables=False)
    settings = lunamon.MonitoringSettings(
        service="bench", batch_size=inputs.batch, buffer_size=len(inputs.points)
    )
    monitoring = lunamon.Monitoring(settings, [sink])
    await monitoring.start()
    try:
        start = time.perf_counter()
        emit = monitoring.emit
        for point in inputs.points:
            emit(point)
        await monitoring.flush()
        elapsed = time.perf_counter() - start
        stats = monitoring.stats()[sink.name]
        if stats["written"] != len(inputs.points):
            raise RuntimeError(f"ClickHouseSink wrote {stats}")
    finally:
        await monitoring.close()
    return elapsed


async def lunamon_plain(inputs: Inputs, db: str) -> float:
    return await _sink(inputs, db, gzip=False)


async def lunamon_plain_stdlib(inputs: Inputs, db: str) -> float:
    """The sink as installed without orjson: rows from the standard library's templates."""
    orjson, clickhouse._orjson = clickhouse._orjson, None
    try:
        return await _sink(inputs, db, gzip=False)
    finally:
        clickhouse._orjson = orjson


async def lunamon_gzip(inputs: Inputs, db: str) -> float:
    return await _sink(inputs, db, gzip=True)


@dataclass
class WritePath:
    key: str
    label: str
    run: Callable[[Inputs, str], Awaitable[Any]]
    reference: str = "raw"  # the raw POST its ratio is taken to


PATHS: Final = [
    WritePath(
        "raw", "raw aiohttp POST of pre-encoded JSONEachRow (the server's ceiling)", raw_post
    ),
    WritePath(
        "raw_gzip",
        "raw aiohttp POST of the same bodies pre-compressed (gzip level 1)",
        raw_post_gzip,
        "raw_gzip",
    ),
    WritePath(
        "stdlib",
        "lunamon `ClickHouseSink(gzip=False)` without orjson (the `json` module's templates)",
        lunamon_plain_stdlib,
    ),
    WritePath("plain", "**lunamon** `ClickHouseSink(gzip=False)` end to end", lunamon_plain),
    WritePath(
        "gzip",
        "**lunamon** `ClickHouseSink()` end to end (gzip, the default; ratio to the gzip POST)",
        lunamon_gzip,
        "raw_gzip",
    ),
]


def _create(server: ClickHouseServer, db: str) -> None:
    server.query(f"CREATE DATABASE {db}")
    server.query(
        f"CREATE TABLE {db}.request (time Int64, data String) ENGINE = MergeTree()"
        " PARTITION BY toYYYYMM(toDateTime(intDiv(time, 1000000000))) ORDER BY time"
    )


def measure(
    server: ClickHouseServer, paths: Sequence[WritePath], inputs: Inputs, rounds: int
) -> dict[str, list[float]]:
    """Per path, the points/s of every round; every table is checked full afterwards."""
    databases = {(p.key, r): f"bench_{p.key}_{r}" for p in paths for r in range(rounds)}
    warmup = {p.key: f"warmup_{p.key}" for p in paths}
    for db in [*databases.values(), *warmup.values()]:
        _create(server, db)
    results: dict[str, list[float]] = {p.key: [] for p in paths}
    head = Inputs(
        inputs.url,
        inputs.batch,
        inputs.points[: 2 * inputs.batch],
        inputs.bodies[:2],
        inputs.gzipped[:2],
    )

    async def run_rounds() -> None:
        for path in paths:  # warm-up: the server's first inserts, connections, imports
            await path.run(head, warmup[path.key])
        for round_no in range(rounds):
            shift = round_no % len(paths)
            for path in [*paths[shift:], *paths[:shift]]:
                start = time.perf_counter()
                measured = await path.run(inputs, databases[path.key, round_no])
                seconds = measured if isinstance(measured, float) else time.perf_counter() - start
                results[path.key].append(len(inputs.points) / seconds)

    asyncio.run(run_rounds())
    for (key, round_no), db in databases.items():
        stored = server.count(db, "request")
        if stored != len(inputs.points):
            raise RuntimeError(f"{key} round {round_no}: {stored} of {len(inputs.points)} stored")
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.quick:
        args.points, args.batch, args.rounds = 10_000, 1000, 1
    # tests/ is on sys.path once benchmarks._common is imported (its launchers are shared).
    from servers import ClickHouseServer, missing_binary

    if missing_binary(ClickHouseServer.binary) is not None:
        print(f"### {TITLE}\n\nskipped: clickhouse-server is not installed (see SERVERS.md)")
        return
    records = seed_records(args.points, start_ns=time.time_ns())
    points = [lunamon.Point("request", t, tags, fields) for t, tags, fields in records]
    bodies = [encode_rows(points[i : i + args.batch]) for i in range(0, len(points), args.batch)]
    gzipped = [gzip_body(body) for body in bodies]
    with ClickHouseServer() as server:
        inputs = Inputs(server.url, args.batch, points, bodies, gzipped)
        results = measure(server, PATHS, inputs, args.rounds)
    rows = []
    for path in PATHS:
        summary = Summary(results[path.key])
        ratio = paired_ratio(results[path.key], results[path.reference])
        rows.append(
            [
                path.label,
                fmt_int(summary.median),
                f"{fmt_int(summary.min)} / {fmt_int(summary.max)}",
                fmt_ratio(ratio),
                f"to `{path.reference}`",
            ]
        )
    print(f"### {TITLE}\n")
    print(markdown_table(["path", "points/s (median)", "min / max", "ratio", "reference"], rows))
    print(
        f"\n{fmt_int(args.points)} points in batches of {fmt_int(args.batch)} per path and"
        f" round, {args.rounds} round(s), paths alternating, each into a fresh database;"
        " every table counted afterwards (all points stored). Ratio = median of per-round"
        " ratios to the raw POST of the same kind of body (plain or gzip); no target: the"
        " gzip row's old 0.80 against the uncompressed POST measured deflate, not lunamon."
    )


if __name__ == "__main__":
    main()
