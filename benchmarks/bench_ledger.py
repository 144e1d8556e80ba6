"""The cost ledger: server CPU µs per request of each piece of lunamon's request path,
today and in the first release (e7e0697), each measured by switching that one piece off.

``python -m benchmarks.bench_ledger [--wrk] [--rounds N] [--processes P] [--first REV]`` unpacks
the first release (``git archive``, its packages renamed so that it imports beside this
one), then starts P server processes (``benchmarks._ledger_server``), each serving every
variant on its own port: bare aiohttp, prometheus_client's middleware, and for each tree
lunamon's hello-world middleware whole and once per piece switched off. By default every
app serves mocked requests in its process, in turn, many short batches, each variant's
figure its best batch (noise only adds). With ``--wrk`` each round loads, in every
process, each pair (whole, piece off) and (bare, X) with wrk in four windows in a row,
A B B A, reading the process's CPU time around each. A piece's cost is the median,
over rounds and processes, of whole minus piece off; pieces interact (switching the point
off also shrinks what is buffered and encoded), so the rows do not add up to the total
exactly.
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
from typing import Any, Final

from benchmarks._common import PYTHON, REPO, base_parser, fmt_float, markdown_table
from benchmarks._ledger_server import EDITS, PIECES, PYTHON_RUN
from benchmarks.bench_service import SERVER_PIN, run_wrk, server_cpu_seconds, unpack_tree

__all__ = ["main", "unpack_first"]

FIRST_RELEASE: Final = "e7e0697"
TODAY_PYTHON: Final = f"today-{PYTHON_RUN}"
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
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=int, default=2, help="seconds of wrk per load")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--pieces", default=",".join(PIECES), help="the pieces to measure")
    parser.add_argument("--first", default=FIRST_RELEASE, help="the release to compare with")
    parser.add_argument("--raw", action="store_true", help="also print every load's figure")
    parser.add_argument(
        "--wrk",
        dest="in_process",
        action="store_false",
        help="load the servers with wrk (pairs A B B A) instead of serving mocked requests"
        " in process (aiohttp's _handle, prepare, write_eof; the best of many batches)",
    )
    parser.add_argument("--requests", type=int, default=4000, help="per in-process batch")
    parser.add_argument(
        "--today",
        default="",
        help="a checkout (its extension built) to measure instead of this one",
    )
    args = parser.parse_args(argv)
    if args.quick:  # in process, a few requests: a smoke run of every variant and piece
        args.rounds, args.processes, args.in_process, args.requests = 1, 1, True, 100
    pieces = [piece for piece in args.pieces.split(",") if piece]
    variants = ["bare", "prometheus"]
    for tree, kind in (("today", "current"), ("first", "first")):  # a whole, then its pieces
        variants.append(tree)
        if tree == "today":
            variants.append(TODAY_PYTHON)
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
            for port_map in ports if not args.in_process else ():
                for variant in variants:
                    run_wrk(f"http://127.0.0.1:{port_map[variant]}{PATH}", 1, 32, script)
            if args.in_process:
                _in_process(args, procs, ports, variants, us, pairs)
                duos = []
            else:
                duos = [("bare", "prometheus"), ("bare", "today"), ("bare", "first")]
                duos.append(("bare", TODAY_PYTHON))
                duos += [(_whole_of(v), v) for v in variants if "-" in v and v != TODAY_PYTHON]
            # (reference, other): each pair is loaded A B B A (B A A B the next round) in one
            # process, four windows in a row, so that the machine's drift over the run
            # (several per cent from one minute to the next here) cancels within the pair.
            for round_no in range(args.rounds if duos else 0):
                shift = round_no % len(duos)
                for proc, port_map in zip(procs, ports, strict=True):

                    def load(
                        variant: str,
                        proc: subprocess.Popen[str] = proc,
                        port_map: dict[str, int] = port_map,
                    ) -> float:
                        url = f"http://127.0.0.1:{port_map[variant]}{PATH}"
                        gc_before = _gc_ns(port_map["control"])
                        before = server_cpu_seconds(proc.pid)
                        _rps, total = run_wrk(url, args.duration, 32, script)
                        used = server_cpu_seconds(proc.pid) - before
                        gc_us[variant].append(
                            (_gc_ns(port_map["control"]) - gc_before) / total / 1000
                        )
                        us[variant].append(used / total * 1e6)
                        return us[variant][-1]

                    for first_one, other in [*duos[shift:], *duos[:shift]]:
                        order = [first_one, other] if round_no % 2 == 0 else [other, first_one]
                        seen = dict.fromkeys(order, 0.0)
                        for variant in [*order, *reversed(order)]:
                            seen[variant] += load(variant) / 2
                        if first_one == "bare":  # the whole over bare aiohttp
                            pairs.setdefault(other, []).append(seen[other] - seen["bare"])
                        else:  # the whole minus the piece switched off
                            pairs.setdefault(other, []).append(seen[first_one] - seen[other])
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(30)
    _report(args, pieces, pairs, us, gc_us)
    if args.raw:
        for variant, values in us.items():
            print(variant, " ".join(f"{value:.1f}" for value in values))


def _whole_of(variant: str) -> str:
    """The variant a piece is switched off from: today's pieces are edits of the Python run
    (the compiled runner has no source to edit), the first release's of its whole."""
    tree = variant.split("-")[0]
    return TODAY_PYTHON if tree == "today" else tree


