"""``spool_dir``: crash-safe delivery (RELIABILITY 40).

The record format (torn tails and damaged records skipped and counted), rotation, the
bound, acknowledgements, lock ownership (a live owner is never adopted, a dead one by
exactly one process), replay to the sinks that had not stored the points, a full disk;
and end to end: a service SIGKILLed with its sink down, then a second process with the
same folder delivering every point to a real influxd, each once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from servers import InfluxServer, free_port

from lunamon import MemorySink, MonitoringSettings, Point
from lunamon import spool as spool_module
from lunamon.monitoring import Monitoring
from lunamon.spool import (
    HEADER_SIZE,
    Spool,
    _try_lock,
    encode_record,
    read_segment,
    segment_bytes,
)

HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def quick_ticks(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process spools write every 50 ms (the subprocess apps keep the real 250 ms)."""
    monkeypatch.setattr(spool_module, "TICK", 0.05)


def point(i: int, rid: str = "") -> Point:
    fields: dict[str, Any] = {"execution_time": i / 7, "n": i, "ok": i % 2 == 0}
    fields["request_id"] = rid or f"r-{i}"
    return Point("request", 1_700_000_000_000_000_000 + i, {"route": "POST:/x, y"}, fields)


class DownSink:
    """A sink whose every write fails as a network error would (retried)."""

    def __init__(self, name: str = "memory") -> None:
        self.name = name
        self.attempts = 0

    async def start(self) -> None:
        pass

    async def write(self, points: Sequence[Point]) -> None:
        self.attempts += 1
        raise ConnectionRefusedError("down")

    async def close(self) -> None:
        pass


class MarkingSink(MemorySink):
    """A memory sink with the replay hook: what it was told may be stored already."""

    def __init__(self, name: str = "memory") -> None:
        super().__init__(name)
        self.marked: list[Point] = []

    def mark_possibly_stored(self, points: Sequence[Point]) -> None:
        self.marked.extend(points)


def monitoring(folder: Path, *sinks: Any, max_bytes: int = 256 << 20, **options: Any) -> Monitoring:
    settings = MonitoringSettings(
        spool_dir=str(folder),
        spool_max_bytes=max_bytes,
        flush_interval=0.05,
        retry_base_delay=0.05,
        retry_max_delay=0.1,
        shutdown_timeout=0.5,
        gc_freeze=False,
        **options,
    )
    return Monitoring(settings, list(sinks))


def spool_of(m: Monitoring) -> Spool:
    assert m._spool is not None
    return m._spool


async def until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def die(m: Monitoring) -> None:
    """What SIGKILL leaves: files as written, no final acks, the locks released."""
    spool = spool_of(m)
    task, spool._task = spool._task, None
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    for fd in (spool._segment, spool._lock, *(a.lock for a in spool._adopted)):
        if fd is not None:
            os.close(fd)
    spool._segment = spool._lock = None
    spool._adopted = []
    for channel in m._flusher._channels:
        if channel.task is not None:
            channel.task.cancel()
    m._flusher._closed = True


def owner_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


# --------------------------------------------------------------------------- format


def test_record_round_trip() -> None:
    points = [point(i) for i in range(5)]
    data = encode_record(7, points) + encode_record(12, [point(12)])
    records, bad = read_segment(data)
    assert bad == 0
    assert records == [(7, points), (12, [point(12)])]


def test_torn_tail_is_skipped_and_counted() -> None:
    first = encode_record(0, [point(0), point(1)])
    second = encode_record(2, [point(2), point(3)])
    for cut in (1, HEADER_SIZE - 1, HEADER_SIZE + 3, len(second) - 1):
        records, bad = read_segment(first + second[:cut])
        assert records == [(0, [point(0), point(1)])]
        assert bad == 1


