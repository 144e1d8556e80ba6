"""Point times never collide: InfluxDB keeps one point per (series, tags, time), so
same-tag requests must get distinct times in one process, across a service's workers
and across its hosts."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from servers import InfluxServer, free_port

from lunamon import _ids

HERE = Path(__file__).parent


def test_a_frozen_clock_still_gives_distinct_times_ending_in_the_slot() -> None:
    clock = _ids.PointClock()
    times = [clock.now_ns(lambda: 1_700_000_000_123_456_789) for _ in range(1000)]
    assert len(set(times)) == 1000
    assert times == sorted(times)
    assert {t % 1000 for t in times} == {os.getpid() % 1000}
    assert times[0] == 1_700_000_000_123_456_000 + os.getpid() % 1000


def test_a_clock_going_back_never_repeats_a_time() -> None:
    clock = _ids.PointClock()
    first = clock.now_ns(lambda: 2_000_000_000_000)
    second = clock.now_ns(lambda: 1_000_000_000_000)
    assert second > first


def test_a_forked_child_takes_its_own_slot() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its slot and leave at once
        os.write(write, str(_ids._slot).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child_slot = int(os.read(read, 16))
    os.close(read)
    assert child_slot == pid % 1000
    assert _ids._slot == os.getpid() % 1000


HOST = textwrap.dedent(
    """
    import asyncio, sys
    from lunamon import InfluxDBSink, Point, _ids
    clock = _ids.PointClock()
    tags = {"service": "svc", "route": "GET:/hello", "status_code": "200"}
    points = [
        Point("request", clock.now_ns(lambda: 1_700_000_000_000_000_000), tags,
              {"execution_time": 0.001, "request_id": f"{i}"})
        for i in range(int(sys.argv[3]))
    ]
    async def main():
        sink = InfluxDBSink("127.0.0.1", int(sys.argv[1]), sys.argv[2])
        await sink.start()
        await sink.write(points)
        await sink.close()
    asyncio.run(main())
    print(_ids._slot)
    """
)


def test_two_hosts_with_the_same_clock_and_tags_keep_every_point(influxd: InfluxServer) -> None:
    """Two processes (as two hosts whose clocks agree to the ns), identical tags and
    times: influxd stores every point of both."""
    db = f"t_{uuid.uuid4().hex[:12]}"
    slots = []
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-c", HOST, str(influxd.port), db, "500"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        slots.append(int(done.stdout))
    assert slots[0] != slots[1]  # two pids, two slots
    assert influxd.count(db) == 1000


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
