"""Crash-safe delivery (``spool_dir``): what a process has not delivered, kept on disk.

Each process owns one folder ``spool_dir/<owner>/`` (``owner``: random hex, new in a
forked child) and holds an exclusive ``flock`` on its ``lock`` file for its whole
life. A lock dies with its process, SIGKILL included, and unlike a pid it is never
reused: a folder whose lock another process can take belongs to a dead process.

Points get a sequence number in the order they are emitted. ``emit`` appends the
point to :attr:`Spool.pending` (one list append); every :data:`TICK` seconds a
thread encodes what waits as line protocol and appends ONE record to the current
segment file::

    magic "LMS1" | payload length u32 | points u32 | first sequence number u64 | crc32 u32
    payload: the points, line protocol (lunamon.point's encoder; lunamon.lineprotocol reads it)

The crc covers the lengths, the sequence number and the payload: a torn tail
(a crash or a full disk in the middle of a write) or a damaged record fails it and is
skipped and counted, never replayed. Segments rotate at :func:`segment_bytes`; a
written record survives SIGKILL at once (the page cache is the kernel's), and is
``fsync``-ed within :data:`FSYNC_INTERVAL` against a power loss.

Per sink, the flusher's channel is FIFO, so "every point before the oldest one still
buffered or in flight is done" (written, or dropped and counted) gives a done prefix:
:meth:`lunamon.flusher.Flusher.fronts`. The spool writes these positions (as its own
sequence numbers, by sink name) to ``acks`` (write, rename) each tick; segments
wholly below every sink's ack are deleted. A clean shutdown that delivered everything
removes the folder.

Adoption: at start and every :data:`ADOPT_INTERVAL` seconds a process tries the lock
of every other folder. One it can lock is a dead process's: it reads the records
from each sink's ack on, emits them into its own flusher, only to the sinks (by name)
that had not stored them, and paced (at most half a sink's buffer waits), keeps the
folder locked and its ``acks`` current while they are delivered, then removes it. If
the adopter dies too, the next process resumes from those acks.

What a replay sends twice at most: the points a sink stored in the last tick before
the kill (their ack was not written yet), and a batch in flight at the kill. InfluxDB
overwrites a point with the same series and time, so it stores each once. Before
replaying, the spool calls ``sink.mark_possibly_stored(points)`` when a sink has it (a
sink that can check what it holds, as ClickHouse's). Plugins and other sinks without
it get replayed points at least once.

The spool protects against a crash, it does not extend the buffer: a point the
flusher dropped (``overflow``, ``rejected``, ``retry_exhausted``) is done, as without
a spool. A dead process's points are replayed neither to the metrics sink (its counts
were its own) nor to a sink whose ``spool_replay`` attribute is False.

Bounds and failures: past ``spool_max_bytes`` the oldest segments are deleted and
their points not yet done counted (``evicted``): they are still delivered from
memory, they only lose their protection against a crash. A disk that is full,
read-only, gone or hanging never breaks or slows the service: the writes run in a
thread, at most ``buffer_size`` points wait for it, and the spool logs once, counts
what it could not keep (``unspooled``), behaves as without a spool and tries again
every :data:`RETRY_INTERVAL` seconds.

Shutdown: ``close`` writes what waits, lets the flusher drain within
``shutdown_timeout``, then records what is left: the flusher counts it dropped
(``shutdown``, so ``emitted == written + sum(dropped) + buffered`` holds as before)
and the next process with the same ``spool_dir`` delivers it. A clean exit with
nothing left removes the folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import struct
import time
import weakref
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from lunamon._log import RateLimitedLogger, logger
from lunamon.errors import LineProtocolError
from lunamon.lineprotocol import parse_line_protocol
from lunamon.point import Point, encode_lines

if TYPE_CHECKING:
    from lunamon.flusher import Flusher

__all__ = [
    "ADOPT_INTERVAL",
    "FSYNC_INTERVAL",
    "Spool",
    "encode_record",
    "read_segment",
    "segment_bytes",
]

MAGIC: Final = b"LMS1"
_HEADER: Final = struct.Struct("<4sIIQI")
_CHECKED: Final = struct.Struct("<IIQ")  # the header fields the crc covers
HEADER_SIZE: Final = _HEADER.size

TICK: Final = 0.25  # seconds between two writes of what waits
FSYNC_INTERVAL: Final = 1.0  # seconds: what a power loss may cost (a SIGKILL costs nothing)
ADOPT_INTERVAL: Final = 2.0  # seconds between two looks for dead processes' folders
RETRY_INTERVAL: Final = 5.0  # seconds between two attempts after a disk error
_SEGMENT_MAX: Final = 4 << 20
_SEGMENT_MIN: Final = 4096
_SUFFIX: Final = ".seg"
_ACKS: Final = "acks"
_LOCK: Final = "lock"
_NEW: Final = ".new-"  # a folder being created: never adopted
_ABANDONED_AFTER: Final = 60.0  # seconds after which an unfinished new folder is removed

_Record = tuple[int, list[Point]]  # first sequence number, points


def segment_bytes(max_bytes: int) -> int:
    """The size at which a segment rotates: an eighth of the bound, 4 KiB to 4 MiB."""
    return max(_SEGMENT_MIN, min(_SEGMENT_MAX, max_bytes // 8))


def _crc(payload: bytes, count: int, first: int) -> int:
    return zlib.crc32(payload, zlib.crc32(_CHECKED.pack(len(payload), count, first)))


def encode_record(first: int, points: Sequence[Point]) -> bytes:
    """One record: header and the points as line protocol."""
    payload = encode_lines(list(points))
    count = len(points)
    return _HEADER.pack(MAGIC, len(payload), count, first, _crc(payload, count, first)) + payload


def read_segment(data: bytes) -> tuple[list[_Record], int]:
    """The records of a segment, and how many were skipped (torn, damaged)."""
    records: list[_Record] = []
    bad = 0
    pos, size = 0, len(data)
    while pos < size:
        if size - pos < HEADER_SIZE:
            return records, bad + 1
        magic, length, count, first, crc = _HEADER.unpack_from(data, pos)
        end = pos + HEADER_SIZE + length
        if magic != MAGIC or end > size:  # a torn tail, or lost in garbage: nothing to trust
            return records, bad + 1
        payload = data[pos + HEADER_SIZE : end]
        pos = end
        if crc != _crc(payload, count, first):
            bad += 1
            continue
        try:
            points = parse_line_protocol(payload.decode())
        except (UnicodeDecodeError, LineProtocolError):
            bad += 1
            continue
        if len(points) != count:
            bad += 1
            continue
        records.append((first, points))
    return records, bad


def _segments(folder: Path) -> list[tuple[int, Path]]:
    """A folder's segments, oldest first, by their first sequence number."""
    found = []
    for path in folder.iterdir():
        if path.name.endswith(_SUFFIX) and path.name[: -len(_SUFFIX)].isdigit():
            found.append((int(path.name[: -len(_SUFFIX)]), path))
    return sorted(found)


