"""The benchmark scripts run on tiny inputs and print their tables (no timing assertions).

Each script runs as ``make bench`` runs it, in its own interpreter with
``--quick``. The benchmark-only peers (the ``bench`` extra) may be absent: their
rows then say "skipped", which one test forces by hiding them from the script.
The tools a script runs (``wrk``, ``influxd``) may not: a missing one fails the
test with what to install (``make servers``), never skips it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from servers import missing_binary

from benchmarks._ledger_server import PIECES
from benchmarks.bench_service import FIRST_RELEASE, have_commit

pytestmark = pytest.mark.bench_smoke

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 180.0
# The `bench` extra's packages; HIDE_PEERS runs a script as if none were installed
# (an import of a name mapped to None in sys.modules fails).
PEERS = ("aioinflux", "prometheus_client", "opentelemetry", "influxdb", "influxdb_client")
HIDE_PEERS = (
    "import runpy, sys\n"
    f"for name in {PEERS!r}:\n"
    "    sys.modules[name] = None\n"
    "sys.argv = [sys.argv[1], *sys.argv[2:]]\n"
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
)


def run(argv: list[str]) -> str:
    done = subprocess.run(
        [sys.executable, *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


# The programs a script runs besides Python.
TOOLS = {
    "bench_service": ("wrk",),
    "bench_write": ("influxd",),
    "bench_clickhouse": ("clickhouse-server",),
}


def run_script(script: str, *args: str, hide_peers: bool = False) -> str:
    """``python -m benchmarks.<script> --quick``; fails at once when a tool it runs is missing."""
    for tool in TOOLS.get(script, ()):
        why = missing_binary(tool)
        if why is not None:
            pytest.fail(f"benchmarks.{script} runs {tool}: {why}", pytrace=False)
    runner = ["-c", HIDE_PEERS] if hide_peers else ["-m"]
    return run([*runner, f"benchmarks.{script}", "--quick", *args])


def table(output: str) -> dict[str, list[str]]:
    """The Markdown table's rows by their first cell (header and rule left out)."""
    rows = [line for line in output.splitlines() if line.startswith("| ")]
    assert len(rows) >= 3, f"no table printed:\n{output}"
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]]
    return {row[0]: row[1:] for row in cells}


def row(rows: dict[str, list[str]], start: str) -> list[str]:
    found = [cells for label, cells in rows.items() if label.startswith(start)]
    assert len(found) == 1, f"no single row starting {start!r} in {list(rows)}"
    return found[0]


def figure(cells: list[str]) -> float:
    """The first column's number (a median), which must be there."""
    return float(cells[0].split()[0].replace(",", ""))


def test_service() -> None:
    rows = table(run_script("bench_service"))
    assert figure(row(rows, "bare aiohttp")) > 0
    labels = (
        "**lunamon** middleware, full",
        "**lunamon** middleware with Prometheus",
        "**lunamon** middleware with `spool_dir`",
        "**lunamon** `@monitor_request`",
    )
    for label in labels:
        cells = row(rows, label)
        assert figure(cells) > 0
        assert cells[2]  # a ratio to bare
        assert re.fullmatch(r"\d+\.\d \(\d+\.\d{3}\)", cells[-2]), cells  # the quietest round
        assert cells[-1].startswith("all ("), f"{label}: not every request recorded: {cells}"
    first = row(rows, "lunamon's first release")
    if have_commit(FIRST_RELEASE):  # the A/B row: the first release's own code, served
        assert figure(first) > 0
        assert first[3].startswith("today's middleware / this >= 1.0 ("), first
        assert first[-1].startswith("all (")
    else:
        assert first[0].startswith("skipped: commit"), first


def test_ledger() -> None:
    """Every piece of both trees is switched off by its edit (a stale one fails the run)."""
    rows = table(run_script("bench_ledger"))
    for piece in PIECES.values():
        assert piece in rows, f"no row {piece!r}"
    whole = row(rows, "**whole middleware over bare aiohttp**")
    assert float(whole[0]) > 0
    assert float(whole[1]) > 0
    assert row(rows, "the prepare hook")[1] == "—"  # the first release had none


def test_timed() -> None:
    rows = table(run_script("bench_timed"))
    assert figure(row(rows, "bare `await f()`")) > 0
    assert figure(row(rows, "**lunamon** `@timed` inside a request")) > 0
    assert figure(row(rows, "**lunamon** `@timed` outside a request")) > 0


def test_encode() -> None:
    rows = table(run_script("bench_encode"))
    assert figure(row(rows, "**lunamon** `encode_lines`, points as the recorder")) > 0
    assert figure(row(rows, "**lunamon** `encode_lines`, points built")) > 0
    assert figure(row(rows, "**lunamon** `Point.to_line_protocol()`")) > 0


def test_write() -> None:
    rows = table(run_script("bench_write"))
    assert figure(row(rows, "raw aiohttp POST")) > 0
    assert figure(row(rows, "**lunamon** `InfluxDBSink`")) > 0


def test_clickhouse() -> None:
    rows = table(run_script("bench_clickhouse"))
    assert figure(row(rows, "raw aiohttp POST of pre-encoded")) > 0
    assert figure(row(rows, "raw aiohttp POST of the same bodies pre-compressed")) > 0
    assert row(rows, "**lunamon** `ClickHouseSink()`")[-1] == "to `raw_gzip`"
    assert figure(row(rows, "**lunamon** `ClickHouseSink()`")) > 0
    assert figure(row(rows, "lunamon `ClickHouseSink(gzip=False)` without orjson")) > 0


def test_memory() -> None:
    rows = table(run_script("bench_memory"))
    assert figure(row(rows, "10,000 points buffered for a dead sink")) > 0
    assert row(rows, "… after 20,000 emitted")
    assert any(label.startswith("loop lag") for label in rows)


def test_profile_hotpath() -> None:
    output = run_script("profile_hotpath")
    assert "### lunamon's steps on the request path" in output
    rows = table(output.split("### lunamon's steps")[1])
    assert figure(row(rows, "request id: `new_request_id()`")) >= 0
    assert figure(row(rows, "`RequestRecorder.run()` whole")) > 0


def test_client() -> None:
    rows = table(run_script("bench_client"))
    assert figure(row(rows, "bare `ClientSession`")) > 0
    assert figure(row(rows, "**lunamon** `client_trace_config`, inside")) > 0


@pytest.mark.parametrize("script", ["bench_timed", "bench_encode", "bench_write", "bench_client"])
def test_missing_peers_are_skipped(script: str) -> None:
    output = run_script(script, hide_peers=True)
    rows = table(output)
    assert any("skipped" in " ".join(cells) for cells in rows.values()), output
    assert any(label.startswith("**lunamon**") for label in rows)


def test_service_without_peers() -> None:
    variants = "bare,prometheus,opentelemetry,lunamon_middleware"
    output = run_script("bench_service", "--variants", variants, hide_peers=True)
    rows = table(output)
    assert row(rows, "prometheus_client")[0].startswith("skipped")
    assert row(rows, "OpenTelemetry")[0].startswith("skipped")
    assert figure(row(rows, "**lunamon** middleware")) > 0


def test_run_all_writes_results(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    output = run(
        ["-m", "benchmarks.run_all", "--quick", "--only", "bench_encode", "--output", str(results)]
    )
    text = results.read_text()
    assert text.startswith("# lunamon benchmark results")
    assert "Python 3." in text
    assert "### 3. Encoding" in text
    assert output.strip() == text.strip()
