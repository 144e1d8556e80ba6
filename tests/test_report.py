"""``lunamon report``: the numbers, bad input, InfluxDB as the source, and the HTML page."""

from __future__ import annotations

import asyncio
import io
import json
import math
import random
import re
import shutil
import statistics
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from collections import Counter
from pathlib import Path

import pytest
from servers import FakeInfluxServer, FakeResponse, InfluxServer, free_port

from lunamon.cli import main
from lunamon.cli.report import ReportInputError, build_report, percentile, report_file
from lunamon.point import Point, encode_lines

ROUTES = {
    "POST:/detector": ("download_images_time", "save_warps_time"),
    "POST:/extractor": ("load_face_samples_time",),
    "POST:/handlers/{handlerId}/events": ("match_policy_time", "face_storage_policy_time"),
}
COUNTS = {"POST:/detector": 97, "POST:/extractor": 1, "POST:/handlers/{handlerId}/events": 250}
# route -> [(status, error_code)] of its failed requests, one per listed entry
FAILURES = {
    "POST:/detector": [(400, 12012)] * 5 + [(500, 1)] * 2,
    "POST:/handlers/{handlerId}/events": [(500, 10015)] * 3 + [(499, 0)],
}


def known_points(start_ns: int | None = None) -> list[Point]:
    """A fixed set of points: irregular execution times, sub-steps, errors."""
    points = []
    t = start_ns if start_ns is not None else 1_700_000_000_000_000_000
    for index, (route, steps) in enumerate(ROUTES.items()):
        failures = list(FAILURES.get(route, []))
        for k in range(COUNTS[route]):
            t += 1_000_000
            execution = ((k * 37 + 11) % 101 + 1) * 0.000731 * (index + 1) + 0.0000123
            fields: dict[str, object] = {"request_id": f"r{index}-{k}", "execution_time": execution}
            for s, step in enumerate(steps):
                if (k + s) % 4 != 3:  # a step does not run in every request
                    fields[step] = execution * (0.2 + 0.1 * s)
            status, code = failures.pop() if failures else (201, None)
            tags = {"service": "luna-handlers", "route": route, "status_code": str(status)}
            points.append(Point("request", t, tags, fields))
            if code is not None:
                error_tags = {**tags, "error_code": str(code)}
                points.append(Point("error", t, error_tags, {"request_id": fields["request_id"]}))
    points.append(Point("cpu", t, {"host": "a"}, {"usage": 1.0}))  # other series are ignored
    return points


@pytest.fixture
def known_file(tmp_path: Path) -> Path:
    path = tmp_path / "known.lp"
    path.write_bytes(encode_lines(known_points()))
    return path


def expected_quantiles(route: str) -> dict[str, float]:
    values = [
        float(p.fields["execution_time"])
        for p in known_points()
        if p.series == "request" and p.tags["route"] == route
    ]
    if len(values) == 1:
        return dict.fromkeys(("p50", "p95", "p99"), values[0])
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": cuts[49], "p95": cuts[94], "p99": cuts[98]}


def test_percentile_matches_statistics_quantiles() -> None:
    values = sorted([0.5, 0.1, 0.9, 0.3, 0.7, 0.2])
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    for q in range(1, 100):
        assert percentile(values, q) == pytest.approx(cuts[q - 1], rel=1e-12)
    assert percentile([4.0], 99) == 4.0


def _row(out: str, route: str) -> list[str]:
    for line in out.splitlines():
        cells = line.split()
        if cells and cells[0] == route and len(cells) == 8:
            return cells
    raise AssertionError(f"no row for {route} in:\n{out}")


def test_report_prints_the_right_percentiles(
    known_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(known_file)]) == 0
    out = capsys.readouterr().out
    for route in ROUTES:
        _, requests, errors, rate, p50, p95, p99, _ = _row(out, route)
        expected = expected_quantiles(route)
        assert int(requests) == COUNTS[route]
        assert int(errors) == len(FAILURES.get(route, []))
        assert rate == f"{len(FAILURES.get(route, [])) / COUNTS[route] * 100:.1f}%"
        for name, shown in (("p50", p50), ("p95", p95), ("p99", p99)):
            assert abs(float(shown) - expected[name] * 1000) <= 0.005 + 1e-9, (route, name)


