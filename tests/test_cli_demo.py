"""``lunamon demo``: the service under generated traffic, its file and InfluxDB outputs."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from servers import InfluxServer

from lunamon.cli import main
from lunamon.demo.service import SUBSTEPS
from lunamon.lineprotocol import parse_line_protocol
from lunamon.point import Point

FAST = ["--latency", "0.001", "--no-progress", "--seed", "7"]
STATS_LINE = re.compile(r"^\s+(\S+): ([\d,]+) = ([\d,]+) \+ ([\d,]+) \+ ([\d,]+)  ok", re.M)


def _number(text: str) -> int:
    return int(text.replace(",", ""))


def _stats(stdout: str) -> dict[str, tuple[int, ...]]:
    """sink -> (emitted, written, dropped, buffered) from the demo's stats lines."""
    return {m[1]: tuple(_number(g) for g in m.groups()[1:]) for m in STATS_LINE.finditer(stdout)}


@contextlib.contextmanager
def _inside(directory: Path) -> Iterator[None]:
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``lunamon demo --requests 300`` in a fresh directory with the default output files:
    the directory and what the demo printed."""
    directory = tmp_path_factory.mktemp("demo")
    stdout = io.StringIO()
    with _inside(directory), contextlib.redirect_stdout(stdout):
        assert main(["demo", "--requests", "300", *FAST]) == 0
    return directory, stdout.getvalue()


@pytest.fixture(scope="module")
def demo_file(demo_run: tuple[Path, str]) -> tuple[list[Point], str]:
    """The handlers-like service's points of the demo run, and what the demo printed."""
    directory, stdout = demo_run
    return parse_line_protocol((directory / "lunamon-demo.lp").read_text()), stdout


def test_demo_file_holds_exactly_the_written_points(demo_file: tuple[list[Point], str]) -> None:
    points, out = demo_file
    stats = _stats(out)
    assert list(stats) == ["file"]
    emitted, written, dropped, buffered = stats["file"]
    assert (dropped, buffered) == (0, 0)
    assert emitted == written == len(points)
    requests = [p for p in points if p.series == "request"]
    assert len(requests) == 300
    assert "300 requests" in out


def test_demo_covers_every_resource_and_sub_step(demo_file: tuple[list[Point], str]) -> None:
    points, _ = demo_file
    fields: dict[str, set[str]] = {}
    for p in points:
        if p.series == "request":
            fields.setdefault(p.tags["route"], set()).update(p.fields)
            assert p.tags["service"] == "luna-handlers"
            assert isinstance(p.fields["request_id"], str)
            assert all(type(v) is float for k, v in p.fields.items() if k.endswith("_time"))
    assert set(fields) == set(SUBSTEPS)
    for route, steps in SUBSTEPS.items():
        assert set(steps) <= fields[route], route
    handler_ids = {p.tags.get("handler_id") for p in points if "handlers" in p.tags["route"]}
    assert None not in handler_ids
    assert len(handler_ids) > 1


def test_demo_error_points_carry_luna_codes(demo_file: tuple[list[Point], str]) -> None:
    points, _ = demo_file
    requests = {p.fields["request_id"]: p for p in points if p.series == "request"}
    errors = [p for p in points if p.series == "error"]
    outcomes = Counter((p.tags["error_code"], p.tags["status_code"]) for p in errors)
    # LUNA JSON bodies (12012/400, 1/500), an exception with error_code (10015),
    # an unhandled exception (1/500), HTTPBadRequest (0/400), a client that went away (0/499).
    assert {("12012", "400"), ("1", "500"), ("10015", "500"), ("0", "400"), ("0", "499")} <= set(
        outcomes
    )
    for error in errors:
        int(error.tags["error_code"])
        request = requests[error.fields["request_id"]]
        assert request.time_ns == error.time_ns
        assert request.tags["status_code"] == error.tags["status_code"]
        assert int(error.tags["status_code"]) >= 400
    failed = [p for p in requests.values() if int(p.tags["status_code"]) >= 400]
    assert len(failed) == len(errors)


def test_the_handlers_call_the_faces_service_with_the_request_id(
    demo_run: tuple[Path, str],
) -> None:
    directory, out = demo_run
    handlers = {
        p.fields["request_id"]: p
        for p in parse_line_protocol((directory / "lunamon-demo.lp").read_text())
        if p.series == "request"
    }
    faces = parse_line_protocol((directory / "lunamon-demo-faces.lp").read_text())
    calling = [p for p in handlers.values() if "faces_time" in p.fields]
    assert len(faces) == len(calling) > 0  # one faces point per call, none failed
    assert {p.tags["route"] for p in calling} == {"POST:/handlers/{handlerId}/events"}
    for face in faces:
        assert face.series == "request"
        assert (face.tags["service"], face.tags["route"]) == ("luna-faces", "POST:/faces")
        caller = handlers[face.fields["request_id"]]  # the handlers' id went along
        assert "insert_face_time" in face.fields
        # One process, one clock: the call's time holds the callee's whole handler.
        assert face.fields["execution_time"] <= caller.fields["faces_time"]  # type: ignore[operator]
        assert caller.time_ns < face.time_ns
    assert f"luna-faces (called by the handlers) -> faces-file: {len(faces):,} of" in out


