"""Table 1: throughput of an aiohttp hello world under each instrumentation, loaded by wrk.

Every variant is its own server process (``benchmarks._server``) on a free
127.0.0.1 port, all started up front and warmed up; then each round loads every
variant once with ``wrk -t1 -c32 -d<N>s``, in an order that rotates from round
to round. The ratio is the median of the per-round ratios to the bare server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from benchmarks._common import (
    PYTHON,
    REPO,
    Summary,
    base_parser,
    fmt_int,
    fmt_ratio,
    free_port,
    have,
    markdown_table,
    paired_ratio,
    verdict,
)
from benchmarks._server import REQUIRES, VARIANTS

__all__ = ["PATH", "Server", "main", "run_wrk"]

TITLE: Final = "1. Service throughput with instrumentation (aiohttp hello world, wrk -t1 -c32)"
FIRST_RELEASE: Final = "e7e0697"  # the A/B row's code: lunamon's first release
LABELS: Final = {
    "bare": "bare aiohttp",
    "empty_middleware": "empty pass-through middleware (aiohttp's machinery alone)",
    "minimal_timing": "minimal hand-written timing middleware (perf_counter + list append)",
    "prometheus": "prometheus_client Histogram + Counter middleware",
    "opentelemetry": "OpenTelemetry aiohttp-server + SDK (BatchSpanProcessor, metrics)",
    "lunamon_middleware": "**lunamon** middleware, full seed schema, encoded to a sink",
    "lunamon_metrics": "**lunamon** middleware with Prometheus `/metrics` on (same sink too)",
    "lunamon_spool": "**lunamon** middleware with `spool_dir` on (crash-safe delivery)",
    "lunamon_decorator": "**lunamon** `@monitor_request`, `setup(middleware=False)`",
    "first_release": f"lunamon's first release ({FIRST_RELEASE}), the same middleware (A/B row)",
}
TARGETS: Final = {"lunamon_middleware": 0.80}


def _pins() -> tuple[tuple[str, ...], str]:
    """Servers on CPU 1 and wrk on CPU 0 (taskset) when there are two: a server's CPU per
    request depends on how many requests each turn of its loop finds, which moves when
    the two share a core. ``((), "")`` on one core or without taskset."""
    if (os.cpu_count() or 1) < 2 or shutil.which("taskset") is None:
        return (), ""
    return ("taskset", "-c", "1"), "0"


SERVER_PIN, WRK_CPU = _pins()
PATH: Final = "/handlers/3f0c6b1e-9d1a-4c55-8d0b-5b8a3c2e1f00/events"
ALL_VARIANTS: Final = (*VARIANTS, "first_release")
STARTUP_TIMEOUT: Final = 30.0
STOP_TIMEOUT: Final = 20.0

_RPS = re.compile(r"^Requests/sec:\s+([0-9.]+)", re.MULTILINE)
_TOTAL = re.compile(r"^\s*([0-9]+) requests in", re.MULTILINE)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+([0-9]+)")
_SOCKET_ERRORS = re.compile(r"Socket errors: (.*)")


class BenchmarkError(RuntimeError):
    """A server or wrk did not behave; the figures of this run would be wrong."""


class Server:
    """One variant's server process: started, probed until it answers, stopped by SIGTERM."""

    def __init__(
        self,
        variant: str,
        workdir: Path,
        extra: Sequence[str] = (),
        name: str | None = None,
        launcher: Sequence[str] = (*SERVER_PIN, PYTHON, "-m", "benchmarks._server"),
        cwd: Path = REPO,
    ) -> None:
        self.variant = variant
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}{PATH}"
        self.stats_path = workdir / f"{name or variant}.json"
        self.log_path = workdir / f"{name or variant}.log"
        self.served = 0
        self.extra = list(extra)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [*launcher, "--variant", variant, *self._args()],
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def _args(self) -> list[str]:
        return ["--port", str(self.port), "--stats", str(self.stats_path), *self.extra]

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return ""

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise BenchmarkError(f"{self.variant} server exited:\n{self._log_tail()}")
            try:
                request = urllib.request.Request(self.url, data=b"", method="POST")
                with urllib.request.urlopen(request, timeout=2.0) as response:
                    if response.status == 200:
                        self.served += 1
                        return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise BenchmarkError(f"{self.variant} server not ready:\n{self._log_tail()}")
            time.sleep(0.05)

    def stop(self) -> dict[str, Any]:
        """SIGTERM (the app's cleanup runs and writes its stats), SIGKILL after a timeout."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            stats: dict[str, Any] = json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            stats = {}
        return stats


def run_wrk(
    url: str, duration: int, connections: int, script: Path, cpus: str = WRK_CPU
) -> tuple[float, int]:
    """``wrk`` against ``url`` (on ``cpus`` alone when given, with taskset): (requests per
    second, requests completed)."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "-s", str(script), url]
    if cpus:
        argv = ["taskset", "-c", cpus, *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30, check=False)
    out = done.stdout
    rps, total = _RPS.search(out), _TOTAL.search(out)
    if done.returncode != 0 or rps is None or total is None:
        raise BenchmarkError(f"wrk failed ({done.returncode}):\n{out}\n{done.stderr}")
    bad = _NON_2XX.search(out)
    if bad is not None and int(bad.group(1)):
        raise BenchmarkError(f"{bad.group(1)} responses were not 2xx:\n{out}")
    errors = _SOCKET_ERRORS.search(out)
    if errors is not None and "timeout 0" not in errors.group(1):
        raise BenchmarkError(f"wrk saw socket errors: {errors.group(1)}")
    return float(rps.group(1)), int(total.group(1))


