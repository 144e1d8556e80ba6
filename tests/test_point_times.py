"""Point times never collide: InfluxDB keeps one point per (series, tags, time), so
same-tag requests must get distinct times in one process, across a service's workers,
its containers (every service process PID 1) and its hosts.

A time is a 10 µs quantum followed by the process's slot (4 digits), claimed with a
lock in a folder per host; processes that share no folder draw their first slot at
random (1 in 10,000 per pair to match), and ``instance`` makes replicas exact."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from servers import InfluxServer, free_port
from structlog.testing import capture_logs

from lunamon import _ids

HERE = Path(__file__).parent
T0 = 1_700_000_000_123_456_789  # a frozen clock, the same in every process


@pytest.fixture
def slot_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """This process claims its slot afresh in a private lock folder (restored after)."""
    before = (_ids._slot_dir, _ids._instance)
    folder = tmp_path / "slots"
    _ids.configure_slots(str(folder))
    _ids._set_clock(0)
    yield folder
    _ids.configure_slots(*before)


def _start_at(monkeypatch: pytest.MonkeyPatch, start: int) -> None:
    monkeypatch.setattr(_ids, "_draw_start", lambda size: start)


def test_a_frozen_clock_gives_distinct_times_ending_in_the_slot(
    slot_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _start_at(monkeypatch, 1234)
    clock = _ids.PointClock()
    times = [clock.now_ns(lambda: T0) for _ in range(1000)]
    assert len(set(times)) == 1000
    assert times == sorted(times)
    assert {t % 10_000 for t in times} == {1234} == {_ids.current_slot()}
    assert times[0] == 1_700_000_000_123_450_000 + 1234  # the clock's 10 µs quantum
    assert times[1] - times[0] == 10_000  # the next quantum, same slot
    assert (slot_dir / "slot-1234").exists()


def test_a_clock_going_back_never_repeats_a_time(slot_dir: Path) -> None:
    clock = _ids.PointClock()
    first = clock.now_ns(lambda: 2_000_000_000_000)
    second = clock.now_ns(lambda: 1_000_000_000_000)
    assert second > first


def test_100_000_points_a_second_keep_to_the_clock(slot_dir: Path) -> None:
    """One point per 10 µs quantum: every time is in its own clock quantum (no drift)."""
    clock = _ids.PointClock()
    now = [T0]

    def tick() -> int:
        now[0] += 10_000
        return now[0]

    for _ in range(2000):
        t = clock.now_ns(tick)
        assert t // 10_000 == now[0] // 10_000


def test_every_clock_of_a_process_shares_the_last_quantum(slot_dir: Path) -> None:
    """Two recorders in one process (two apps) hold one slot: never one time twice."""
    a, b = _ids.PointClock(), _ids.PointClock()
    times = [clock.now_ns(lambda: T0) for _ in range(100) for clock in (a, b)]
    assert len(set(times)) == 200


def test_two_processes_collide_only_on_the_same_slot_in_the_same_quantum(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The edge of the bound: a slot and a 10 µs quantum, both equal, give one time."""

    def time_of(slot: int, clock_ns: int) -> int:
        _ids._set_clock(0, slot)
        return _ids.PointClock().now_ns(lambda: clock_ns)

    held = _ids.current_slot()
    base = 1_700_000_000_000_000_000
    try:
        assert time_of(17, base) == time_of(17, base + 9_999)
        assert time_of(17, base) != time_of(17, base + 10_000)
        assert time_of(17, base) != time_of(18, base)
    finally:
        _ids._set_clock(0, held)
    assert time_of(9999, base) % 10_000 == 9999  # four digits, all slots usable


def test_the_first_slot_tried_is_drawn_afresh_not_from_the_pid() -> None:
    draws = {_ids._draw_start(10_000) for _ in range(20)}
    assert len(draws) > 1  # 20 equal draws: 1 in 10^76
    assert all(0 <= d < 10_000 for d in draws)