def _try_lock(path: Path) -> int | None:
    """An fd holding the exclusive lock on ``path``, or None (held by a live process)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _write_json(path: Path, data: Any, sync: bool = False) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        json.dump(data, out)
        if sync:
            out.flush()
            os.fsync(out.fileno())
    os.replace(tmp, path)


def _read_acks(folder: Path) -> dict[str, int] | None:
    try:
        data = json.loads((folder / _ACKS).read_text(encoding="utf-8"))
        sinks = data["sinks"]
        return {str(k): int(v) for k, v in sinks.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _close(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


@dataclass(eq=False)
class _Adopted:
    """A dead process's folder this process delivers."""

    path: Path
    lock: int
    acks: dict[str, int]  # per sink name: the first sequence number not yet done
    fed: dict[str, int]  # per sink name: the next sequence number to emit
    segments: list[Path]  # not loaded yet
    records: deque[_Record] = field(default_factory=deque)
    written_acks: dict[str, int] = field(default_factory=dict)


@dataclass(eq=False, slots=True)
class _Interval:
    """Adopted points emitted to one sink: channel positions [start, start+n)."""

    start: int
    count: int
    first: int  # the sequence number (in `owner`) of the first
    owner: _Adopted


_live: weakref.WeakSet[Spool] = weakref.WeakSet()


def _reset_in_child() -> None:
    for spool in list(_live):
        spool._reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_in_child)