def server_cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    variants: Sequence[str],
    rounds: int,
    duration: int,
    warmup: int,
    connections: int,
    cpu: dict[str, list[float]] | None = None,
    processes: int = 1,
    make_server: Callable[[str, Path, str], Server] | None = None,
) -> tuple[dict[str, list[float]], dict[str, dict[str, Any]], dict[str, int]]:
    """Per variant: the req/s of every round, the server's stats, the requests it served;
    and in ``cpu``, when given, the server's CPU µs per request of every round.

    With ``processes`` > 1 each variant runs in that many server processes, and round
    ``r`` loads process ``r % processes``: one process's luck (its hash seed, where its
    heap and code landed) moves its figures by several per cent, which no number of
    rounds against that same process averages out. ``make_server(variant, workdir, name)``
    starts a variant's process when it is not one of ``benchmarks._server``'s own.
    """
    make = make_server or (lambda variant, workdir, name: Server(variant, workdir, name=name))
    results: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="lunamon-bench-service-") as tmp:
        workdir = Path(tmp)
        script = workdir / "post.lua"
        script.write_text('wrk.method = "POST"\n')
        servers: dict[str, list[Server]] = {}
        try:
            for variant in variants:
                servers[variant] = [
                    make(variant, workdir, f"{variant}-{i}") for i in range(processes)
                ]
            for server in (s for group in servers.values() for s in group):
                server.wait_ready()
                if warmup:
                    server.served += run_wrk(server.url, warmup, connections, script)[1]
            for round_no in range(rounds):
                shift = round_no % len(variants)
                for variant in [*variants[shift:], *variants[:shift]]:
                    server = servers[variant][round_no % processes]
                    before = server_cpu_seconds(server.proc.pid)
                    rps, total = run_wrk(server.url, duration, connections, script)
                    used = server_cpu_seconds(server.proc.pid) - before
                    results[variant].append(rps)
                    if cpu is not None and total:
                        cpu.setdefault(variant, []).append(used / total * 1e6)
                    server.served += total
        finally:
            stopped = {v: [server.stop() for server in group] for v, group in servers.items()}
        stats = {variant: _merged(parts) for variant, parts in stopped.items()}
        served = {v: sum(server.served for server in group) for v, group in servers.items()}
    return results, stats, served


def have_commit(rev: str) -> bool:
    """Whether this clone holds commit ``rev`` (a shallow one may not)."""
    done = subprocess.run(
        ["git", "cat-file", "-e", f"{rev}^{{commit}}"], cwd=REPO, capture_output=True, check=False
    )
    return done.returncode == 0


def unpack_tree(rev: str, into: Path, paths: Sequence[str] = ("lunamon", "benchmarks")) -> Path:
    """``paths`` of commit ``rev`` written into ``into`` (``git archive``: no worktree)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "archive", rev, *paths], cwd=REPO, check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def _merged(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The stats of a variant's processes as one: ``recorded`` summed (absent if any
    process did not say), the rest as the first process reported it."""
    merged = dict(parts[0]) if parts else {}
    if parts and all("recorded" in part for part in parts):
        merged["recorded"] = sum(part["recorded"] for part in parts)
    else:
        merged.pop("recorded", None)
    return merged