def test_damaged_record_is_skipped_not_replayed() -> None:
    records_in = [encode_record(i * 2, [point(i * 2), point(i * 2 + 1)]) for i in range(3)]
    damaged = bytearray(records_in[1])
    damaged[HEADER_SIZE + 5] ^= 0x01  # one bit of the payload
    records, bad = read_segment(records_in[0] + bytes(damaged) + records_in[2])
    assert [first for first, _ in records] == [0, 4]
    assert bad == 1
    garbage = b"\x00" * 40
    records, bad = read_segment(records_in[0] + garbage + records_in[2])
    assert [first for first, _ in records] == [0]
    assert bad == 1


def test_segment_size() -> None:
    assert segment_bytes(65536) == 8192
    assert segment_bytes(256 << 20) == 4 << 20
    assert segment_bytes(1000) == 4096


def test_settings() -> None:
    assert MonitoringSettings().spool_dir == ""
    settings = MonitoringSettings.from_env(
        {"LUNAMON_SPOOL_DIR": "/tmp/x", "LUNAMON_SPOOL_MAX_BYTES": "1048576"}
    )
    assert (settings.spool_dir, settings.spool_max_bytes) == ("/tmp/x", 1 << 20)
    with pytest.raises(ValueError, match="spool_max_bytes"):
        MonitoringSettings(spool_max_bytes=100)
    assert Monitoring(MonitoringSettings(), [MemorySink()])._spool is None


# --------------------------------------------------------------------------- one process


async def test_delivered_points_are_acked_and_a_clean_exit_leaves_nothing(
    tmp_path: Path,
) -> None:
    sink = MemorySink()
    m = monitoring(tmp_path, sink)
    await m.start()
    for i in range(50):
        m.emit(point(i))
    await m.flush()
    spool = spool_of(m)
    await until(lambda: spool.counts["spooled"] == 50)
    folder = spool.folder
    assert folder is not None
    await until(lambda: json.loads((folder / "acks").read_text())["sinks"] == {"memory": 50})
    await m.close()
    assert len(sink.points) == 50
    assert owner_folders(tmp_path) == []


