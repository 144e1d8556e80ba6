"""Table 3: encoding the seed's request point to line protocol, in points per second.

Every encoder gets the same points (the seed's POST /handlers/{handlerId}/events
request point: four tags, request id, execution time and nine step times) in
its own native form, built before timing, and encodes a batch of them to one
body; batches alternate between encoders round by round. Before timing, every
encoder's output is parsed back with ``lunamon.parse_line_protocol`` and
compared with the input (floats to 1e-12, as encoders format them differently).
"""

from __future__ import annotations

import gc
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import lunamon
from benchmarks._common import (
    Record,
    Summary,
    base_parser,
    fmt_int,
    fmt_ratio,
    hand_written_lines,
    have,
    markdown_table,
    paired_ratio,
    seed_records,
    verdict,
)
from lunamon.point import FieldValue, TagSet, _encode_lines

__all__ = ["main"]

TITLE: Final = "3. Encoding the seed's request point to line protocol (points/s, one core)"
TARGET: Final = 5.0


@dataclass
class Encoder:
    key: str
    label: str
    prepare: Callable[[list[Record]], Any]  # records -> the encoder's native input
    encode: Callable[[Any], bytes]  # native input -> one body
    target: float | None = None


# --------------------------------------------------------------------------- the encoders


def _lunamon_points(records: list[Record]) -> list[lunamon.Point]:
    return [lunamon.Point("request", t, tags, fields) for t, tags, fields in records]


def _lunamon_recorded_points(records: list[Record]) -> list[lunamon.Point]:
    """The points as lunamon's recorder emits them: one ``TagSet`` shared by every point
    of a route, status and handler id (it caches its encoded prefix), trusted parts."""
    shared: dict[tuple[tuple[str, str], ...], TagSet] = {}
    points = []
    for t, tags, fields in records:
        tag_set = shared.setdefault(tuple(tags.items()), TagSet(tags))
        points.append(lunamon.Point.trusted("request", t, tag_set, dict(fields)))
    return points


def _lunamon_per_point(points: list[lunamon.Point]) -> bytes:
    return ("\n".join([p.to_line_protocol() for p in points]) + "\n").encode()


def _dicts(records: list[Record]) -> list[dict[str, Any]]:
    return [
        {"measurement": "request", "time": t, "tags": tags, "fields": fields}
        for t, tags, fields in records
    ]


def _aioinflux(points: list[dict[str, Any]]) -> bytes:
    with warnings.catch_warnings():  # without pandas it warns once, at import
        warnings.simplefilter("ignore")
        from aioinflux.serialization import serialize

    body: bytes = serialize(points)
    return body


def _influxdb_points(records: list[Record]) -> dict[str, Any]:
    return {"points": _dicts(records)}


def _influxdb(data: dict[str, Any]) -> bytes:
    from influxdb.line_protocol import make_lines

    text: str = make_lines(data)
    return text.encode()


def _influxdb_client_points(records: list[Record]) -> list[Any]:
    import influxdb_client

    client: Any = influxdb_client  # partly typed: its builders are untyped calls
    points = []
    for t, tags, fields in records:
        point = client.Point("request")
        for key, value in tags.items():
            point.tag(key, value)
        for key, field in fields.items():
            point.field(key, field)
        points.append(point.time(t, client.WritePrecision.NS))
    return points


def _influxdb_client(points: list[Any]) -> bytes:
    return ("\n".join([p.to_line_protocol() for p in points]) + "\n").encode()


def _encoders() -> tuple[list[Encoder], list[tuple[str, str]]]:
    encoders = [
        Encoder(
            "hand",
            "hand-written f-string encoder with escaping",
            lambda records: records,
            hand_written_lines,
        ),
        Encoder(
            "lunamon_encode_lines",
            "**lunamon** `encode_lines`, points as the recorder emits them (shared tags)",
            _lunamon_recorded_points,
            lunamon.encode_lines,
            TARGET,
        ),
        Encoder(
            "lunamon_encode_lines_built",
            "**lunamon** `encode_lines`, points built with `Point(...)` (own tags each)",
            _lunamon_points,
            lunamon.encode_lines,
            TARGET,
        ),
        Encoder(
            "lunamon_to_line_protocol",
            "**lunamon** `Point.to_line_protocol()` per point, joined",
            _lunamon_points,
            _lunamon_per_point,
            TARGET,
        ),
        Encoder(
            "lunamon_pure_python",
            "lunamon's pure-Python encoder (`LUNAMON_PURE_PYTHON=1`, or no compiler),"
            " recorder points",
            _lunamon_recorded_points,
            _encode_lines,
        ),
    ]
    skipped = []
    if have("aioinflux"):
        aioinflux = Encoder(
            "aioinflux", "aioinflux 0.9 `serialize` (dict points)", _dicts, _aioinflux
        )
        encoders.insert(0, aioinflux)
    else:
        skipped.append(("aioinflux 0.9 `serialize` (dict points)", "aioinflux"))
    if have("influxdb_client"):
        encoders.insert(
            1,
            Encoder(
                "influxdb_client",
                "influxdb-client `Point.to_line_protocol()`",
                _influxdb_client_points,
                _influxdb_client,
            ),
        )
    else:
        skipped.append(("influxdb-client `Point.to_line_protocol()`", "influxdb-client"))
    if have("influxdb.line_protocol"):
        encoders.insert(
            2,
            Encoder("influxdb", "influxdb 5.3 `make_lines`", _influxdb_points, _influxdb),
        )
    else:
        skipped.append(("influxdb 5.3 `make_lines`", "influxdb"))
    return encoders, skipped


