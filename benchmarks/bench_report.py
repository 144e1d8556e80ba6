"""Table 6: ``lunamon report FILE`` and ``lunamon send FILE --influx URL`` on big files.

A demo-shaped line-protocol file is generated first (not timed): the demo's
traffic mix (``lunamon.demo.traffic.plan_request``: routes, handler and
verifier ids, about one request in ten failing) with each route's sub-steps
(``lunamon.demo.service.SUBSTEPS``), full-precision float times, a
``request`` point per request and an ``error`` point per failure, as the
recorder writes them. The 250,000-line file is the first lines of the
1,000,000-line one.

Each command runs as a user runs it, in its own interpreter (``python -m
lunamon``), its wall time and its peak RSS taken from ``wait4``; the rounds
alternate the commands. ``send`` goes into a private influxd (free 127.0.0.1
port, temporary data), each run into a fresh database that is counted
afterwards; the raw POST row is influxd's own ceiling on this machine: the
file's lines, read beforehand, posted in batches of 5,000 by a bare client.
"""

from __future__ import annotations

import random
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TextIO

from benchmarks._common import (
    PYTHON,
    REPO,
    Summary,
    base_parser,
    fmt_float,
    fmt_int,
    influxd_available,
    markdown_table,
    verdict,
)
from benchmarks._common import InfluxServer as Influxd
from lunamon.demo.service import SERVICE, SUBSTEPS
from lunamon.demo.traffic import plan_request

__all__ = ["main", "write_demo_files"]

TITLE: Final = "6. `lunamon report` / `lunamon send` on big line-protocol files"
TARGET_SECONDS: Final = 10.0
TARGET_MB: Final = 200.0
SIZES: Final = (250_000, 1_000_000)
TIMEOUT: Final = 300.0  # seconds per command

# A demo request's outcome: fail= of the traffic plan -> (status, error_code), as the
# demo service answers it (None: it succeeds).
_OUTCOMES: Final = {
    "400": (400, 12012),
    "500": (500, 1),
    "raise": (500, 1),
    "luna_exc": (500, 10015),
    "http": (400, 0),
    "hang": (499, 0),
}
_TEMPLATES: Final = 4096


# --------------------------------------------------------------------------- the file


def _templates(rng: random.Random) -> list[tuple[str, tuple[str, ...], str | None]]:
    """(request head, its sub-step fields, error head or None) of planned requests."""
    out = []
    for _ in range(_TEMPLATES):
        plan = plan_request(rng)
        route = plan.route
        status, code = _OUTCOMES.get(plan.fail or "", (200 if "upgrade" in route else 201, None))
        tags = f"service={SERVICE},route={route},status_code={status}"
        if "{handlerId}" in route:
            tags += f",handler_id={plan.path.split('/')[2]}"
        elif "{verifierId}" in route:
            tags += f",verifier_id={plan.path.split('/')[2]}"
        steps = SUBSTEPS[route] if code is None else SUBSTEPS[route][:1]  # failed early
        error = f"error,{tags},error_code={code}" if code is not None else None
        out.append((f"request,{tags}", steps, error))
    return out


def write_demo_files(paths: dict[int, Path], seed: int = 0) -> None:
    """Demo-shaped line protocol: ``paths`` maps a line count to a file, each file the first
    lines of the longest one."""
    rng = random.Random(seed)
    templates = _templates(rng)
    sizes = sorted(paths)
    outputs = {size: paths[size].open("w", encoding="utf-8") for size in sizes}
    random_float = rng.random
    bits = rng.getrandbits
    time_ns = 1_700_000_000 * 10**9
    written = 0
    chunk: list[str] = []
    try:
        while written < sizes[-1]:
            head, steps, error = templates[bits(12)]
            time_ns += 1000
            uid = f"{bits(128):032x}"
            request_id = (
                f'"{time_ns // 10**9},{uid[:8]}-{uid[8:12]}-4{uid[13:16]}-a{uid[17:20]}-{uid[20:]}"'
            )
            execution = random_float() * 0.05 + 0.001
            times = "".join([f",{step}={execution * random_float() * 0.4!r}" for step in steps])
            chunk.append(
                f"{head} request_id={request_id},execution_time={execution!r}{times} {time_ns}\n"
            )
            if error is not None:
                chunk.append(f"{error} request_id={request_id} {time_ns}\n")
            if len(chunk) >= 10_000:
                written = _flush(chunk, written, sizes, outputs)
        _flush(chunk, written, sizes, outputs)
    finally:
        for output in outputs.values():
            output.close()


def _flush(chunk: list[str], written: int, sizes: list[int], outputs: Mapping[int, TextIO]) -> int:
    for size in sizes:
        if written < size:
            text = "".join(chunk[: size - written])
            outputs[size].write(text)
    written += len(chunk)
    chunk.clear()
    return written


# --------------------------------------------------------------------------- measuring


@dataclass
class Run:
    seconds: float
    peak_mb: float
    output: str