class HangingSink(MemorySink):
    """Holds every write until :attr:`go` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.go = asyncio.Event()
        self.writing = 0

    async def write(self, points: Sequence[Point]) -> None:
        self.writing += 1
        await self.go.wait()
        await super().write(points)


async def test_a_batch_in_flight_is_not_acked_until_written(tmp_path: Path) -> None:
    sink = HangingSink()
    m = monitoring(tmp_path, sink, batch_size=10, write_timeout=30.0)
    await m.start()
    for i in range(10):
        m.emit(point(i))
    await until(lambda: sink.writing == 1)
    for i in range(10, 15):
        m.emit(point(i))
    spool = spool_of(m)
    await until(lambda: spool.counts["spooled"] == 15)
    folder = spool.folder
    assert folder is not None
    await asyncio.sleep(0.2)  # a few ticks: the acks must stay at the batch in flight
    assert json.loads((folder / "acks").read_text())["sinks"] == {"memory": 0}
    assert m._flusher.fronts() == {"memory": 0}
    sink.go.set()
    await until(lambda: json.loads((folder / "acks").read_text())["sinks"] == {"memory": 15})
    await m.close()


async def test_rotation_bound_and_eviction(tmp_path: Path) -> None:
    m = monitoring(tmp_path, DownSink(), max_bytes=65536, max_retries=1000)
    await m.start()
    spool = spool_of(m)
    for batch in range(12):
        for i in range(100):
            m.emit(point(batch * 100 + i))
        await until(lambda b=batch: spool.seq == (b + 1) * 100)
    await until(lambda: spool.counts["spooled"] == 1200)
    folder = spool.folder
    assert folder is not None
    segments = sorted(folder.glob("*.seg"))
    assert len(segments) > 2
    size = sum(p.stat().st_size for p in segments)
    assert size <= 65536 + spool.segment_bytes
    assert spool.counts["evicted"] > 0
    # What is left is the newest points, in order, with nothing missing after the oldest.
    firsts = [int(p.name.split(".")[0]) for p in segments]
    assert firsts == sorted(firsts)
    seqs = [
        f + k
        for p in segments
        for f, pts in read_segment(p.read_bytes())[0]
        for k in range(len(pts))
    ]
    assert seqs == list(range(seqs[0], 1200))
    assert seqs[0] == spool.counts["evicted"]
    await die(m)


async def test_shutdown_leaves_undelivered_points_for_the_next_process(tmp_path: Path) -> None:
    down = monitoring(tmp_path, DownSink())
    await down.start()
    for i in range(30):
        down.emit(point(i))
    await down.close()
    stats = down.stats()["memory"]
    assert stats["dropped"]["shutdown"] == 30
    (left,) = owner_folders(tmp_path)
    assert json.loads((left / "acks").read_text())["sinks"] == {"memory": 0}

    sink = MemorySink()
    up = monitoring(tmp_path, sink)
    await up.start()
    await until(lambda: len(sink.points) == 30)
    await until(lambda: owner_folders(tmp_path) == [spool_of(up).folder])
    await up.close()
    assert sorted(p.time_ns for p in sink.points) == [point(i).time_ns for i in range(30)]
    assert sink.points == [point(i) for i in range(30)]
    assert spool_of(up).counts["replayed"] == 30
    assert owner_folders(tmp_path) == []


async def test_replay_goes_only_to_sinks_that_had_not_stored_the_points(
    tmp_path: Path,
) -> None:
    stored = MemorySink("influxdb")
    first = monitoring(tmp_path, stored, DownSink("clickhouse"))
    await first.start()
    for i in range(40):
        first.emit(point(i))
    await until(lambda: len(stored.points) == 40)
    spool = spool_of(first)
    await until(lambda: spool.counts["spooled"] == 40)
    folder = spool.folder
    assert folder is not None
    await until(
        lambda: (
            json.loads((folder / "acks").read_text())["sinks"] == {"influxdb": 40, "clickhouse": 0}
        )
    )
    await die(first)

    influx, clickhouse = MarkingSink("influxdb"), MarkingSink("clickhouse")
    second = monitoring(tmp_path, influx, clickhouse)
    await second.start()
    second.emit(point(1000))  # its own traffic goes on meanwhile
    await until(lambda: len(clickhouse.points) == 41)
    await until(lambda: not folder.exists())
    assert sorted(p.time_ns for p in clickhouse.points) == sorted(
        [point(i).time_ns for i in range(40)] + [point(1000).time_ns]
    )
    assert influx.points == [point(1000)]
    # Its own acks count its own points only: one, stored by both.
    mine = spool_of(second).folder
    assert mine is not None
    await until(
        lambda: json.loads((mine / "acks").read_text())["sinks"] == {"influxdb": 1, "clickhouse": 1}
    )
    assert clickhouse.marked == [point(i) for i in range(40)]
    assert influx.marked == []
    await second.close()


async def test_adopter_killed_midway_is_resumed_without_repeats(tmp_path: Path) -> None:
    first = monitoring(tmp_path, DownSink(), max_retries=1000)
    await first.start()
    for i in range(60):
        first.emit(point(i))
    await until(lambda: spool_of(first).counts["spooled"] == 60)
    await die(first)

    # The adopter feeds at most half a buffer (10 points) at a time: it delivers some,
    # then dies; a third process delivers the rest.
    sink = MemorySink()
    second = monitoring(tmp_path, sink, buffer_size=20, batch_size=10)
    await second.start()
    await until(lambda: len(sink.points) >= 20)
    adopted = spool_of(second)._adopted[0]
    assert spool_of(second).counts["replayed"] < 60
    await until(lambda: adopted.written_acks.get("memory", 0) >= 20)
    done = adopted.written_acks["memory"]
    await die(second)
    delivered = list(sink.points)

    third_sink = MemorySink()
    third = monitoring(tmp_path, third_sink, buffer_size=20, batch_size=10)
    await third.start()
    await until(lambda: point(59) in third_sink.points)
    await until(lambda: owner_folders(tmp_path) == [spool_of(third).folder])
    await third.close()
    # Every point, in order; what the second process stored after its last acks (they
    # trail by a tick) is sent again (InfluxDB overwrites it, ClickHouse checks it
    # through mark_possibly_stored), nothing before them.
    assert {p.time_ns for p in delivered + third_sink.points} == {
        point(i).time_ns for i in range(60)
    }
    assert third_sink.points[0] == point(done)
    assert third_sink.points == [point(i) for i in range(done, 60)]


async def test_torn_and_damaged_records_of_a_dead_process_are_skipped_and_counted(
    tmp_path: Path,
) -> None:
    first = monitoring(tmp_path, DownSink(), max_retries=1000)
    await first.start()
    for i in range(3):
        for k in range(10):
            first.emit(point(i * 10 + k))
        await until(lambda i=i: spool_of(first).counts["spooled"] == (i + 1) * 10)
    folder = spool_of(first).folder
    assert folder is not None
    await die(first)
    (segment,) = folder.glob("*.seg")
    data = bytearray(segment.read_bytes())
    records, _ = read_segment(bytes(data))
    assert [f for f, _ in records] == [0, 10, 20]
    second_record = len(encode_record(0, records[0][1]))
    data[second_record + HEADER_SIZE + 2] ^= 0x20  # damage the second record
    torn = encode_record(30, [point(30), point(31)])
    segment.write_bytes(bytes(data) + torn[: len(torn) // 2])  # the write the kill cut

    sink = MemorySink()
    second = monitoring(tmp_path, sink)
    await second.start()
    await until(lambda: not folder.exists())
    await second.close()
    assert sink.points == [point(i) for i in range(10)] + [point(i) for i in range(20, 30)]
    assert spool_of(second).counts["torn"] == 2


def reap(pid: int) -> None:
    os.waitpid(pid, 0)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (tests run as root, as CI does: a mount refused is a failure)."""
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode:
        pytest.fail(f"cannot mount a tmpfs here (run as root): {mounted.stderr!r}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_a_forked_child_owns_a_new_folder_and_not_the_parents_lock(
    tmp_path: Path,
) -> None:
    m = monitoring(tmp_path, DownSink())
    await m.start()
    spool = spool_of(m)
    await until(lambda: spool.folder is not None)
    parent_folder, parent_owner = spool.folder, spool.owner
    assert parent_folder is not None
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the parent's state is gone
        ok = spool.owner != parent_owner and spool._lock is None and spool.folder is None
        os.write(ready_w, b"1" if ok else b"0")
        os.read(done_r, 1)
        os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"1"
        assert spool._lock is not None
        os.close(spool._lock)  # the parent dies: its lock must be free, the child alive
        spool._lock = None
        fd = _try_lock(parent_folder / "lock")
        assert fd is not None
        os.close(fd)
    finally:
        os.write(done_w, b"x")
        reap(pid)
        for fd in (ready_r, ready_w, done_r, done_w):
            os.close(fd)
    await die(m)


