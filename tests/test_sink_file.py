"""LineProtocolFileSink: the file parses back to the points, is appended to, and fsync'd."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from lunamon.errors import SinkError
from lunamon.lineprotocol import parse_line_protocol
from lunamon.point import Point
from lunamon.sinks.file import LineProtocolFileSink

T0 = 1_700_000_000_000_000_000


def points(start: int, count: int) -> list[Point]:
    return [
        Point(
            "request",
            T0 + start + i,
            {"route": "POST:/handlers/{handlerId}/events", "k": "a b,c=d\\e ü"},
            {
                "request_id": f'id "{i}"\nsecond line \\',
                "execution_time": 0.5 + i,
                "n": i,
                "ok": bool(i % 2),
            },
        )
        for i in range(count)
    ]


async def test_file_parses_back_to_the_points(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dirs" / "points.lp"
    sink = LineProtocolFileSink(path)
    await sink.start()
    first, second = points(0, 3), points(3, 1200)
    await sink.write(first)
    await sink.write(second)
    await sink.write([])
    await sink.close()
    assert parse_line_protocol(path.read_text()) == first + second


async def test_appends_to_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "points.lp"
    for start in (0, 10):
        sink = LineProtocolFileSink(str(path))
        await sink.write(points(start, 2))  # opens lazily without start()
        await sink.close()
    assert parse_line_protocol(path.read_text()) == points(0, 2) + points(10, 2)


@pytest.mark.parametrize("fsync", [True, False])
async def test_fsync_after_each_batch_and_on_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsync: bool
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.fstat(fd).st_size)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    path = tmp_path / "points.lp"
    sink = LineProtocolFileSink(path, fsync=fsync)
    await sink.start()
    await sink.write(points(0, 2))
    size_after_first = path.stat().st_size
    await sink.write(points(2, 2))
    await sink.close()
    size = path.stat().st_size
    if fsync:
        assert synced == [size_after_first, size, size]
    else:
        assert synced == [size]


async def test_a_failed_write_leaves_no_torn_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "points.lp"
    sink = LineProtocolFileSink(path)
    await sink.write(points(0, 2))
    real_write = os.write
    calls = 0

    def disk_fills_up(fd: int, data: bytes | memoryview) -> int:
        # The first call gets half the batch onto the disk, the next finds it full.
        nonlocal calls
        calls += 1
        if calls == 1:
            return real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", disk_fills_up)
    with pytest.raises(OSError, match="No space left"):
        await sink.write(points(2, 3))
    monkeypatch.undo()
    assert parse_line_protocol(path.read_text()) == points(0, 2)
    await sink.write(points(2, 3))  # the flusher's retry
    await sink.close()
    assert parse_line_protocol(path.read_text()) == points(0, 2) + points(2, 3)


async def test_write_after_close_is_not_retryable(tmp_path: Path) -> None:
    sink = LineProtocolFileSink(tmp_path / "p.lp")
    await sink.start()
    await sink.close()
    await sink.close()  # idempotent
    with pytest.raises(SinkError) as caught:
        await sink.write(points(0, 1))
    assert not caught.value.retryable


async def test_unwritable_path_raises_oserror(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    sink = LineProtocolFileSink(blocker / "below" / "p.lp")
    with pytest.raises(NotADirectoryError):
        await sink.start()
    await sink.close()


def test_name_and_repr(tmp_path: Path) -> None:
    assert LineProtocolFileSink(tmp_path / "p.lp").name == "file"
    sink = LineProtocolFileSink(tmp_path / "p.lp", name="archive")
    assert sink.name == "archive"
    assert "p.lp" in repr(sink)
