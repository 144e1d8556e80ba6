"""Run every benchmark script and write their tables to ``benchmarks/RESULTS.md`` (``make bench``).

Each script runs in its own interpreter, one after the other (they must not
share the two cores), with a time limit. The file starts with the machine,
the versions and the date, then each script's table as it printed it.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from benchmarks._common import REPO, base_parser, python_module

__all__ = ["SCRIPTS", "main"]

SCRIPTS: Final = (
    "bench_service",
    "bench_timed",
    "bench_encode",
    "bench_write",
    "bench_memory",
    "bench_report",
    "bench_clickhouse",
    "bench_client",
    "bench_ledger",
)
TIMEOUT: Final = 420.0  # seconds per script: every loop in them is bounded well below
PACKAGES: Final = (
    "lunamon",
    "aiohttp",
    "wrapt",
    "aioinflux",
    "structlog",
    "influxdb",
    "influxdb-client",
    "opentelemetry-api",
    "opentelemetry-sdk",
    "opentelemetry-instrumentation-aiohttp-server",
    "opentelemetry-instrumentation-aiohttp-client",
    "prometheus-client",
)


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else platform.processor() or "unknown"


def _tool_version(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        return "not installed"
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0].split(" Copyright")[0].strip() if lines else "unknown"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def header(quick: bool) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    versions = ", ".join(f"{p} {_version(p)}" for p in PACKAGES)
    lines = [
        "# lunamon benchmark results",
        "",
        "Written by `make bench` (`python -m benchmarks.run_all`); BENCHMARKS.md has the"
        " peers' reference figures and lunamon's targets. Only ratios measured in the"
        " same run compare; absolute figures move from machine to machine.",
        "",
        f"- date: {now}{' (**--quick**: smoke inputs, not figures)' if quick else ''}",
        f"- machine: {os.cpu_count()} CPU(s), {_cpu_model()}, {platform.system()}"
        f" {platform.release()}; load average {load:.2f} at start",
        f"- Python {platform.python_version()} ({platform.python_implementation()})",
        f"- packages: {versions}",
        f"- tools: {_tool_version(['wrk', '-v'])}; {_tool_version(['influxd', 'version'])}",
    ]
    return "\n".join(lines)


def run_script(name: str, quick: bool) -> tuple[str, bool]:
    """A script's Markdown output (or its failure), and whether it succeeded."""
    start = time.monotonic()
    try:
        done = python_module(f"benchmarks.{name}", *(["--quick"] if quick else []), timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"### {name}\n\n**failed**: no result within {TIMEOUT:.0f} s", False
    took = time.monotonic() - start
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        return f"### {name}\n\n**failed** (exit {done.returncode}):\n\n```\n{tail}\n```", False
    return f"{done.stdout.strip()}\n\n_`{name}`: {took:.0f} s_", True


def main(argv: Sequence[str] | None = None) -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--only", help="comma-separated scripts, of: " + ",".join(SCRIPTS))
    parser.add_argument(
        "--output", type=Path, default=REPO / "benchmarks" / "RESULTS.md", help="Markdown file"
    )
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(SCRIPTS)
    unknown = set(names) - set(SCRIPTS)
    if unknown:
        parser.error(f"unknown scripts: {', '.join(sorted(unknown))}")
    start = time.monotonic()
    sections = [header(args.quick)]
    ok = True
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        text, succeeded = run_script(name, args.quick)
        sections.append(text)
        ok = ok and succeeded
    sections.append(f"_Total: {time.monotonic() - start:.0f} s._")
    report = "\n\n".join(sections) + "\n"
    args.output.write_text(report)
    print(report)
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