# Runs the command and writes its wall time and peak RSS (wait4's) to a file. A small
# interpreter of its own starts it: a child's ru_maxrss also counts the image it was
# forked from, which would be this script's, bigger than a small command's own peak.
_TIMED: Final = """
import os, sys, time
start = time.perf_counter()
pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(f"{time.perf_counter() - start} {usage.ru_maxrss}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run(argv: list[str]) -> Run:
    """``python argv``: its wall time and peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        figures = Path(tmp) / "figures"
        done = subprocess.run(
            [PYTHON, "-c", _TIMED, str(figures), PYTHON, *argv],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{argv} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        seconds, peak_kib = figures.read_text().split()
    return Run(float(seconds), int(peak_kib) / 1024, done.stdout)  # ru_maxrss: KiB on Linux


_PARSE_ONLY: Final = """
import sys
from lunamon.lineprotocol import LineReader
with open(sys.argv[1], "rb") as stream:
    count = sum(1 for _ in LineReader(stream))
print(count)
"""

_RAW_POST: Final = """
import sys, urllib.request
url, path, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
lines = open(path, "rb").read().splitlines(keepends=True)
for start in range(0, len(lines), batch):
    body = b"".join(lines[start : start + batch])
    with urllib.request.urlopen(urllib.request.Request(url, body, method="POST")) as answer:
        assert answer.status == 204, answer.status
"""


@dataclass
class Variant:
    key: str
    label: str
    lines: int
    target: bool  # checked against the targets


def main(argv: Sequence[str] | None = None) -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--sizes", default=",".join(map(str, SIZES)), help="comma-separated line counts"
    )
    parser.add_argument("--no-send", action="store_true", help="only the report rows")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    if args.quick:
        sizes, args.rounds = [2_000, 8_000], 1
    send = not args.no_send and influxd_available()
    with tempfile.TemporaryDirectory(prefix="lunamon-bench-report-") as tmp:
        files = {size: Path(tmp) / f"demo-{size}.lp" for size in sizes}
        started = time.perf_counter()
        write_demo_files(files)
        generated = time.perf_counter() - started
        megabytes = files[max(sizes)].stat().st_size / 1e6
        variants = []
        for size in sizes:
            variants.append(Variant(f"parse-{size}", "parser alone (`LineReader`)", size, False))
            variants.append(Variant(f"report-{size}", "**lunamon** `report FILE`", size, True))
        if send:
            for size in sizes:
                variants.append(Variant(f"raw-{size}", "raw POST of the lines", size, False))
                variants.append(
                    Variant(f"send-{size}", "**lunamon** `send FILE --influx`", size, True)
                )
        results: dict[str, list[Run]] = {v.key: [] for v in variants}
        if send:
            with Influxd() as server:
                _measure(variants, results, files, args.rounds, server)
        else:
            _measure(variants, results, files, args.rounds, None)
    _print(variants, results, megabytes, sizes, generated, args.rounds, send)


def _measure(
    variants: list[Variant],
    results: dict[str, list[Run]],
    files: dict[int, Path],
    rounds: int,
    server: Influxd | None,
) -> None:
    for round_no in range(rounds):
        for variant in variants:
            path = str(files[variant.lines])
            kind = variant.key.split("-")[0]
            if kind == "parse":
                done = run(["-c", _PARSE_ONLY, path])
                if int(done.output) != variant.lines:
                    raise RuntimeError(f"parser read {done.output.strip()} of {variant.lines}")
            elif kind == "report":
                done = run(["-m", "lunamon", "report", path, "--no-progress"])
            else:
                assert server is not None
                db = f"bench_{variant.key.replace('-', '_')}_{round_no}"
                server.create_database(db)
                if kind == "raw":
                    url = f"{server.url}/write?db={db}&precision=ns"
                    done = run(["-c", _RAW_POST, url, path, "5000"])
                else:
                    url = f"{server.url}/{db}"
                    done = run(["-m", "lunamon", "send", path, "--influx", url, "--no-progress"])
                stored = server.count(db) + server.count(db, "error", "request_id")
                if stored != variant.lines:
                    raise RuntimeError(f"{variant.key}: {stored} of {variant.lines} stored")
            results[variant.key].append(done)


def _print(
    variants: list[Variant],
    results: dict[str, list[Run]],
    megabytes: float,
    sizes: list[int],
    generated: float,
    rounds: int,
    send: bool,
) -> None:
    rows = []
    peaks: dict[str, float] = {}
    for variant in variants:
        runs = results[variant.key]
        seconds = Summary([r.seconds for r in runs])
        peak = max(r.peak_mb for r in runs)
        peaks[variant.key] = peak
        target = ""
        if variant.target and variant.lines == max(sizes):
            ok = seconds.median <= TARGET_SECONDS and peak <= TARGET_MB
            target = f"<= {TARGET_SECONDS:.0f} s, <= {TARGET_MB:.0f} MB: {verdict(ok)}"
        rows.append(
            [
                variant.label,
                fmt_int(variant.lines),
                fmt_float(seconds.median),
                f"{fmt_float(seconds.min)} / {fmt_float(seconds.max)}",
                fmt_int(variant.lines / seconds.median),
                fmt_int(peak),
                target,
            ]
        )
    print(f"### {TITLE}\n")
    print(
        markdown_table(
            ["what", "lines", "s (median)", "min / max", "lines/s", "peak RSS MB", "target"], rows
        )
    )
    small, large = min(sizes), max(sizes)
    growth = [
        f"`{kind}` {fmt_int(peaks[f'{kind}-{small}'])} -> {fmt_int(peaks[f'{kind}-{large}'])} MB"
        for kind in ("report", "send")
        if f"{kind}-{large}" in peaks
    ]
    print(
        f"\nPeak RSS from {fmt_int(small)} to {fmt_int(large)} lines (flat in file size means"
        f" about equal): {'; '.join(growth)}. The {fmt_int(large)}-line file:"
        f" {fmt_int(megabytes)} MB, generated in {generated:.1f} s (not timed). {rounds}"
        " round(s), commands alternating; each a fresh interpreter (`python -m lunamon`),"
        " startup included. The report's percentiles are exact: it keeps every"
        " execution_time (8 bytes a request, the only part of its memory that grows with"
        " the file); `send` keeps at most 3 batches per connection (2 connections)."
        + (
            ""
            if send
            else " `send` rows skipped: influxd is not installed (see SERVERS.md) or --no-send."
        )
    )


if __name__ == "__main__":
    main()
