"""The cost ledger: server CPU µs per request of each piece of lunamon's request path,
today and in the first release (e7e0697), each measured by switching that one piece off.

``python -m benchmarks.bench_ledger [--rounds N] [--processes P] [--first REV]`` unpacks
the first release (``git archive``, its packages renamed so that it imports beside this
one), then starts P server processes (``benchmarks._ledger_server``), each serving every
variant on its own port: bare aiohttp, prometheus_client's middleware, and for each tree
lunamon's hello-world middleware whole and once per piece switched off. Each round loads
every variant of every process with wrk in turn, in an order that rotates, and reads the
process's CPU time around each load. A piece's cost is the median, over rounds and
processes, of (whole - piece off) measured in the same process and round; pieces interact
(switching the point off also shrinks what is buffered and encoded), so the rows do not
add up to the total exactly.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from statistics import median
from typing import Final

from benchmarks._common import PYTHON, REPO, base_parser, fmt_float, markdown_table
from benchmarks._ledger_server import EDITS, PIECES
from benchmarks.bench_service import SERVER_PIN, run_wrk, server_cpu_seconds, unpack_tree

__all__ = ["main", "unpack_first"]

FIRST_RELEASE: Final = "e7e0697"
PATH: Final = "/handlers/3f0c6b1e-9d1a-4c55-8d0b-5b8a3c2e1f00/events"


def unpack_first(rev: str, into: Path) -> Path:
    """``rev``'s tree in ``into``, its ``lunamon`` and ``benchmarks`` packages renamed
    ``lunamon_first`` and ``benchmarks_first`` (imports included)."""
    raw = unpack_tree(rev, into / "raw")
    words = re.compile(r"\b(lunamon|benchmarks)\b")
    for package in ("lunamon", "benchmarks"):
        for source in (raw / package).rglob("*.py"):
            target = into / f"{package}_first" / source.relative_to(raw / package)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(words.sub(r"\1_first", source.read_text()))
    shutil.rmtree(raw)
    return into


def _gc_ns(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/gc", timeout=10) as response:
        return int(json.load(response)["gc_ns"])


def main(argv: Sequence[str] | None = None) -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=2, help="seconds of wrk per load")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--pieces", default=",".join(PIECES), help="the pieces to measure")
    parser.add_argument("--first", default=FIRST_RELEASE, help="the release to compare with")
    parser.add_argument("--raw", action="store_true", help="also print every load's figure")
    parser.add_argument(
        "--today",
        default="",
        help="a checkout (its extension built) to measure instead of this one",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.processes = 1, 1, 1
    pieces = [piece for piece in args.pieces.split(",") if piece]
    variants = ["bare", "prometheus"]
    for tree, kind in (("today", "current"), ("first", "first")):
        variants.append(tree)
        variants += [f"{tree}-{p}" for p in pieces if EDITS[kind][p] is not None]
    us: dict[str, list[float]] = {v: [] for v in variants}
    gc_us: dict[str, list[float]] = {v: [] for v in variants}
    pairs: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="lunamon-ledger-") as tmp:
        first = unpack_first(args.first, Path(tmp))
        script = Path(tmp) / "post.lua"
        script.write_text('wrk.method = "POST"\n')
        procs = [
            subprocess.Popen(
                [
                    *SERVER_PIN,
                    PYTHON,
                    "-m",
                    "benchmarks._ledger_server",
                    "--first",
                    str(first),
                    "--today",
                    args.today,
                    *variants,
                ],
                cwd=REPO,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(args.processes)
        ]
        try:
            ports = [json.loads(proc.stdout.readline() or "null") for proc in procs]  # type: ignore[union-attr]
            if not all(ports):
                raise RuntimeError("a ledger server did not start")
            for port_map in ports:
                for variant in variants:
                    run_wrk(f"http://127.0.0.1:{port_map[variant]}{PATH}", 1, 32, script)
            for round_no in range(args.rounds):
                shift = round_no % len(variants)
                for proc, port_map in zip(procs, ports, strict=True):
                    cpu: dict[str, float] = {}
                    for variant in [*variants[shift:], *variants[:shift]]:
                        url = f"http://127.0.0.1:{port_map[variant]}{PATH}"
                        gc_before = _gc_ns(port_map["control"])
                        before = server_cpu_seconds(proc.pid)
                        _rps, total = run_wrk(url, args.duration, 32, script)
                        used = server_cpu_seconds(proc.pid) - before
                        gc_used = _gc_ns(port_map["control"]) - gc_before
                        cpu[variant] = used / total * 1e6
                        us[variant].append(cpu[variant])
                        gc_us[variant].append(gc_used / total / 1000)
                    for variant in variants:
                        if "-" in variant:
                            whole = variant.split("-")[0]
                            pairs.setdefault(variant, []).append(cpu[whole] - cpu[variant])
                        elif variant != "bare":
                            pairs.setdefault(variant, []).append(cpu[variant] - cpu["bare"])
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(30)
    _report(args, pieces, pairs, us, gc_us)
    if args.raw:
        for variant, values in us.items():
            print(variant, " ".join(f"{value:.1f}" for value in values))


def _report(
    args: object,
    pieces: list[str],
    pairs: dict[str, list[float]],
    us: dict[str, list[float]],
    gc_us: dict[str, list[float]],
) -> None:
    def cell(variant: str) -> str:
        values = pairs.get(variant)
        return fmt_float(median(values), 1) if values else "—"

    rows = [[PIECES[p], cell(f"today-{p}"), cell(f"first-{p}")] for p in pieces]
    rows.append(
        [
            "garbage collection, whole variant (bare aiohttp: "
            f"{fmt_float(median(gc_us['bare']), 2)})",
            fmt_float(median(gc_us["today"]), 2),
            fmt_float(median(gc_us["first"]), 2),
        ]
    )
    rows.append(["**whole middleware over bare aiohttp**", cell("today"), cell("first")])
    rows.append(["prometheus_client middleware over bare aiohttp", cell("prometheus"), ""])
    first = getattr(args, "first", FIRST_RELEASE)
    print("### Cost ledger: server CPU µs per request, whole minus the piece switched off\n")
    print(markdown_table(["piece", "today", f"first release ({first})"], rows))
    print(
        f"\nbare aiohttp: {fmt_float(median(us['bare']), 1)} µs per request."
        f" {getattr(args, 'rounds', 0)} round(s) x {getattr(args, 'processes', 0)} process(es),"
        f" {getattr(args, 'duration', 0)} s of wrk -t1 -c32 per variant each; every variant"
        " in every process; medians of the differences measured in one process and round."
    )


if __name__ == "__main__":
    main()