def _recorded(stats: dict[str, Any], served: int, in_flight: int) -> str:
    """What the server recorded against what wrk counted as served.

    wrk does not count the requests in flight when its time is up, so up to
    ``in_flight`` more than it counted reached the server.
    """
    recorded = stats.get("recorded")
    if recorded is None or not served:
        return "—"
    if served <= recorded <= served + in_flight:
        return f"all ({fmt_int(recorded)})"
    return f"{recorded / served:.1%} of {fmt_int(served)}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--duration", type=int, default=3, help="seconds of wrk per round")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of wrk before round 1")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--variants", help="comma-separated subset of: " + ",".join(ALL_VARIANTS))
    parser.add_argument(
        "--processes", type=int, default=2, help="server processes per variant, taking turns"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup, args.processes = 1, 1, 0, 1
    wanted = args.variants.split(",") if args.variants else list(ALL_VARIANTS)
    if "bare" not in wanted:
        wanted.insert(0, "bare")
    skipped = {v: m for v in wanted for m in REQUIRES.get(v, ()) if not have(m)}
    if "first_release" in wanted and not have_commit(FIRST_RELEASE):
        skipped["first_release"] = (
            f"commit {FIRST_RELEASE} (a shallow clone: git fetch --unshallow)"
        )
    variants = [v for v in wanted if v not in skipped]

    cpu: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="lunamon-first-release-") as tmp:
        first = unpack_tree(FIRST_RELEASE, Path(tmp)) if "first_release" in variants else None

        def make(variant: str, workdir: Path, name: str) -> Server:
            if variant == "first_release" and first is not None:  # its own lunamon, its server
                return Server("lunamon_middleware", workdir, name=name, cwd=first)
            return Server(variant, workdir, name=name)

        results, stats, served = measure(
            variants,
            args.rounds,
            args.duration,
            args.warmup,
            args.connections,
            cpu,
            args.processes,
            make,
        )
    bare = results["bare"]
    bare_cpu = Summary(cpu["bare"]).median if cpu.get("bare") else 0.0
    # wrk leaves up to `connections` requests uncounted per run (each warm-up included).
    in_flight = args.connections * (args.rounds + (args.processes if args.warmup else 0))
    peer = paired_ratio(results["prometheus"], bare) if "prometheus" in results else None
    rows = []
    for variant in wanted:
        if variant in skipped:
            rows.append([LABELS[variant], f"skipped: {skipped[variant]} not installed"] + [""] * 7)
            continue
        summary = Summary(results[variant])
        ratio = paired_ratio(results[variant], bare)
        target = TARGETS.get(variant)
        goal = f">= {target:.2f}: {verdict(ratio >= target)}" if target else ""
        if variant == "lunamon_middleware" and target and peer is not None:
            # BENCHMARKS.md: at least the target and prometheus_client's middleware's ratio.
            met = ratio >= target and ratio >= peer
            goal = f">= {target:.2f} and >= prometheus_client ({fmt_ratio(peer)}): {verdict(met)}"
        if variant == "lunamon_decorator" and "lunamon_middleware" in results:
            middleware = paired_ratio(results["lunamon_middleware"], bare)
            goal = f">= the middleware ({fmt_ratio(middleware)}): {verdict(ratio >= middleware)}"
        if variant == "first_release" and "lunamon_middleware" in results:
            # BENCHMARKS.md: today's middleware at least as fast as the first release's.
            today = paired_ratio(results["lunamon_middleware"], results[variant])
            goal = f"today's middleware / this >= 1.0 ({fmt_ratio(today)}): {verdict(today >= 1.0)}"
        if variant == "lunamon_metrics" and "lunamon_middleware" in results:
            # BENCHMARKS.md section 6: metrics on cost <= 0.02 of bare over metrics off,
            # and still above prometheus_client's middleware.
            cost = paired_ratio(results["lunamon_middleware"], bare) - ratio
            met = cost <= 0.02 and (peer is None or ratio > peer)
            goal = f"<= 0.02 over off ({cost:+.3f}) and > prometheus_client: {verdict(met)}"
        if variant == "lunamon_spool" and "lunamon_middleware" in results:
            # Issue 19: spool_dir on costs <= 0.02 of bare over off.
            cost = paired_ratio(results["lunamon_middleware"], bare) - ratio
            goal = f"<= 0.02 over off ({cost:+.3f}): {verdict(cost <= 0.02)}"
        rows.append(
            [
                LABELS[variant],
                fmt_int(summary.median),
                f"{fmt_int(summary.min)} / {fmt_int(summary.max)}",
                fmt_ratio(ratio),
                goal,
                _cpu_cell(cpu.get(variant), bare_cpu),
                _best_cpu_cell(cpu.get(variant), cpu.get("bare")),
                _recorded(stats.get(variant, {}), served[variant], in_flight),
            ]
        )
    print(f"### {TITLE}\n")
    print(
        markdown_table(
            [
                "variant",
                "req/s (median)",
                "min / max",
                "ratio to bare",
                "target",
                "server CPU µs/request (over bare)",
                "quietest round: CPU µs/request (bare's / this)",
                "recorded",
            ],
            rows,
        )
    )
    print(
        f"\n{args.rounds} round(s) of {args.duration} s per variant, variants alternating,"
        f" {args.processes} server process(es) per variant taking turns;"
        " ratio = median of per-round ratios to bare. `POST /handlers/{handlerId}/events`"
        " answering `Hello, World!`; the lunamon variants generate a request id, tag"
        " service/route/status_code/handler_id, emit the point, and their sink encodes"
        " every batch to line protocol. `recorded` = the points (spans, requests counted)"
        " the server reported at shutdown, against the requests wrk counted. Server CPU ="
        " the server process's user + system time per request served (median of the"
        " rounds), which a busy machine disturbs far less than req/s. The quietest round"
        " is each variant's lowest CPU per request (noise only adds to it); bare's over a"
        " variant's is the throughput ratio a server saturating its core would show on a"
        " quiet machine."
    )


def _best_cpu_cell(values: list[float] | None, bare: list[float] | None) -> str:
    if not values or not bare:
        return "—"
    return f"{min(values):.1f} ({min(bare) / min(values):.3f})"


def _cpu_cell(values: list[float] | None, bare: float) -> str:
    if not values:
        return "—"
    median = Summary(values).median
    return f"{median:.1f} (+{median - bare:.1f})"


if __name__ == "__main__":
    main()