async def test_full_disk_never_breaks_the_service(small_disk: Path) -> None:
    sink = MemorySink()
    m = monitoring(small_disk, sink, max_retries=1000)
    await m.start()
    spool = spool_of(m)
    for batch in range(10):
        for i in range(200):
            m.emit(point(batch * 200 + i))
        await until(lambda b=batch: spool.seq == (b + 1) * 200)
    await until(lambda: spool.stats()["unspooled"] > 0)
    assert spool.degraded
    await m.flush()
    assert len(sink.points) == 2000  # delivery went on from memory
    # What it did write reads back whole: the record the disk cut was taken back.
    assert spool.folder is not None
    for segment in spool.folder.glob("*.seg"):
        assert read_segment(segment.read_bytes())[1] == 0
    await m.close()
    assert len(sink.points) == 2000


class GateSink(MemorySink):
    """Stores the first ``allow`` batches, then holds every write for ever."""

    def __init__(self, allow: int) -> None:
        super().__init__()
        self.allow = allow
        self.writing = 0

    async def write(self, points: Sequence[Point]) -> None:
        self.writing += 1
        if self.writing > self.allow:
            await asyncio.Event().wait()
        await super().write(points)


async def test_adopter_dying_with_replayed_points_in_flight_loses_none(tmp_path: Path) -> None:
    first = monitoring(tmp_path, DownSink(), max_retries=1000)
    await first.start()
    for i in range(20):
        first.emit(point(i))
    await until(lambda: spool_of(first).counts["spooled"] == 20)
    dead = spool_of(first).folder
    assert dead is not None
    await die(first)

    gate = GateSink(allow=1)
    second = monitoring(tmp_path, gate, batch_size=10, write_timeout=30.0)
    await second.start()
    spool = spool_of(second)
    await until(lambda: spool.counts["replayed"] == 20)
    for i in range(100, 105):
        second.emit(point(i))
    await until(lambda: gate.writing == 2)  # the first 10 stored, the next 10 held
    await until(lambda: json.loads((dead / "acks").read_text())["sinks"] == {"memory": 10})
    mine = spool.folder
    assert mine is not None
    await until(lambda: spool.counts["spooled"] == 5)
    await asyncio.sleep(0.2)  # a few ticks: nothing of its own is done yet
    assert json.loads((mine / "acks").read_text())["sinks"] == {"memory": 0}
    assert dead.exists()  # all fed, not all stored: the dead folder stays
    await die(second)

    sink = MemorySink()
    third = monitoring(tmp_path, sink)
    await third.start()
    await until(lambda: len(sink.points) == 15)
    await until(lambda: owner_folders(tmp_path) == [spool_of(third).folder])
    await third.close()
    assert sorted(p.time_ns for p in gate.points + sink.points) == sorted(
        point(i).time_ns for i in [*range(20), *range(100, 105)]
    )