# --------------------------------------------------------------------------- equivalence


def _same_field(a: FieldValue, b: FieldValue) -> bool:
    if type(a) is float and type(b) is float:
        return math.isclose(a, b, rel_tol=1e-12)
    return type(a) is type(b) and a == b


def check_equivalent(encoder: Encoder, records: list[Record]) -> None:
    """Parse the encoder's body back and compare every point with its record."""
    body = encoder.encode(encoder.prepare(records))
    parsed = lunamon.parse_line_protocol(body.decode())
    if len(parsed) != len(records):
        raise AssertionError(f"{encoder.key}: {len(parsed)} lines for {len(records)} points")
    for point, (t, tags, fields) in zip(parsed, records, strict=True):
        ok = (
            point.series == "request"
            and point.time_ns == t
            and dict(point.tags) == tags
            and point.fields.keys() == fields.keys()
            and all(_same_field(point.fields[k], v) for k, v in fields.items())
        )
        if not ok:
            raise AssertionError(f"{encoder.key} encoded {point!r}, expected {(t, tags, fields)}")


# --------------------------------------------------------------------------- timing


def _points_per_second(encoder: Encoder, native: Any, n: int, repeat: int) -> float:
    gc.collect()
    gc.disable()
    try:
        start = time.process_time()  # CPU time: other processes on the machine do not count
        for _ in range(repeat):
            encoder.encode(native)
        elapsed = time.process_time() - start
    finally:
        gc.enable()
    return n * repeat / elapsed


def measure(
    encoders: Sequence[Encoder], records: list[Record], rounds: int, repeat: int
) -> dict[str, list[float]]:
    natives = {e.key: e.prepare(records) for e in encoders}
    for encoder in encoders:  # warm-up (and lunamon's caches: steady state of a service)
        encoder.encode(natives[encoder.key])
    results: dict[str, list[float]] = {e.key: [] for e in encoders}
    for round_no in range(rounds):
        shift = round_no % len(encoders)
        for encoder in [*encoders[shift:], *encoders[:shift]]:
            pps = _points_per_second(encoder, natives[encoder.key], len(records), repeat)
            results[encoder.key].append(pps)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--points", type=int, default=5000, help="points per batch")
    parser.add_argument("--repeat", type=int, default=2, help="batches per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    if args.quick:
        args.points, args.repeat, args.rounds = 200, 1, 1
    records = seed_records(args.points)
    encoders, skipped = _encoders()
    for encoder in encoders:
        check_equivalent(encoder, records[:200])
    results = measure(encoders, records, args.rounds, args.repeat)
    # The targets are against aioinflux; without it (no bench extra) ratios are to the
    # hand-written encoder and no target is judged.
    reference_key = "aioinflux" if "aioinflux" in results else "hand"
    reference = results[reference_key]
    rows = []
    for encoder in encoders:
        summary = Summary(results[encoder.key])
        ratio = paired_ratio(results[encoder.key], reference)
        target = ""
        if encoder.target and reference_key == "aioinflux":
            target = f">= {encoder.target:.1f}: {verdict(ratio >= encoder.target)}"
        rows.append(
            [
                encoder.label,
                fmt_int(summary.median),
                f"{fmt_int(summary.min)} / {fmt_int(summary.max)}",
                fmt_ratio(ratio),
                target,
            ]
        )
    rows.extend(
        [label, f"skipped: {package} not installed", "", "", ""] for label, package in skipped
    )
    print(f"### {TITLE}\n")
    print(
        markdown_table(
            ["encoder", "points/s (median)", "min / max", f"vs {reference_key}", "target"], rows
        )
    )
    print(
        f"\nBatches of {fmt_int(args.points)} points, {args.repeat} per round, {args.rounds}"
        " round(s), encoders alternating; every encoder's output parsed back and checked"
        f" equal to the input. Ratio = median of per-round ratios to {reference_key}."
    )


if __name__ == "__main__":
    main()