def test_the_demo_ends_with_a_trace_command_that_works(
    demo_run: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    directory, out = demo_run
    command = shlex.split(out.strip().splitlines()[-1])
    assert command[:2] == ["lunamon", "trace"]
    assert command[3:] == ["lunamon-demo.lp", "lunamon-demo-faces.lp"]
    handlers = parse_line_protocol((directory / "lunamon-demo.lp").read_text())
    calling = [p for p in handlers if p.series == "request" and "faces_time" in p.fields]
    slowest = max(calling, key=lambda p: p.fields["execution_time"])
    assert command[2] == slowest.fields["request_id"]
    with _inside(directory):
        assert main(command[1:]) == 0
    trace = capsys.readouterr().out
    assert "2 points from 2 services" in trace
    assert re.search(
        r"^luna-handlers POST:/handlers/\{handlerId\}/events +201 +\+0\.000 ", trace, re.M
    )
    assert re.search(r"^  luna-faces POST:/faces +201 +\+[\d.]+ ", trace, re.M)


def test_demo_prints_the_report(demo_file: tuple[list[Point], str]) -> None:
    _, out = demo_file
    assert "Requests by route" in out
    assert "Sub-steps" in out
    assert "Errors by error_code and status" in out
    for route in SUBSTEPS:
        assert route in out


def test_demo_with_duration_stops_by_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "timed.lp"
    assert main(["demo", "--duration", "0.3", "--out", str(out_file), *FAST]) == 0
    stdout = capsys.readouterr().out
    _, written, _, _ = _stats(stdout)["file"]
    assert 0 < written == len(parse_line_protocol(out_file.read_text()))


def test_demo_into_influxdb(influxd: InfluxServer, capsys: pytest.CaptureFixture[str]) -> None:
    db = "lunamon_cli_demo"
    assert main(["demo", "--requests", "300", "--influx", f"{influxd.url}/{db}", *FAST]) == 0
    out = capsys.readouterr().out
    _, written, _, _ = _stats(out)["influxdb"]

    def count(series: str) -> int:
        rows = influxd.rows(f'SELECT count("request_id") FROM "{series}"', db)
        return int(rows[0]["count"]) if rows else 0

    assert count("request") == 300
    assert count("request") + count("error") == written
    types = influxd.field_types("request", db)
    assert types["execution_time"] == "float"
    assert types["request_id"] == "string"
    for steps in SUBSTEPS.values():
        assert all(types[step] == "float" for step in steps)
    routes = influxd.column('SHOW TAG VALUES FROM "request" WITH KEY = "route"', db, "value")
    assert set(routes) == set(SUBSTEPS)
    # The faces-like service: a database of its own on the same server, both in the trace.
    faces = influxd.column('SELECT "request_id" FROM "request"', f"{db}_faces", "request_id")
    assert faces
    trace = shlex.split(out.strip().splitlines()[-1])
    assert trace[3:] == ["--influx", f"{influxd.url}/{db}", "--influx", f"{influxd.url}/{db}_faces"]
    assert trace[2] in faces


def test_demo_unreachable_influxdb_is_one_line_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from servers import free_port

    code = main(["demo", "--influx", f"http://127.0.0.1:{free_port()}/db", *FAST])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1
    assert "cannot reach InfluxDB" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--influx", "ftp://x/db"], "expected http://host:port/database"),
        (["--influx", "http://127.0.0.1:8086"], "no database"),
        (["--config", "/nonexistent/lunamon.toml"], "No such file"),
        (["--out", "/nonexistent/dir/x.lp"], "No such file"),
    ],
)
def test_demo_bad_options(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", *args, *FAST]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert message in err
    assert "Traceback" not in err


def test_demo_with_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lp = tmp_path / "configured.lp"
    config = tmp_path / "lunamon.toml"
    config.write_text(
        f'[monitoring]\nservice = "luna-handlers"\n\n'
        f'[[monitoring.sinks]]\ntype = "file"\npath = "{lp}"\nfsync = false\n'
    )
    assert main(["demo", "--requests", "100", "--config", str(config), *FAST]) == 0
    stats = _stats(capsys.readouterr().out)
    assert set(stats) == {"file", "report-copy"}
    assert stats["file"][1] == len(parse_line_protocol(lp.read_text())) == stats["report-copy"][1]


def _run_module(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lunamon", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_python_m_lunamon(tmp_path: Path) -> None:
    done: Any = _run_module("demo", "--requests", "60", *FAST, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "file: " in done.stdout
    assert (tmp_path / "lunamon-demo.lp").stat().st_size > 0
    assert done.stderr == ""


_LAYERING = """
import importlib, pkgutil, sys
import lunamon, lunamon.sinks

apart = ("lunamon.cli", "lunamon.demo", "lunamon.__main__")
for package in (lunamon, lunamon.sinks):
    for module in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        if module.name not in apart:
            importlib.import_module(module.name)
def inside(name, packages):  # lunamon.client is not inside lunamon.cli
    return any(name == p or name.startswith(p + ".") for p in packages)
library = sorted(m for m in sys.modules if inside(m, apart))
import lunamon.demo.run
demo = sorted(m for m in sys.modules if inside(m, ("lunamon.cli",)))
print(library, demo)
"""


def test_the_library_imports_neither_the_command_line_nor_the_demo() -> None:
    """Layering (DESIGN.md section 5): lunamon/*.py and lunamon/sinks/* stand alone, and the
    demo service and its run never need the command line."""
    done = subprocess.run(
        [sys.executable, "-c", _LAYERING], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[] []"


def test_demo_with_metrics_prints_the_scrape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo.lp"
    args = ["demo", "--requests", "120", "--no-progress", "--seed", "5", "--metrics"]
    assert main([*args, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    counted = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.strip().startswith("request_count_total{")
    ]
    requests = [p for p in parse_line_protocol(out.read_text()) if p.series == "request"]
    assert sum(counted) == len(requests) > 0  # the same records, two outputs