def test_report_json_has_exact_numbers(
    known_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(known_file), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["requests"] == sum(COUNTS.values())
    assert data["errors"] == sum(len(f) for f in FAILURES.values())
    routes = {r["route"]: r for r in data["routes"]}
    assert set(routes) == set(ROUTES)
    points = known_points()
    for route, steps in ROUTES.items():
        expected = expected_quantiles(route)
        for name in ("p50", "p95", "p99"):
            assert routes[route][name] == pytest.approx(expected[name], rel=1e-12)
        requests = [p for p in points if p.series == "request" and p.tags["route"] == route]
        total = math.fsum(float(p.fields["execution_time"]) for p in requests)
        shares = {s["name"]: s for s in routes[route]["steps"]}
        assert set(shares) == set(steps)
        for step in steps:
            ran = [float(p.fields[step]) for p in requests if step in p.fields]
            assert shares[step]["requests"] == len(ran)
            assert shares[step]["share"] == pytest.approx(math.fsum(ran) / total, rel=1e-9)
            assert shares[step]["mean"] == pytest.approx(math.fsum(ran) / len(requests), rel=1e-9)
    groups = Counter((code, status) for failures in FAILURES.values() for status, code in failures)
    assert {(g["error_code"], g["status"]): g["count"] for g in data["error_groups"]} == groups


def test_report_errors_table(known_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(known_file)]) == 0
    out = capsys.readouterr().out
    rows = {}
    for line in out.split("Errors by error_code and status")[1].splitlines():
        cells = line.split()
        if len(cells) >= 4 and cells[0].isdigit():
            rows[(int(cells[0]), int(cells[1]))] = int(cells[2])
    assert rows == {(12012, 400): 5, (1, 500): 2, (10015, 500): 3, (0, 499): 1}


def test_report_service_filter(known_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(known_file), "--service", "other"]) == 2
    err = capsys.readouterr().err
    assert "no 'request' points of service 'other'" in err


