"""A sink appending line protocol to a file: replayable later with ``influx -import``
or ``curl --data-binary @file``, and readable by ``lunamon report``."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from lunamon.errors import SinkError
from lunamon.point import Point, encode_lines_async

__all__ = ["LineProtocolFileSink"]


class LineProtocolFileSink:
    """Appends one line per point to ``path`` (parent folders are created).

    File IO runs in a worker thread, never on the event loop. With ``fsync``
    each batch is on disk when :meth:`write` returns; the file is fsync'd on
    :meth:`close` either way. A batch that fails half-way is cut off again, so
    a retried batch never follows a torn line.

    :param path: the file appended to
    :param fsync: fsync after every batch
    :param name: the sink's name in ``stats()`` and logs
    """

    def __init__(
        self, path: str | os.PathLike[str], *, fsync: bool = True, name: str | None = None
    ):
        self.path = Path(path)
        self.fsync = fsync
        self.name = name or "file"
        self._fd: int | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"LineProtocolFileSink(name={self.name!r}, path={str(self.path)!r}, fsync={self.fsync})"
        )

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        return os.open(self.path, flags, 0o644)

    async def _descriptor(self) -> int:
        if self._closed:
            raise SinkError(f"write to {self.path} failed: the sink is closed", retryable=False)
        if self._fd is None:
            self._fd = await asyncio.to_thread(self._open)
        return self._fd

    async def start(self) -> None:
        """Create the parent folders and open the file for appending."""
        self._closed = False
        async with self._lock:
            await self._descriptor()

    async def write(self, points: Sequence[Point]) -> None:
        """Append the batch (and fsync it when configured)."""
        if not points:
            return
        batch = points if isinstance(points, (list, tuple)) else list(points)
        body = await encode_lines_async(batch)
        async with self._lock:
            fd = await self._descriptor()
            await asyncio.to_thread(_append, fd, body, self.fsync)

    async def close(self) -> None:
        """fsync and close the file; later writes raise a non-retryable :class:`SinkError`."""
        async with self._lock:
            self._closed = True
            fd, self._fd = self._fd, None
            if fd is not None:
                await asyncio.to_thread(_sync_and_close, fd)


def _append(fd: int, body: bytes, fsync: bool) -> None:
    start = os.lseek(fd, 0, os.SEEK_END)
    view = memoryview(body)
    try:
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if fsync:
            os.fsync(fd)
    except OSError:
        # Disk full or similar: remove the part that got in, so that the retried
        # batch starts on a fresh line.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, start)
        raise


def _sync_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