def remount(mount: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mount)], check=True)


class Events:
    """Stands in for lunamon's logger: the events logged, by name."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, *args, **kw: self.events.append(event)


async def test_a_read_only_disk_degrades_then_recovers(
    small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_module, "RETRY_INTERVAL", 0.1)
    log = Events()
    monkeypatch.setattr(spool_module, "logger", log)
    sink = MemorySink()
    m = monitoring(small_disk, sink)
    spool = spool_of(m)
    remount(small_disk, "ro")
    try:
        await m.start()
        for i in range(10):
            m.emit(point(i))
        await until(lambda: spool.stats()["unspooled"] == 10)
        assert spool.degraded
        assert spool.folder is None
        await until(lambda: len(sink.points) == 10)  # the service goes on
        await asyncio.sleep(0.3)  # retried every 0.1 s here: still said once
        assert log.events.count("spool_unavailable") == 1
    finally:
        remount(small_disk, "rw")
    for i in range(10, 20):
        m.emit(point(i))
    await until(lambda: spool.counts["spooled"] == 10)
    assert not spool.degraded
    assert log.events.count("spool_available") == 1
    await m.close()
    assert len(sink.points) == 20


async def test_a_hanging_disk_neither_grows_memory_nor_holds_the_shutdown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    sink = MemorySink()
    m = monitoring(tmp_path, sink, buffer_size=100, batch_size=10)
    spool = spool_of(m)
    real = spool._io

    unblocked: list[bool] = []

    def hanging(*args: Any) -> Any:
        unblocked.append(release.wait(10))
        return real(*args)

    monkeypatch.setattr(spool, "_io", hanging)
    await m.start()
    try:
        for i in range(1000):
            m.emit(point(i))
            if i % 100 == 99:
                await until(lambda i=i: len(sink.points) == i + 1)
        await until(lambda: spool.stats()["unspooled"] >= 800)
        assert len(spool.pending) <= 100
        await m.close()  # within its deadline, though the disk still hangs
        assert unblocked == []
        assert len(sink.points) == 1000
    finally:
        release.set()


async def test_a_live_owner_is_never_adopted(tmp_path: Path) -> None:
    one = monitoring(tmp_path, DownSink())
    two_sink = MemorySink()
    two = monitoring(tmp_path, two_sink)
    await one.start()
    for i in range(10):
        one.emit(point(i))
    await until(lambda: spool_of(one).counts["spooled"] == 10)
    await two.start()
    two_spool = spool_of(two)
    await until(lambda: two_spool.folder is not None)
    two_spool._adopt_at = 0.0
    await until(lambda: two_spool._adopt_at > 0)
    await asyncio.sleep(0.3)
    assert two_spool.counts["adopted"] == 0
    assert two_sink.points == []
    await die(one)
    two_spool._adopt_at = 0.0
    await until(lambda: len(two_sink.points) == 10)
    assert two_spool.counts["adopted"] == 1
    await two.close()


async def test_read_only_or_vanished_folder_never_breaks_the_service(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    sink = MemorySink()
    m = monitoring(blocker / "spool", sink)  # a folder inside a file: ENOTDIR
    await m.start()
    for i in range(20):
        m.emit(point(i))
    await m.flush()
    spool = spool_of(m)
    await until(lambda: spool.stats()["unspooled"] == 20)
    assert spool.degraded
    assert len(sink.points) == 20
    await m.close()

    sink = MemorySink()
    m = monitoring(tmp_path / "spool", sink)
    await m.start()
    m.emit(point(0))
    spool = spool_of(m)
    await until(lambda: spool.counts["spooled"] == 1)
    import shutil

    shutil.rmtree(tmp_path / "spool")
    m.emit(point(1))
    await until(lambda: spool.counts["spooled"] == 2)
    assert spool.folder is not None
    assert spool.folder.exists()
    await m.close()
    assert len(sink.points) == 2


# --------------------------------------------------------------------------- processes

APP = HERE / "_spool_app.py"


def start_app(
    folder: Path, influx_port: int, db: str, port: int, **env: str
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(APP)],
        env={
            **os.environ,
            "SPOOL_DIR": str(folder),
            "SPOOL_INFLUX_PORT": str(influx_port),
            "SPOOL_DB": db,
            "SPOOL_PORT": str(port),
            **env,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_ready(port: int, proc: subprocess.Popen[str], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("the app did not start")


def requests(port: int, ids: Iterator[str] | list[str]) -> None:
    for rid in ids:
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/detector",
            data=b"{}",
            headers={"Luna-Request-Id": rid},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=5) as answer:
            answer.read()


def stop(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """SIGTERM, then the app's last line: its stats and spool stats."""
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)