def _in_process(
    args: Any,
    procs: list[subprocess.Popen[str]],
    ports: list[dict[str, int]],
    variants: list[str],
    us: dict[str, list[float]],
    pairs: dict[str, list[float]],
) -> None:
    """Every variant's app serving mocked requests in its process (no socket, no wrk), in
    turn, many short times: a variant's figure is its quietest batch (noise only adds),
    and a piece's cost the difference of two such figures of one process."""
    best: list[dict[str, float]] = [{} for _ in procs]
    for round_no in range(args.rounds * 8):
        shift = round_no % len(variants)
        for process, port_map in enumerate(ports):
            for variant in [*variants[shift:], *variants[:shift]]:
                url = f"http://127.0.0.1:{port_map['control']}/drive/{variant}/{args.requests}"
                with urllib.request.urlopen(url, timeout=120) as response:
                    ns = float(json.load(response)["ns"])
                us[variant].append(ns / 1000)
                best[process][variant] = min(best[process].get(variant, ns), ns)
    for figures in best:
        for variant in variants:
            if "-" in variant and variant != TODAY_PYTHON:
                whole = _whole_of(variant)
                pairs.setdefault(variant, []).append((figures[whole] - figures[variant]) / 1000)
            elif variant != "bare":
                pairs.setdefault(variant, []).append((figures[variant] - figures["bare"]) / 1000)


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
    if gc_us["bare"]:
        rows.append(
            [
                "garbage collection, whole variant (bare aiohttp: "
                f"{fmt_float(median(gc_us['bare']), 2)})",
                fmt_float(median(gc_us["today"]), 2),
                fmt_float(median(gc_us["first"]), 2),
            ]
        )
    rows.append(["**whole middleware over bare aiohttp**", cell("today"), cell("first")])
    rows.append(
        [
            "whole, run in Python (the compiled runner off; the pieces' whole)",
            cell(TODAY_PYTHON),
            "",
        ]
    )
    rows.append(["prometheus_client middleware over bare aiohttp", cell("prometheus"), ""])
    first = getattr(args, "first", FIRST_RELEASE)
    where = "in process (mocked requests)" if getattr(args, "in_process", False) else "server"
    print(f"### Cost ledger: {where} CPU µs per request, whole minus the piece switched off\n")
    print(markdown_table(["piece", "today", f"first release ({first})"], rows))
    print(
        f"\nbare aiohttp: {fmt_float(min(us['bare']), 1)} µs per request at best."
        f" {getattr(args, 'processes', 0)} process(es), each serving every variant; "
        + (
            f"{getattr(args, 'rounds', 0) * 8} batches of {getattr(args, 'requests', 0)}"
            " mocked requests per variant and process, variants in turn; per process the best"
            " batch of each variant; medians over processes of the differences."
            if getattr(args, "in_process", False)
            else f"{getattr(args, 'rounds', 0)} round(s), each pair loaded A B B A with"
            f" {getattr(args, 'duration', 0)} s of wrk -t1 -c32 each; medians of the differences."
        )
    )


if __name__ == "__main__":
    main()