def test_an_instance_claims_among_its_own_100_slots(
    slot_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _start_at(monkeypatch, 99)
    _ids.configure_slots(str(slot_dir), 42)
    assert _ids.current_slot() == 4299
    # Its next process, drawing the same start, wraps around within the instance.
    assert _hold(slot_dir, 99, instance=42).slot == 4200
    _ids.configure_slots(str(slot_dir), 99)
    assert _ids.current_slot() == 9999


async def test_setup_takes_slot_dir_and_instance_from_the_settings(
    aiohttp_client: Any, slot_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiohttp import web

    import lunamon
    from lunamon import MemorySink

    _start_at(monkeypatch, 3)
    monkeypatch.setenv("LUNAMON_INSTANCE", "5")  # as a container's environment sets it
    sink = MemorySink()
    app = web.Application()
    app.router.add_get("/x", _ok)
    lunamon.setup(app, service="svc", sinks=[sink], slot_dir=str(slot_dir))
    client = await aiohttp_client(app)
    assert (await client.get("/x")).status == 200
    await client.close()
    (point,) = sink.points
    assert point.time_ns % 10_000 == 503
    assert _held(slot_dir / "slot-0503")


async def _ok(request: Any) -> Any:
    from aiohttp import web

    return web.Response(text="ok")


def test_a_forked_child_claims_its_own_slot(
    slot_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _start_at(monkeypatch, 10)
    assert _ids.current_slot() == 10
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its slot and leave at once
        os.write(write, str(_ids.current_slot()).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child_slot = int(os.read(read, 16))
    os.close(read)
    assert child_slot == 11  # 10 is its parent's: the child's copy of the lock is not its own
    assert _ids.current_slot() == 10
    assert _held(slot_dir / "slot-0010")  # the child leaving did not free the parent's slot
    assert not _held(slot_dir / "slot-0011")  # the child's died with it


def _held(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


HOLD = textwrap.dedent(
    """
    import sys
    from lunamon import _ids
    _ids._draw_start = lambda size: int(sys.argv[2])
    _ids.configure_slots(sys.argv[1], int(sys.argv[3]))
    print(_ids.current_slot(), flush=True)
    sys.stdin.read()  # hold the slot until told to go
    """
)


class _Holder:
    def __init__(self, proc: subprocess.Popen[str], slot: int) -> None:
        self.proc, self.slot = proc, slot


_holders: list[_Holder] = []


def _hold(folder: Path, start: int, instance: int = -1) -> _Holder:
    """A process that claims a slot in ``folder`` (its search starting at ``start``) and
    holds it until its stdin closes."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder), str(start), str(instance)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    holder = _Holder(proc, int(proc.stdout.readline()))
    _holders.append(holder)
    return holder


@pytest.fixture(autouse=True)
def _end_holders() -> Iterator[None]:
    yield
    while _holders:
        proc = _holders.pop().proc
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def test_three_processes_of_a_host_claim_three_slots_and_a_killed_ones_is_free(
    tmp_path: Path,
) -> None:
    """Same draw, one lock folder: the locks alone make the slots differ; SIGKILL frees one."""
    first, second, third = (_hold(tmp_path, 500) for _ in range(3))
    assert [first.slot, second.slot, third.slot] == [500, 501, 502]
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(timeout=30)
    assert _hold(tmp_path, 500).slot == 500  # free again, no cleanup ran
    assert _hold(tmp_path, 500).slot == 503


def test_an_unusable_lock_folder_still_gives_a_slot_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    _start_at(monkeypatch, 77)
    before = (_ids._slot_dir, _ids._instance)
    try:
        with capture_logs() as logs:
            _ids.configure_slots(str(not_a_folder))
            assert _ids.PointClock().now_ns() % 10_000 == 77
    finally:
        _ids.configure_slots(*before)
    assert [(e["event"], e["log_level"], e["slot"]) for e in logs] == [
        ("point_slot_unlocked", "warning", 77)
    ]


HOST = textwrap.dedent(
    """
    import asyncio, os, sys
    from lunamon import InfluxDBSink, Point, _ids
    port, db, count, instance, start, slot_dir = sys.argv[1:]
    if start != "-":
        _ids._draw_start = lambda size: int(start)
    clock = _ids.PointClock(slot_dir, int(instance))
    tags = {"service": "svc", "route": "GET:/hello", "status_code": "200"}
    points = [
        Point("request", clock.now_ns(lambda: 1_700_000_000_123_456_789), tags,
              {"execution_time": 0.001, "request_id": f"{os.getpid()}-{i}"})
        for i in range(int(count))
    ]
    async def main():
        sink = InfluxDBSink("127.0.0.1", int(port), db)
        await sink.start()
        await sink.write(points)
        await sink.close()
    asyncio.run(main())
    print(os.getpid(), _ids.current_slot())
    """
)


def test_two_processes_of_a_host_with_the_same_clock_and_tags_keep_every_point(
    influxd: InfluxServer, tmp_path: Path
) -> None:
    """Two processes whose clocks agree to the ns, identical tags and times: influxd
    stores every point of both (they lock different slots in the host's folder)."""
    db = f"t_{uuid.uuid4().hex[:12]}"
    argv = _host_argv(influxd, db, 500, -1, "4321", tmp_path)
    slots = [_run(argv)[1] for _ in range(2)]
    assert slots == [4321, 4321]  # one after the other: the first had let go of it
    assert influxd.count(db) == 500  # so their times were equal: one point each kept
    running = _hold(tmp_path, 4321)  # now a process holds 4321: the next one takes 4322
    assert _run(argv)[1] == running.slot + 1
    assert influxd.count(db) == 1000


def _host_argv(
    influxd: InfluxServer, db: str, count: int, instance: int, start: str, slot_dir: Path | None
) -> list[str]:
    """A process writing ``count`` points of one series and tag set at one frozen clock."""
    folder = "" if slot_dir is None else str(slot_dir)  # "": the default folder
    argv = [str(influxd.port), db, str(count), str(instance), start, folder]
    return [sys.executable, "-c", HOST, *argv]


def _run(argv: list[str]) -> tuple[int, int]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    pid, slot = done.stdout.split()
    return int(pid), int(slot)


def _in_container(argv: list[str], private_tmp: Path) -> list[str]:
    """``argv`` as the first process of a PID namespace with a temporary folder of its
    own (``TMPDIR``: where the default slot folder is), as in Docker. Not a tmpfs over
    /tmp: the interpreter running the tests may live there."""
    private_tmp.mkdir(parents=True, exist_ok=True)
    return [
        "unshare", "--pid", "--fork", "--mount-proc", "env", f"TMPDIR={private_tmp}", *argv,
    ]  # fmt: skip


def _require_root_unshare() -> None:
    """PID namespaces need root and unshare(1) (util-linux): missing, the test fails."""
    assert hasattr(os, "geteuid"), "PID namespaces need a POSIX system"
    assert os.geteuid() == 0, "PID namespaces need root"
    assert shutil.which("unshare"), "unshare(1) is missing: apt-get install util-linux"


def _replicas(
    influxd: InfluxServer, db: str, specs: list[tuple[int, str]], tmp: Path
) -> list[tuple[int, int]]:
    """Run one replica per (instance, first slot tried) at once, each PID 1 of its own
    container; their (pid, slot)."""
    _require_root_unshare()
    procs = [
        subprocess.Popen(
            _in_container(
                _host_argv(influxd, db, 300, instance, start, None), tmp / f"{db}-{number}"
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for number, (instance, start) in enumerate(specs)
    ]
    out = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=60)
            assert proc.returncode == 0, stderr
            pid, slot = stdout.split()
            out.append((int(pid), int(slot)))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    return out


def test_replicas_in_containers_all_pid_1_keep_every_point(
    influxd: InfluxServer, tmp_path: Path
) -> None:
    """RELIABILITY 39: three replicas, each service process PID 1 with a /tmp of its own,
    the same clock ns and tags: every point stored. Their slots differ by the draw."""
    db = f"t_{uuid.uuid4().hex[:12]}"
    replicas = _replicas(influxd, db, [(-1, "17"), (-1, "4242"), (-1, "9999")], tmp_path)
    assert replicas == [(1, 17), (1, 4242), (1, 9999)]
    assert influxd.count(db) == 900


def test_replicas_that_draw_the_same_slot_overwrite_unless_instance_is_set(
    influxd: InfluxServer, tmp_path: Path
) -> None:
    """The edge of the bound: replicas sharing no lock folder that draw the same slot
    lose points (1 in 10,000 per pair); ``instance`` rules that out by construction."""
    db = f"t_{uuid.uuid4().hex[:12]}"
    assert _replicas(influxd, db, [(-1, "17"), (-1, "17")], tmp_path) == [(1, 17), (1, 17)]
    assert influxd.count(db) == 300  # one of each pair of equal times is kept
    exact = f"t_{uuid.uuid4().hex[:12]}"
    assert _replicas(influxd, exact, [(0, "17"), (1, "17")], tmp_path) == [(1, 17), (1, 117)]
    assert influxd.count(exact) == 600


@pytest.mark.slow
def test_gunicorn_workers_under_wrk_store_a_row_per_request(
    influxd: InfluxServer, tmp_path: Path
) -> None:
    """Two workers, one route, one status, as fast as wrk drives them: rows == served."""
    wrk = shutil.which("wrk")
    assert wrk is not None, "wrk is not installed: `make servers` installs it"
    db, port = f"t_{uuid.uuid4().hex[:12]}", free_port()
    env = {
        **os.environ,
        "REL_INFLUX_PORT": str(influxd.port),
        "REL_DB": db,
        "REL_COUNT_DIR": str(tmp_path),
    }
    argv = [
        sys.executable, "-m", "gunicorn", "--chdir", str(HERE),
        "--bind", f"127.0.0.1:{port}", "--workers", "2",
        "--worker-class", "aiohttp.GunicornWebWorker",
        "--graceful-timeout", "20", "--log-level", "warning",
        "_rel_hello_app:create",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(f"http://127.0.0.1:{port}/hello", proc)
        done = subprocess.run(
            # A connection per request: both workers accept their share.
            [
                wrk,
                "-t2",
                "-c16",
                "-d3s",
                "-H",
                "Connection: close",
                f"http://127.0.0.1:{port}/hello",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        proc.send_signal(signal.SIGTERM)  # each worker drains, then writes its count
        assert proc.wait(timeout=40) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    counts = [int(p.read_text()) for p in tmp_path.iterdir()]
    assert len(counts) == 2, counts
    assert min(counts) > 0  # both workers served
    served = sum(counts)
    by_wrk = int(re.search(r"(\d+) requests in", done.stdout)[1])  # type: ignore[index]
    assert served >= by_wrk > 1000
    assert influxd.count(db) == served  # not one point overwritten by another


def _wait_for(url: str, proc: subprocess.Popen[bytes]) -> None:
    import urllib.request

    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, "gunicorn exited while starting"
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            assert time.monotonic() < deadline, "gunicorn did not start"
            time.sleep(0.05)
