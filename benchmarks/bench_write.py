"""Table 4: writing the seed's request points into a real InfluxDB 1.x, in points per second.

A private influxd (free 127.0.0.1 port, temporary data) receives 200,000 points
in batches of 5,000 along each path, the paths alternating round by round, each
(path, round) into its own fresh database so every write is an insert into
the same empty state. Inputs are built before timing (the bytes of the raw
POST, the dicts of aioinflux, lunamon's points). Afterwards every database is
counted: a path whose points were not all stored fails the run.
"""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import aiohttp

import lunamon
from benchmarks._common import InfluxServer as Influxd
from benchmarks._common import (
    Record,
    Summary,
    base_parser,
    fmt_int,
    fmt_ratio,
    hand_written_lines,
    have,
    influxd_available,
    markdown_table,
    paired_ratio,
    seed_records,
    verdict,
)

__all__ = ["main"]

TITLE: Final = "4. Writing into a real InfluxDB 1.x (seed request points, batches)"
TARGET: Final = 0.80


@dataclass
class Inputs:
    """Every path's input, built once: records, bytes, dicts, lunamon points."""

    url: str
    batch: int
    records: list[Record]
    bodies: list[bytes]
    dicts: list[dict[str, Any]]
    points: list[lunamon.Point]

    def chunks(self, items: Sequence[Any]) -> list[Sequence[Any]]:
        return [items[i : i + self.batch] for i in range(0, len(items), self.batch)]

    def head(self, batches: int) -> Inputs:
        """The first ``batches`` batches only (for the warm-up)."""
        n = batches * self.batch
        return Inputs(
            self.url,
            self.batch,
            self.records[:n],
            self.bodies[:batches],
            self.dicts[:n],
            self.points[:n],
        )


async def _post(session: aiohttp.ClientSession, url: str, db: str, body: bytes) -> None:
    params = {"db": db, "precision": "ns"}
    async with session.post(f"{url}/write", params=params, data=body) as response:
        if response.status != 204:
            raise RuntimeError(f"write answered {response.status}: {await response.text()}")


async def raw_post(inputs: Inputs, db: str) -> None:
    async with aiohttp.ClientSession() as session:
        for body in inputs.bodies:
            await _post(session, inputs.url, db, body)


async def hand_written_post(inputs: Inputs, db: str) -> None:
    async with aiohttp.ClientSession() as session:
        for chunk in inputs.chunks(inputs.records):
            await _post(session, inputs.url, db, hand_written_lines(chunk))


async def aioinflux_write(inputs: Inputs, db: str) -> None:
    with warnings.catch_warnings():  # without pandas it warns once, at import
        warnings.simplefilter("ignore")
        from aioinflux import InfluxDBClient

    host, port = inputs.url.rsplit("//", 1)[1].split(":")
    client = InfluxDBClient(host=host, port=int(port), db=db)
    try:
        for chunk in inputs.chunks(inputs.dicts):
            await client.write(list(chunk))
    finally:
        await client.close()


async def lunamon_sink(inputs: Inputs, db: str) -> float:
    """Emit every point into a Monitoring with an InfluxDBSink, then flush: the seconds taken.

    The sink is started (session, database) before the clock starts.
    """
    from lunamon.sinks.influxdb import InfluxDBSink

    host, port = inputs.url.rsplit("//", 1)[1].split(":")
    sink = InfluxDBSink(host=host, port=int(port), database=db)
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
            raise RuntimeError(f"InfluxDBSink wrote {stats}")
    finally:
        await monitoring.close()
    return elapsed


@dataclass
class WritePath:
    key: str
    label: str
    run: Callable[[Inputs, str], Awaitable[Any]]
    target: float | None = None