GOOD = encode_lines(known_points()[:20]).decode()
LAST = GOOD.splitlines()[-1]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(
            GOOD + LAST[: LAST.index("execution_time") + 9] + "\n", "line 21", id="cut-in-field"
        ),
        pytest.param(GOOD + LAST[:30], "line 21", id="cut-in-tags"),
        pytest.param(GOOD + LAST[: LAST.index('request_id="') + 15], "line 21", id="cut-in-string"),
        pytest.param(GOOD + LAST[:-6], "truncated", id="cut-in-timestamp"),
        pytest.param(
            GOOD + 'request,route=POST:/detector,status_code=200 execution_time="fast" 1\n',
            "field execution_time is a string, expected a float",
            id="string-time",
        ),
        pytest.param(
            GOOD + "request,route=POST:/detector,status_code=200 execution_time=3i 1\n",
            "field execution_time is an integer, expected a float",
            id="integer-time",
        ),
        pytest.param(
            GOOD + "request,route=POST:/x,status_code=200 execution_time=0.1,save_warps_time=t 1\n",
            "field save_warps_time is a boolean",
            id="boolean-step",
        ),
        pytest.param(
            GOOD + "request,route=POST:/detector,status_code=abc execution_time=0.1 1\n",
            "tag status_code='abc' is not an integer",
            id="status-not-int",
        ),
        pytest.param(
            GOOD + "request,status_code=200 execution_time=0.1 1\n",
            "without tag 'route'",
            id="no-route",
        ),
        pytest.param(
            GOOD + 'request,route=POST:/x,status_code=200 request_id="a" 1\n',
            "without field 'execution_time'",
            id="no-execution-time",
        ),
        pytest.param(
            GOOD + 'error,route=POST:/x,status_code=500,error_code=oops request_id="a" 1\n',
            "tag error_code='oops' is not an integer",
            id="error-code-not-int",
        ),
        pytest.param("", "the file is empty", id="empty"),
        pytest.param("\n\n# only a comment\n", "no points in the file", id="blank"),
        pytest.param("cpu,host=a usage=1 1\n", "no 'request' points", id="no-request-series"),
        pytest.param(b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "not UTF-8", id="binary"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    tmp_path: Path, content: str | bytes, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.lp"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    assert main(["report", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith(f"lunamon report: error: {path}: ")
    assert message in captured.err
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_missing_file_or_directory(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "nothing.lp"
    if kind == "directory":
        path.mkdir()
    assert main(["report", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert ("no such file" if kind == "missing" else "is a directory") in err


def test_bad_input_in_a_subprocess_has_no_traceback(tmp_path: Path) -> None:
    path = tmp_path / "cut.lp"
    path.write_text(GOOD + LAST[:40])
    done = subprocess.run(
        [sys.executable, "-m", "lunamon", "report", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("lunamon report: error:")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give either a line-protocol FILE or --influx URL"),
        (["x.lp", "--influx", "http://127.0.0.1:1/db"], "give either"),
        (["x.lp", "--since", "1h"], "--database and --since go with --influx"),
        (["--influx", "http://127.0.0.1:1/db", "--since", "yesterday"], "--since"),
        (["--influx", "http://127.0.0.1:1"], "no database"),
    ],
)
def test_usage_errors(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert message in err


def test_missing_extra_is_one_line(
    known_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "plotly", None)  # import plotly -> ImportError
    assert main(["report", str(known_file), "--html", str(tmp_path / "r.html")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "pip install 'lunamon[report]'" in err


def test_report_from_influxdb_equals_report_from_file(
    influxd: InfluxServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = "lunamon_cli_report"
    points = known_points(start_ns=time.time_ns() - 60 * 10**9)
    path = tmp_path / "recent.lp"
    path.write_bytes(encode_lines(points))
    influxd.create_database(db)
    status, body = influxd.write(path.read_bytes(), db)
    assert status == 204, body
    assert main(["report", str(path), "--json"]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert (
        main(["report", "--influx", influxd.url, "--database", db, "--since", "1h", "--json"]) == 0
    )
    from_influx = json.loads(capsys.readouterr().out)
    for data in (from_file, from_influx):
        del data["source"]
    assert from_influx["requests"] == sum(COUNTS.values())
    assert _same(from_influx, from_file)


def test_report_from_an_unreachable_influxdb(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}/db"
    assert main(["report", "--influx", url]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"lunamon report: error: cannot reach InfluxDB at {url[:-3]}: ")


async def test_report_refused_by_influxdb_tells_why_without_the_password(
    fake_influx: FakeInfluxServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """The server's reason and explanation, as the sinks tell theirs; no credential."""
    fake_influx.program(FakeResponse(401, '{"error":"authorization failed"}'))
    url = fake_influx.url.replace("://", "://reader:s3cret-pass@") + "/db"
    # main() runs its own event loop: off this one.
    assert await asyncio.to_thread(main, ["report", "--influx", url]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "HTTP 401 unauthorized" in err
    assert "authorization failed" in err
    assert "s3cret-pass" not in err
    (request,) = fake_influx.requests
    assert request.path == "/query"
    assert request.headers["Authorization"].startswith("Basic ")


def _same(a: object, b: object) -> bool:
    """Equal, floats to 1e-12 relative (InfluxDB's JSON round-trips float64 exactly)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-12)  # type: ignore[arg-type]
    return a == b


# --------------------------------------------------------------------------- HTML


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _png_size_and_colours(data: bytes) -> tuple[int, int, int]:
    """(width, height, distinct byte values of the pixel stream) of a PNG, stdlib only."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    idat = b""
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    return width, height, len(set(zlib.decompress(idat)))


def _section(dom: str, div_id: str, next_id: str | None) -> str:
    start = dom.index(f'id="{div_id}"')
    end = dom.index(f'id="{next_id}"') if next_id else len(dom)
    return dom[start:end]


def test_html_report_renders_in_headless_chromium(
    known_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    browser = _chromium()
    # `make test` installs Debian's chromium: its absence is a broken setup, not a skip.
    assert browser is not None, "chromium is not installed (Debian: apt-get install chromium)"
    page = tmp_path / "report.html"
    assert main(["report", str(known_file), "--html", str(page)]) == 0
    assert f"HTML report with charts: {page}" in capsys.readouterr().out
    html = page.read_text()
    assert "cdn" not in re.sub(r"<script\b.*?</script>", "", html, flags=re.S).lower()
    screenshot = tmp_path / "report.png"
    done = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1280,1800",
            f"--screenshot={screenshot}",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    # The DOM after plotly.js ran, without the scripts (plotly.js's source names its classes).
    dom = re.sub(r"<script\b.*?</script>", "", done.stdout, flags=re.S)
    charts = {
        "chart-latency": ("trace boxes", 3),
        "chart-steps": ("trace bars", 5),  # the 5 distinct sub-steps of the known routes
        "chart-errors": ("trace bars", 4),  # 4 error_code (status) groups
    }
    ids = list(charts)
    for index, (div_id, (trace_class, traces)) in enumerate(charts.items()):
        section = _section(dom, div_id, ids[index + 1] if index + 1 < len(ids) else None)
        assert '<svg class="main-svg"' in section, f"{div_id} did not render"
        assert section.count(f'class="{trace_class}"') >= traces, div_id
        # Drawn marks: box/bar shapes are <path> elements with a non-empty outline.
        marks = re.findall(r'<path[^>]*\bd="M[^"]+"', section)
        assert len(marks) >= traces, div_id
    width, height, colours = _png_size_and_colours(screenshot.read_bytes())
    assert (width, height) == (1280, 1800)
    assert colours > 32  # not a blank page


def test_build_report_rejects_nothing_to_report() -> None:
    from lunamon.cli.report import ReportInputError

    with pytest.raises(ReportInputError, match="no 'request' points"):
        build_report([], source="nothing")


# --------------------------------------------------------------------------- streaming


def _by_old_rules(points: list[Point], source: str, service: str | None = None) -> dict:  # type: ignore[type-arg]
    """The report of every point at once through ``add`` (the path of InfluxDB and
    ClickHouse sources), as plain data."""
    return build_report(points, source=source, service=service).to_dict()


@pytest.mark.parametrize("service", [None, "luna-handlers"])
def test_file_report_equals_the_report_of_the_points(known_file: Path, service: str | None) -> None:
    """The fast path of the file adds up to exactly what ``add`` makes of the same points."""
    from lunamon.lineprotocol import parse_line_protocol

    points = parse_line_protocol(known_file.read_text())
    streamed = report_file(known_file, service=service).to_dict()
    assert streamed == _by_old_rules(points, str(known_file), service)


def test_many_requests_exact_percentiles_and_counts(tmp_path: Path) -> None:
    """10,001 distinct times in a shuffled order: the percentiles are the exact ones, not a
    bucket's; every line is counted once; the timeline holds every request."""
    rng = random.Random(7)
    times = [round(0.001 + k * 0.0000137, 9) for k in range(10_001)]
    rng.shuffle(times)
    points = []
    for k, execution in enumerate(times):
        tags = {"service": "s", "route": "GET:/a", "status_code": "200"}
        fields: dict[str, object] = {"request_id": f"id-{k}", "execution_time": execution}
        if k % 3:
            fields["step_time"] = execution / 2
        points.append(Point("request", 10**18 + k, tags, fields))
        if k % 10 == 0:
            points.append(Point("error", 10**18 + k, {**tags, "error_code": "5"}, {"n": 1.0}))
    path = tmp_path / "many.lp"
    path.write_bytes(encode_lines(points))
    report = report_file(path)
    (route,) = report.routes
    cuts = statistics.quantiles(times, n=100, method="inclusive")
    assert (route.p25, route.p50, route.p75, route.p95, route.p99) == (
        cuts[24],
        cuts[49],
        cuts[74],
        cuts[94],
        cuts[98],
    )
    assert (route.minimum, route.maximum) == (min(times), max(times))
    assert route.requests == report.requests == 10_001
    assert route.errors == report.errors == 1_001
    (step,) = route.steps
    assert step.requests == sum(1 for k in range(10_001) if k % 3)
    assert sum(report.timeline.requests.values()) == 10_001
    assert {label: sum(t.values()) for label, t in report.timeline.errors.items()} == {
        "5 (200)": 1_001
    }


def test_a_negative_time_on_the_fast_path_names_its_line(tmp_path: Path) -> None:
    bad = (
        'request,service=luna-handlers,route=POST:/detector,status_code=201 request_id="neg-1",'
        "execution_time=0.002,save_warps_time=-0.001 1700000000999000000\n"
    )
    path = tmp_path / "neg.lp"
    path.write_text(GOOD + bad + GOOD)
    with pytest.raises(ReportInputError) as caught:
        report_file(path)
    assert "field save_warps_time=-0.001 is negative" in str(caught.value)
    assert 'request_id="neg-1"' in str(caught.value)


def test_bad_tags_on_the_fast_path_name_the_first_such_line(tmp_path: Path) -> None:
    bad = (
        'request,service=luna-handlers,route=POST:/x,status_code=2xx request_id="first",'
        "execution_time=0.002 1700000000999000000\n"
    )
    path = tmp_path / "tags.lp"
    path.write_text(GOOD + bad + bad.replace("first", "second"))
    with pytest.raises(ReportInputError) as caught:
        report_file(path)
    assert "tag status_code='2xx' is not an integer" in str(caught.value)
    assert 'request_id="first"' in str(caught.value)


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_goes_to_a_terminal_stderr_never_to_stdout(
    known_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(known_file)]) == 0
    plain = capsys.readouterr().out
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["report", str(known_file)]) == 0
    assert capsys.readouterr().out == plain  # the same report, nothing of the bar
    assert "reading" in terminal.getvalue()  # the bar was drawn, on stderr
    terminal.truncate(0)
    assert main(["report", str(known_file), "--no-progress"]) == 0
    assert terminal.getvalue() == ""


def test_a_big_report_is_summed_up_in_bounded_memory() -> None:
    """200,000 request lines through the reader and the builder: the builder keeps 16 bytes
    a request (execution time and timestamp), nothing of the points."""
    from test_lineprotocol import Generated

    from lunamon.cli.report import ReportBuilder
    from lunamon.lineprotocol import LineReader

    builder = ReportBuilder(source="generated")
    tracemalloc.start()
    try:
        builder.add_records(LineReader(Generated(200_000)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    report = builder.build()
    assert report.requests == 200_000
    assert sum(r.requests for r in report.routes) == 200_000
    assert peak < 12 * 2**20, f"peak {peak / 2**20:.1f} MB"


@pytest.mark.parametrize("count", [1, 2, 1000, 65_536, 65_537, 200_003])
def test_ranked_values_are_sorted_values(count: int) -> None:
    """The report's percentiles come from sorted runs and a search by rank: every rank the
    report reads holds the value ``sorted()`` holds there (duplicates and zeros too)."""
    from array import array

    from lunamon.cli.report import _Ranked

    rng = random.Random(count)
    values = [
        rng.choice([0.0, 1e-9, 0.5, 3.0]) if k % 7 == 0 else rng.random() for k in range(count)
    ]
    ranked = _Ranked(array("d", values))
    ordered = sorted(values)
    assert len(ranked) == count
    ranks = {0, count - 1, count // 2, count // 3, rng.randrange(count), rng.randrange(count)}
    for q in (25, 50, 75, 95, 99):
        position = (count - 1) * q / 100.0
        ranks |= {math.floor(position), min(math.floor(position) + 1, count - 1)}
    for rank in sorted(ranks):
        assert ranked[rank] == ordered[rank], rank
        assert ranked[rank - count] == ordered[rank]
    for q in (25, 50, 75, 95, 99):
        assert percentile(ranked, q) == percentile(ordered, q)
    assert math.fsum(ranked) == math.fsum(ordered)
    with pytest.raises(IndexError):
        ranked[count]


def test_ranked_keeps_a_negative_zero_where_sorted_puts_it() -> None:
    from array import array

    from lunamon.cli.report import _Ranked

    values = [0.5] * 70_000 + [0.0, -0.0, 0.0] + [0.25] * 70_000
    ranked = _Ranked(array("d", values))
    ordered = sorted(values)
    for rank in (0, 1, 2, 3, 70_001, len(values) - 1):
        assert repr(ranked[rank]) == repr(ordered[rank])


@pytest.mark.parametrize("span_s", [0.5, 3.7, 100, 3_000, 5 * 86_400, 90 * 86_400])
def test_timeline_buckets_equal_the_bucketing_of_every_time(span_s: float) -> None:
    """60,000 requests (and errors) in a random order over ``span_s``: the chart's buckets
    from the timeline are those of every time bucketed one by one; the slots stay few."""
    from lunamon.cli.report import ReportBuilder, timeline_width

    rng = random.Random(int(span_s))
    start = 1_700_000_000 * 10**9 + rng.randrange(10**9)
    times = [start + rng.randrange(int(span_s * 1e9)) for _ in range(60_000)]
    builder = ReportBuilder(source="timeline")
    tags = {"route": "GET:/t", "status_code": "500"}
    for k, t in enumerate(times):
        builder.add(Point("request", t, tags, {"execution_time": 0.001}))
        if k % 3 == 0:
            builder.add(Point("error", t, {**tags, "error_code": "9"}, {"n": 1.0}))
    report = builder.build()
    assert (report.start_ns, report.end_ns) == (min(times), max(times))
    width = timeline_width(max(times) - min(times))
    timeline = report.timeline
    assert timeline.per(width, timeline.requests) == Counter(t // width for t in times)
    assert timeline.per(width, timeline.errors["9 (500)"]) == Counter(
        t // width for t in times[::3]
    )
    days = span_s / 86_400
    assert len(timeline.requests) <= max(100, 2 * days)


# --------------------------------------------------------------------------- slowest


def _expected_slowest(route: str, count: int) -> list[tuple[str, float]]:
    requests = [p for p in known_points() if p.series == "request" and p.tags["route"] == route]
    ranked = sorted(
        ((float(p.fields["execution_time"]), str(p.fields["request_id"])) for p in requests),
        reverse=True,
    )
    return [(request_id, seconds) for seconds, request_id in ranked[:count]]


def test_report_names_the_slowest_requests_of_each_route(
    known_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(known_file), "--slowest", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for route in data["routes"]:
        named = [(s["request_id"], s["execution_time"]) for s in route["slowest"]]
        assert named == _expected_slowest(route["route"], 3)
    assert len(data["routes"][1]["slowest"]) == 1  # POST:/extractor has one request
    # The file's fast path and the points' path keep the same ids.
    from_file = report_file(known_file, slowest=3)
    assert from_file.routes == build_report(known_points(), source="x", slowest=3).routes
    assert main(["report", str(known_file), "--slowest", "2"]) == 0
    out = capsys.readouterr().out
    shown = out.split("Slowest requests by route")[1].split("Sub-steps")[0]
    for route in ROUTES:
        for request_id, seconds in _expected_slowest(route, 2):
            assert re.search(rf"\b{seconds * 1000:.2f} +{request_id}\b", shown), request_id
    assert main(["report", str(known_file), "--json"]) == 0
    assert all("slowest" not in r for r in json.loads(capsys.readouterr().out)["routes"])


def test_slowest_ties_are_kept_by_id_whatever_their_order() -> None:
    tags = {"service": "s", "route": "GET:/x", "status_code": "200"}
    points = [
        Point(
            "request", 1_700_000_000_000_000_000 + i, tags, {"request_id": rid, "execution_time": t}
        )
        for i, (rid, t) in enumerate([("b", 1.0), ("a", 1.0), ("c", 1.0), ("d", 0.5), ("e", 2.0)])
    ]
    for ordered in (points, points[::-1]):
        report = build_report(ordered, source="x", slowest=2)
        assert report.routes[0].slowest == (("e", 2.0), ("c", 1.0))