def stored_ids(server: InfluxServer, db: str) -> list[str]:
    return [str(row["request_id"]) for row in server.rows('SELECT "request_id" FROM "request"', db)]


def wait_stored(server: InfluxServer, db: str, count: int, timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        ids = stored_ids(server, db)
        if len(ids) >= count or time.monotonic() > deadline:
            return ids
        time.sleep(0.1)


def serve_and_kill(folder: Path, db: str, ids: list[str]) -> None:
    """A service whose sink is down serves ``ids``, and is SIGKILLed just over 1 s later."""
    port = free_port()
    app = start_app(folder, free_port(), db, port)  # nothing listens there: the sink is down
    try:
        wait_ready(port, app)
        requests(port, ids)
        time.sleep(1.1)  # the guarantee: what was emitted more than 1 s before the kill
    finally:
        kill(app)
    assert owner_folders(folder), "the killed service left no spool"


def test_killed_service_restarted_delivers_every_point_once(
    influxd: InfluxServer, tmp_path: Path
) -> None:
    db = "spool_restart"
    influxd.query(f'CREATE DATABASE "{db}"')
    before = [f"before-{i}" for i in range(40)]
    serve_and_kill(tmp_path, db, before)
    dead = owner_folders(tmp_path)

    port = free_port()
    app = start_app(tmp_path, influxd.port, db, port)
    try:
        wait_ready(port, app)
        after = [f"after-{i}" for i in range(10)]
        requests(port, after)  # serving its own traffic while it delivers the dead one's
        ids = wait_stored(influxd, db, 50)
    finally:
        result = stop(app)
    assert sorted(ids) == sorted(before + after)  # every point, each once
    assert not any(folder.exists() for folder in dead)
    assert owner_folders(tmp_path) == []
    assert result["spool"]["adopted"] == 1
    assert result["spool"]["replayed"] >= 40  # the dead one's, and its startup point if any
    (stats,) = result["stats"].values()
    assert stats["emitted"] == stats["written"]


def test_killed_worker_is_adopted_by_exactly_one_live_worker(
    influxd: InfluxServer, tmp_path: Path
) -> None:
    db = "spool_workers"
    influxd.query(f'CREATE DATABASE "{db}"')
    ports = [free_port(), free_port()]
    live = [start_app(tmp_path, influxd.port, db, port) for port in ports]
    try:
        for port, proc in zip(ports, live, strict=True):
            wait_ready(port, proc)
        lost = [f"lost-{i}" for i in range(30)]
        serve_and_kill(tmp_path, db, lost)
        mine = [f"live-{i}" for i in range(10)]
        requests(ports[0], mine[:5])
        requests(ports[1], mine[5:])
        ids = wait_stored(influxd, db, 40)
    finally:
        results = [stop(proc) for proc in live]
    assert sorted(ids) == sorted(lost + mine)
    assert sorted(r["spool"]["adopted"] for r in results) == [0, 1]
    assert owner_folders(tmp_path) == []


async def _traffic(base: str, count: int) -> list[tuple[str, str]]:
    """``count`` requests over short-lived connections: (request id, worker pid) each."""
    import aiohttp

    semaphore = asyncio.Semaphore(8)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:

        async def one(i: int) -> tuple[str, str]:
            async with semaphore, session.post(f"{base}/detector") as response:
                await response.read()
                assert response.status == 201
                return response.headers["Luna-Request-Id"], response.headers["X-Worker"]

        return list(await asyncio.gather(*(one(i) for i in range(count))))


@pytest.mark.slow
def test_gunicorn_worker_sigkilled_its_points_delivered_once(
    influxd: InfluxServer, tmp_path: Path
) -> None:
    """RELIABILITY 40 under gunicorn (--preload: the workers fork after setup): a worker
    SIGKILLed with its points still buffered (flush_interval 30 s); a live or respawned
    worker adopts its spool; after the graceful stop every id is stored once."""
    db, port = "spool_gunicorn", free_port()
    influxd.query(f'CREATE DATABASE "{db}"')
    spool = tmp_path / "spool"
    env = {
        **os.environ,
        "REL_INFLUX_PORT": str(influxd.port),
        "REL_DB": db,
        "REL_PRELOAD": "1",
        "LUNAMON_SPOOL_DIR": str(spool),
    }
    argv = [
        sys.executable, "-m", "gunicorn",
        "--chdir", str(HERE),
        "--bind", f"127.0.0.1:{port}",
        "--workers", "2",
        "--worker-class", "aiohttp.GunicornWebWorker",
        "--graceful-timeout", "20",
        "--log-level", "warning",
        "--preload", "_rel_gunicorn_app:app",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        answers: list[tuple[str, str]] = []
        while len({pid for _, pid in answers}) < 2:  # both workers serving
            assert proc.poll() is None, "gunicorn exited while starting"
            assert time.monotonic() < deadline, "gunicorn did not start"
            with contextlib.suppress(OSError):
                answers += asyncio.run(_traffic(base, 20))
        killed = int(answers[0][1])
        time.sleep(1.1)  # the guarantee: what was emitted more than 1 s before the kill
        workers = set(owner_folders(spool))
        assert len(workers) == 2
        os.kill(killed, signal.SIGKILL)
        deadline = time.monotonic() + 30
        # Adopted (by the other worker or the one gunicorn starts instead), delivered,
        # then the dead worker's folder is removed: one of the two is left.
        while len(workers & set(owner_folders(spool))) != 1:
            assert time.monotonic() < deadline, owner_folders(spool)
            time.sleep(0.1)
        answers += asyncio.run(_traffic(base, 40))
        proc.send_signal(signal.SIGTERM)  # graceful stop: each worker drains
        assert proc.wait(timeout=40) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate()[0]
    ids = influxd.column('SELECT "request_id" FROM "request"', db, "request_id")
    assert sorted(map(str, ids)) == sorted(rid for rid, _ in answers), output[-3000:]
    assert any(pid == str(killed) for _, pid in answers)
    assert owner_folders(spool) == []
