"""``benchmarks.bench_report`` on tiny files: its table is printed and every row has a
figure (no timing assertions), as the other benchmarks' smoke tests."""

from __future__ import annotations

import pytest
from servers import missing_binary
from test_benchmarks_smoke import figure, row, run_script, table

pytestmark = pytest.mark.bench_smoke


def test_report_bench() -> None:
    why = missing_binary("influxd")
    if why is not None:  # it runs the send rows into a private influxd
        pytest.fail(f"benchmarks.bench_report runs influxd: {why}", pytrace=False)
    output = run_script("bench_report")
    rows = table(output)
    for label in (
        "parser alone",
        "**lunamon** `report FILE`",
        "raw POST",
        "**lunamon** `send FILE --influx`",
    ):
        cells = row(rows, label)  # the last of its sizes
        assert cells[0] == "8,000"
        assert figure(cells[1:]) > 0  # the seconds
    assert "Peak RSS from 2,000 to 8,000 lines" in output