def _paths() -> tuple[list[WritePath], list[tuple[str, str]]]:
    paths = [
        WritePath(
            "raw", "raw aiohttp POST of pre-encoded bytes (the server's ceiling here)", raw_post
        ),
        WritePath("hand", "hand-written encoder + raw POST", hand_written_post),
    ]
    skipped = []
    if have("aioinflux"):
        paths.append(WritePath("aioinflux", "aioinflux `write(list_of_dicts)`", aioinflux_write))
    else:
        skipped.append(("aioinflux `write(list_of_dicts)`", "aioinflux not installed"))
    if have("lunamon.sinks.influxdb"):
        paths.append(
            WritePath(
                "lunamon",
                "**lunamon** `InfluxDBSink` end to end (emit all, then `flush()`)",
                lunamon_sink,
                TARGET,
            )
        )
    else:
        skipped.append(("**lunamon** `InfluxDBSink`", "lunamon.sinks.influxdb is not there yet"))
    return paths, skipped


async def _timed(path: WritePath, inputs: Inputs, db: str) -> float:
    start = time.perf_counter()
    measured = await path.run(inputs, db)
    elapsed = time.perf_counter() - start
    return float(measured) if isinstance(measured, float) else elapsed


def measure(
    server: Influxd, paths: Sequence[WritePath], inputs: Inputs, rounds: int
) -> dict[str, list[float]]:
    """Per path, the points/s of every round; every database is checked full afterwards."""
    databases = {(p.key, r): f"bench_{p.key}_{r}" for p in paths for r in range(rounds)}
    warmup = {p.key: f"warmup_{p.key}" for p in paths}
    names = [*databases.values(), *warmup.values()]
    server.query("; ".join(f'CREATE DATABASE "{db}"' for db in names))
    results: dict[str, list[float]] = {p.key: [] for p in paths}

    async def run_rounds() -> None:
        for path in paths:  # warm-up: influxd's first writes, connections, imports
            await path.run(inputs.head(2), warmup[path.key])
        for round_no in range(rounds):
            shift = round_no % len(paths)
            for path in [*paths[shift:], *paths[:shift]]:
                seconds = await _timed(path, inputs, databases[path.key, round_no])
                results[path.key].append(len(inputs.points) / seconds)

    asyncio.run(run_rounds())
    for (key, round_no), db in databases.items():
        stored = server.count(db)
        if stored != len(inputs.points):
            raise RuntimeError(f"{key} round {round_no}: {stored} of {len(inputs.points)} stored")
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--points", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.quick:
        args.points, args.batch, args.rounds = 10_000, 1000, 1
    if not influxd_available():
        print(f"### {TITLE}\n\nskipped: influxd is not installed (see SERVERS.md)")
        return
    records = seed_records(args.points)
    points = [lunamon.Point("request", t, tags, fields) for t, tags, fields in records]
    bodies = [
        lunamon.encode_lines(points[i : i + args.batch]) for i in range(0, len(points), args.batch)
    ]
    dicts = [
        {"measurement": "request", "time": t, "tags": tags, "fields": fields}
        for t, tags, fields in records
    ]
    paths, skipped = _paths()
    with Influxd() as server:
        inputs = Inputs(server.url, args.batch, records, bodies, dicts, points)
        results = measure(server, paths, inputs, args.rounds)
    reference = results["raw"]
    rows = []
    for path in paths:
        summary = Summary(results[path.key])
        ratio = paired_ratio(results[path.key], reference)
        target = f">= {path.target:.2f}: {verdict(ratio >= path.target)}" if path.target else ""
        rows.append(
            [
                path.label,
                fmt_int(summary.median),
                f"{fmt_int(summary.min)} / {fmt_int(summary.max)}",
                fmt_ratio(ratio),
                target,
            ]
        )
    rows.extend([label, f"skipped: {why}", "", "", ""] for label, why in skipped)
    print(f"### {TITLE}\n")
    print(
        markdown_table(
            ["path", "points/s (median)", "min / max", "ratio to raw POST", "target"], rows
        )
    )
    print(
        f"\n{fmt_int(args.points)} points in batches of {fmt_int(args.batch)} per path and"
        f" round, {args.rounds} round(s), paths alternating, each into a fresh database;"
        " every database counted afterwards (all points stored). Ratio = median of"
        " per-round ratios to the raw POST."
    )


if __name__ == "__main__":
    main()