class Spool:
    """One process's spool in ``directory``, mirroring what ``flusher`` delivers."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        max_bytes: int,
        flusher: Flusher,
        replays: Callable[[Any], bool] = lambda sink: True,
    ) -> None:
        self.directory = Path(directory)
        # Whether a sink gets a dead process's points (not the Prometheus metrics: the
        # dead process's counts are its own, and a scrape may have taken them already).
        self.replays = replays
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes(max_bytes)
        self.flusher = flusher
        self.pending: list[Point] = []
        self._log = RateLimitedLogger(interval=300.0)
        self.counts = dict.fromkeys(
            ("spooled", "unspooled", "evicted", "torn", "adopted", "replayed", "unmatched"), 0
        )
        self._task: asyncio.Task[None] | None = None
        self._ticking: asyncio.Future[None] | None = None
        self._trimmed = 0
        self._closed = False
        _live.add(self)
        self._init_state()

    def _init_state(self) -> None:
        self.owner = secrets.token_hex(8)
        self.folder: Path | None = None
        self.seq = 0  # the sequence number of pending[0]
        # Per sink name: channel position of own point s = s + base + adopted points before it.
        self._base = dict(self.flusher.positions())
        self._intervals: dict[str, deque[_Interval]] = {name: deque() for name in self._base}
        self._lock: int | None = None
        self._segment: int | None = None  # fd of the segment being written
        self._segment_size = 0
        self._segments: list[tuple[int, Path, int]] = []  # first seq, path, size
        self._bytes = 0
        self._written_acks: dict[str, int] = {}
        self._end = 0  # the sequence number after the last point written
        self._synced_at = time.monotonic()
        self._dirty = False
        self._retry_at = 0.0
        self._adopt_at = 0.0
        self._adopted: list[_Adopted] = []
        self.degraded = False

    def _reset_after_fork(self) -> None:
        # The parent's folder, locks and points are the parent's: a child starts afresh.
        for fd in (self._lock, self._segment, *(a.lock for a in self._adopted)):
            _close(fd)
        self.pending.clear()
        self._task = self._ticking = None
        self._init_state()

    # ------------------------------------------------------------------ emit

    def wrap(self, emit: Callable[[Point], None]) -> Callable[[Point], None]:
        """``emit`` that also keeps the point for the spool (one list append)."""
        append = self.pending.append

        def spooled_emit(point: Point) -> None:
            emit(point)
            append(point)

        return spooled_emit

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._task is None and not self._closed:
            self._task = asyncio.create_task(self._run(), name="lunamon:spool")

    async def _run(self) -> None:
        while True:
            self._ticking = tick = asyncio.ensure_future(self._tick())
            while True:
                done, _ = await asyncio.wait({tick}, timeout=4 * TICK)
                if done:
                    break
                self._trim()  # the disk hangs: what waits must not grow without bound
            try:
                tick.result()
            except Exception as exc:  # never let the spool take the service down
                self._log.log("error", "spool_failed", key="tick", error=repr(exc)[:1024])
            await asyncio.sleep(TICK)

    def _trim(self) -> None:
        """Forget the oldest waiting points beyond ``buffer_size``; counted ``unspooled``."""
        excess = len(self.pending) - self.flusher.policy.buffer_size
        if excess > 0:
            del self.pending[:excess]
            self.seq += excess
            self._trimmed += excess  # not `counts`: the disk thread adds to those

    async def close(self, close_flusher: Callable[[], Any]) -> None:
        """Write what waits, close the flusher (``close_flusher``), keep what it could not
        deliver for the next process; remove the folder when nothing is left."""
        if self._closed:
            await close_flusher()
            return
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # A disk that hangs must not hold the shutdown: bounded by the flusher's deadline.
        deadline = self.flusher.policy.shutdown_timeout
        ticking, self._ticking = self._ticking, None
        stuck = False
        if ticking is not None and not ticking.done():  # its thread must end first
            await asyncio.wait({ticking}, timeout=deadline)
            stuck = not ticking.done()
        if not stuck:
            try:
                await asyncio.wait_for(self._tick(feed=False), deadline)
            except asyncio.TimeoutError:
                stuck = True
            except Exception as exc:
                logger.error("spool_close_failed", error=repr(exc)[:1024])
        before = self.flusher.stats()
        await close_flusher()
        # What close() drained is done; what it dropped at the deadline (`shutdown`) is
        # not, and what came after it began (`after_close`) was never spooled: the
        # points after the last done one.
        fronts = {}
        for name, after in self.flusher.stats().items():
            dropped, dropped0 = after["dropped"], before[name]["dropped"]
            late = dropped["after_close"] - dropped0["after_close"]
            left = dropped["shutdown"] - dropped0["shutdown"]
            fronts[name] = after["emitted"] - late - left
        self.pending.clear()
        if stuck:
            logger.warning("spool_stuck_at_close", folder=str(self.folder))
            return
        try:
            await asyncio.wait_for(asyncio.to_thread(self._final, self._advance(fronts)), deadline)
        except Exception as exc:
            logger.error("spool_close_failed", error=repr(exc)[:1024])

    def stats(self) -> dict[str, Any]:
        """``spooled``: points written to disk; ``unspooled``: not written (disk errors,
        a disk too slow); ``evicted``: deleted past ``spool_max_bytes``; ``torn``: records
        skipped when reading (torn, damaged); ``adopted``: dead processes' folders taken
        over; ``replayed``: their points emitted again; ``unmatched``: their points for a
        sink this process does not have; ``bytes``: this process's segments."""
        return {
            **self.counts,
            "unspooled": self.counts["unspooled"] + self._trimmed,
            "bytes": self._bytes,
            "degraded": self.degraded,
            "folder": str(self.folder) if self.folder else None,
        }

    # ------------------------------------------------------------------ one tick

    async def _tick(self, feed: bool = True) -> None:
        self._trim()  # the disk fell behind: what it cannot take is not kept
        points = self.pending[:]
        del self.pending[: len(points)]
        first = self.seq
        self.seq += len(points)
        acks = self._advance(self.flusher.fronts())
        now = time.monotonic()
        scan = feed and now >= self._adopt_at
        if scan:
            self._adopt_at = now + ADOPT_INTERVAL
        loaded = await asyncio.to_thread(self._io, first, points, acks, scan)
        if feed:
            self._feed(loaded)

    def _advance(self, fronts: dict[str, int]) -> dict[str, int]:
        """Own acks per sink from the channels' fronts; adopted folders' acks updated."""
        acks = {}
        for name, front in fronts.items():
            intervals = self._intervals.setdefault(name, deque())
            base = self._base.setdefault(name, 0)
            while intervals and front >= intervals[0].start + intervals[0].count:
                done = intervals.popleft()
                done.owner.acks[name] = done.first + done.count
                base += done.count
            self._base[name] = base
            partial = 0
            for interval in intervals:
                if front <= interval.start:
                    break
                ahead = front - interval.start
                interval.owner.acks[name] = interval.first + ahead
                partial += ahead
            acks[name] = max(0, front - base - partial)
        return acks

    # ------------------------------------------------------------------ disk (a thread)

    def _io(self, first: int, points: list[Point], acks: dict[str, int], scan: bool) -> list[Any]:
        """Everything that touches the disk, run in a thread: never raises."""
        now = time.monotonic()
        usable = now >= self._retry_at and (
            (self.folder is not None and self._alive()) or self._guard(self._open, "open")
        )
        if not usable:
            self.counts["unspooled"] += len(points)
            points = []
        if points and self.folder is not None:
            if self._guard(lambda: self._append(first, points), "write"):
                self.counts["spooled"] += len(points)
            else:
                self.counts["unspooled"] += len(points)
        if self.folder is not None:
            self._guard(lambda: self._housekeep(acks, now), "acks")
        for adopted in list(self._adopted):
            self._guard(lambda a=adopted: self._keep_adopted(a), "adopted")  # type: ignore[misc]
        loaded: list[Any] = []
        if scan:
            loaded.extend(self._scan())
        for adopted in self._adopted:
            if not adopted.records and adopted.segments:
                self._load(adopted)
        return loaded

    def _guard(self, action: Callable[[], None], what: str) -> bool:
        try:
            action()
        except OSError as exc:
            if what == "adopted":  # a dead process's folder: this one's own spool goes on
                self._log.log("warning", "spool_adopted_failed", key=what, error=repr(exc)[:1024])
                return False
            if not self.degraded:
                logger.warning(
                    "spool_unavailable",
                    what=what,
                    folder=str(self.directory),
                    error=repr(exc)[:1024],
                    note="delivery goes on from memory; a crash now loses what is buffered",
                )
            self.degraded = True
            self._retry_at = time.monotonic() + RETRY_INTERVAL
            _close(self._segment)
            self._segment = None
            if what in ("open",) or exc.errno in (errno.ENOENT, errno.ESTALE):
                self._drop_folder()
            return False
        if self.degraded and what == "write":
            logger.info("spool_available", folder=str(self.folder))
            self.degraded = False
        return True

    def _alive(self) -> bool:
        """Whether our folder is still there (a removed folder is made anew)."""
        try:
            assert self._lock is not None
            if os.fstat(self._lock).st_nlink:
                return True
        except (OSError, AssertionError):
            pass
        self._drop_folder()
        return False

    def _drop_folder(self) -> None:
        _close(self._segment)
        _close(self._lock)
        self._segment = self._lock = None
        self.folder = None
        self._segments, self._bytes = [], 0
        self._written_acks = {}

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.owner = secrets.token_hex(8)
        new = self.directory / f"{_NEW}{self.owner}"
        new.mkdir()
        try:
            lock = os.open(new / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            acks = dict.fromkeys(self._base, 0)
            _write_json(new / _ACKS, {"sinks": acks})
            # Named only once locked: a folder without a live lock is a dead process's.
            os.rename(new, self.directory / self.owner)
        except OSError:
            shutil.rmtree(new, ignore_errors=True)
            raise
        self._lock = lock
        self.folder = self.directory / self.owner
        self._written_acks = acks

    def _append(self, first: int, points: list[Point]) -> None:
        assert self.folder is not None
        if self._segment is None or self._segment_size >= self.segment_bytes:
            self._rotate(first)
        assert self._segment is not None
        record = encode_record(first, points)
        view = memoryview(record)
        try:
            while view:
                view = view[os.write(self._segment, view) :]
        except OSError:
            # A torn record would hide the rest of the segment: cut it off.
            with contextlib.suppress(OSError):
                os.ftruncate(self._segment, self._segment_size)
            raise
        self._segment_size += len(record)
        self._end = first + len(points)
        self._bytes += len(record)
        first_seq, path, _ = self._segments[-1]
        self._segments[-1] = (first_seq, path, self._segment_size)
        self._dirty = True

    def _rotate(self, first: int) -> None:
        assert self.folder is not None
        if self._segment is not None:
            os.fsync(self._segment)
            _close(self._segment)
            self._segment = None
        path = self.folder / f"{first:020d}{_SUFFIX}"
        self._segment = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self._segment_size = 0
        self._segments.append((first, path, 0))

    def _evict(self, done: int) -> None:
        """Past ``max_bytes``: delete the oldest segments (not the one being written),
        counting their points not yet done (``done``: the lowest ack)."""
        while self._bytes > self.max_bytes and len(self._segments) > 1:
            first, path, size = self._segments.pop(0)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            self._bytes -= size
            self.counts["evicted"] += max(0, self._segments[0][0] - max(first, done))
            self._log.log("warning", "spool_full", key="evict", max_bytes=self.max_bytes)
        if self._bytes > self.max_bytes and self._segment_size:
            self._segment_size = self.segment_bytes  # rotate next time: then it can go

    def _housekeep(self, acks: dict[str, int], now: float) -> None:
        if self._segment is not None and self._dirty and now - self._synced_at >= FSYNC_INTERVAL:
            os.fsync(self._segment)
            self._synced_at, self._dirty = now, False
        if acks != self._written_acks and self.folder is not None:
            _write_json(self.folder / _ACKS, {"sinks": acks})
            self._written_acks = acks
        done = min(acks.values(), default=0)
        while len(self._segments) > 1 and self._segments[1][0] <= done:
            _, path, size = self._segments.pop(0)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            self._bytes -= size
        self._evict(done)

    def _final(self, acks: dict[str, int]) -> None:
        """At close: everything done removes the folder; else acks synced, locks released."""
        for adopted in list(self._adopted):
            with contextlib.suppress(OSError):
                self._keep_adopted(adopted)
            if adopted in self._adopted:
                _write_json_quiet(adopted.path / _ACKS, {"sinks": adopted.acks})
                _close(adopted.lock)
        self._adopted = []
        if self.folder is None:
            return
        try:
            if all(ack >= self._end for ack in acks.values()) or not self._segments:
                shutil.rmtree(self.folder, ignore_errors=True)
            else:
                if self._segment is not None:
                    os.fsync(self._segment)
                _write_json(self.folder / _ACKS, {"sinks": acks}, sync=True)
        finally:
            _close(self._segment)
            _close(self._lock)
            self._segment = self._lock = None

    # ------------------------------------------------------------------ adoption

    def _scan(self) -> list[_Adopted]:
        """Lock every folder whose owner is dead; the newly adopted."""
        found: list[_Adopted] = []
        try:
            entries = list(self.directory.iterdir())
        except OSError:
            return found
        mine = {self.owner, *(a.path.name for a in self._adopted)}
        for entry in entries:
            if entry.name in mine or entry.name.startswith("."):
                if entry.name.startswith(_NEW):
                    self._remove_abandoned(entry)
                continue
            fd = _try_lock(entry / _LOCK)
            if fd is None:
                continue
            try:
                if os.fstat(fd).st_nlink == 0:  # removed by the adopter that just finished
                    _close(fd)
                    continue
                acks = _read_acks(entry)
                if acks is None:
                    acks = dict.fromkeys(self._base, 0)
                adopted = _Adopted(
                    path=entry,
                    lock=fd,
                    acks=dict(acks),
                    fed=dict(acks),
                    segments=[p for _, p in _segments(entry)],
                    written_acks=dict(acks),
                )
            except OSError:
                _close(fd)
                continue
            self.counts["adopted"] += 1
            logger.info("spool_adopted", folder=str(entry), sinks=sorted(acks))
            self._adopted.append(adopted)
            found.append(adopted)
        return found

    def _remove_abandoned(self, entry: Path) -> None:
        """A folder its creator never finished (killed while making it)."""
        try:
            if time.time() - entry.stat().st_mtime < _ABANDONED_AFTER:
                return  # maybe being made right now
        except OSError:
            return
        fd = _try_lock(entry / _LOCK)
        if fd is not None:
            shutil.rmtree(entry, ignore_errors=True)
            _close(fd)

    def _load(self, adopted: _Adopted) -> None:
        """The next segment of an adopted folder, its records past every ack."""
        path = adopted.segments.pop(0)
        try:
            records, bad = read_segment(path.read_bytes())
        except OSError:
            records, bad = [], 1
        if bad:
            self.counts["torn"] += bad
            logger.warning("spool_records_skipped", segment=str(path), count=bad)
        low = min(adopted.acks.values(), default=0)
        adopted.records.extend(r for r in records if r[0] + len(r[1]) > low)

    def _keep_adopted(self, adopted: _Adopted) -> None:
        """Write an adopted folder's acks; remove it once every point was delivered."""
        busy = any(i.owner is adopted for q in self._intervals.values() for i in q)
        if not busy and not adopted.records and not adopted.segments:
            shutil.rmtree(adopted.path, ignore_errors=True)
            _close(adopted.lock)
            self._adopted.remove(adopted)
            logger.info("spool_adopted_done", folder=str(adopted.path))
            return
        if adopted.acks != adopted.written_acks:
            _write_json(adopted.path / _ACKS, {"sinks": adopted.acks})
            adopted.written_acks = dict(adopted.acks)

    def _feed(self, loaded: list[_Adopted]) -> None:
        """Emit adopted points to the sinks that had not stored them, as room allows."""
        flusher = self.flusher
        names = set(flusher.positions())
        skipped = {name for name in names if not self.replays(flusher.sink(name))}
        for adopted in self._adopted:
            unknown = [name for name in adopted.acks if name not in names]
            if unknown and adopted in loaded:
                logger.warning("spool_sinks_unknown", folder=str(adopted.path), sinks=unknown)
            records = adopted.records
            while records:
                first, points = records[0]
                end = first + len(points)
                for name in adopted.fed:
                    fed = max(adopted.fed[name], first)  # records may have gaps (torn)
                    if fed >= end:
                        continue
                    part = points[fed - first :]
                    if name not in names or name in skipped:
                        if name not in skipped:
                            self.counts["unmatched"] += len(part)
                        adopted.fed[name] = adopted.acks[name] = end
                        continue
                    room = flusher.room(name)
                    if room <= 0:
                        continue
                    part = part[:room]
                    _mark_possibly_stored(flusher.sink(name), part)
                    start = flusher.emit_to(name, part)
                    self._intervals.setdefault(name, deque()).append(
                        _Interval(start, len(part), fed, adopted)
                    )
                    adopted.fed[name] = fed + len(part)
                    self.counts["replayed"] += len(part)
                if all(fed >= end for fed in adopted.fed.values()):
                    records.popleft()
                else:
                    break


def _mark_possibly_stored(sink: Any, points: list[Point]) -> None:
    hook = getattr(sink, "mark_possibly_stored", None)
    if hook is None:
        return
    try:
        hook(points)
    except Exception as exc:
        logger.error("mark_possibly_stored_failed", error=repr(exc)[:1024])


def _write_json_quiet(path: Path, data: Any) -> None:
    with contextlib.suppress(OSError):
        _write_json(path, data, sync=True)
