"""Bounded, batched, asynchronous delivery of points to sinks.

``emit`` is synchronous and O(1): it appends to one bounded buffer per sink and
never awaits or raises. One task per sink takes batches out (every
``flush_interval``, or as soon as ``batch_size`` points wait), keeps one write
in flight, retries what may be retried with capped exponential backoff and
jitter (honouring ``Retry-After``), splits batches the server finds too large,
and accounts for every point::

    emitted == written + sum(dropped.values()) + buffered      (per sink, always)
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import math
import os
import random
import sys
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import aiohttp

from lunamon._backlog import PACK_RUN, PackedPoints
from lunamon._log import RateLimitedLogger, logger
from lunamon.errors import BatchTooLarge, SinkError
from lunamon.point import Point, compiled_speedups
from lunamon.sinks.base import Sink, sink_name

if sys.version_info >= (3, 11):
    from asyncio import timeout as _timeout
else:  # pragma: no cover - aiohttp brings async_timeout on 3.10
    from async_timeout import timeout as _timeout  # type: ignore[import-not-found,unused-ignore]

__all__ = ["DROP_REASONS", "FlushPolicy", "Flusher", "SinkStats"]

DROP_REASONS: Final = ("overflow", "rejected", "retry_exhausted", "shutdown", "after_close")

# Exceptions of a sink that mean "try again later" (network trouble).
_TRANSIENT: Final = (OSError, asyncio.TimeoutError, aiohttp.ClientError, ConnectionError)

SinkStats = dict[str, Any]

# Points freed per loop turn after a successful write.
_FREE_SLICE: Final = 500

# Points that tests capture with `lunamon.testing` (empty, and free, otherwise).
_taps: list[list[Point]] = []


@dataclass(frozen=True, slots=True)
class FlushPolicy:
    """How points are batched, retried and drained: the flusher's part of the settings.

    Built by :meth:`lunamon.MonitoringSettings.flush_policy`, which checks the
    values and holds the defaults; nothing is checked or defaulted here.
    """

    flush_interval: float
    batch_size: int
    buffer_size: int
    shutdown_timeout: float
    write_timeout: float
    max_retries: int
    retry_base_delay: float
    retry_max_delay: float


class _ChannelFields:
    """What emit reads and writes of a channel, in Python: the reference of the compiled
    ``ChannelCore`` (``lunamon._speedups``), which ``_Channel`` subclasses when it is
    built, so that its ``Emitter`` reads and writes them in C."""

    __slots__ = ("buffer", "capacity", "closed", "emitted", "packed", "wake_at")

    buffer: deque[Point | PackedPoints]
    capacity: int
    closed: bool
    emitted: int
    packed: int
    wake_at: int


_core = compiled_speedups()
# Flusher.emit compiled for the common point (None: the Python method is all there is).
_Emitter: Any = _core.Emitter if _core is not None else None
if TYPE_CHECKING:
    _ChannelBase = _ChannelFields
else:
    _ChannelBase = _core.ChannelCore if _core is not None else _ChannelFields


class _Channel(_ChannelBase):
    """One sink, its buffer and its counters."""

    # Slots: emit() reads a few of these per request; no instance dict to go through.
    __slots__ = (
        "attempts",
        "backing_off",
        "batch_size",
        "buffer_size",
        "dropped",
        "failing",
        "inflight",
        "inflight_at",
        "lock",
        "mark",
        "name",
        "pack_at",
        "retries",
        "retry_after",
        "sink",
        "task",
        "wake",
        "written",
    )

    def __init__(self, sink: Sink, name: str, policy: FlushPolicy) -> None:
        self.sink = sink
        self.name = name
        # Points, and runs of points packed (PackedPoints) while the sink fails and more
        # than a batch waits: len(buffer) + packed points are buffered (packed: the points
        # inside the runs beyond the one entry each takes in the deque).
        self.buffer = deque()
        self.packed = 0
        self.closed = False  # the flusher is closed: emit counts points as after_close
        # While the sink fails, pack the points appended since `mark` (an `emitted` count)
        # once this many wait. A sink that keeps up, or only lags, never pays for it.
        self.pack_at = policy.batch_size + PACK_RUN
        self.mark = 0
        self.buffer_size = policy.buffer_size
        self.capacity = policy.buffer_size  # buffer_size minus the batch in flight
        self.batch_size = policy.batch_size  # shrinks after a 413
        # A point arriving with this many already buffered completes a batch: wake the task.
        self.wake_at = policy.batch_size - 1
        self.inflight: list[Point] | None = None
        self.inflight_at = 0  # position (an `emitted` count) of the batch in flight's first
        self.attempts = 0
        self.retry_after: float | None = None
        self.backing_off = False
        self.emitted = 0
        self.written = 0
        self.retries = 0
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        # While the sink fails: (monotonic time of the first failure, points dropped by
        # then), for the one "recovered" line when a write succeeds again.
        self.failing: tuple[float, int] | None = None
        self.wake: asyncio.Event | None = None
        self.lock: asyncio.Lock | None = None
        self.task: asyncio.Task[None] | None = None

    def buffered(self) -> int:
        return len(self.buffer) + self.packed + (len(self.inflight) if self.inflight else 0)

    def front(self) -> int:
        """The position (in emission order, an ``emitted`` count) of the oldest point not
        yet done (written, or dropped and counted): every point before it is done. The
        buffer is FIFO; a batch in flight counts from its first point until it is done."""
        front = self.emitted - len(self.buffer) - self.packed
        if self.inflight is not None:
            return min(self.inflight_at, front - len(self.inflight))
        return front

    def clear(self) -> None:
        """Forget every buffered point (not the batch in flight)."""
        self.buffer.clear()
        self.packed = 0
        self.mark = self.emitted

    def drop_oldest(self) -> None:
        """Drop the oldest buffered point (the buffer is not empty)."""
        first = self.buffer[0]
        if type(first) is PackedPoints and len(first) > 1:
            first.skip()
            self.packed -= 1
        else:
            self.buffer.popleft()

    def take(self, size: int) -> list[Point]:
        """The ``size`` oldest buffered points, out of the buffer."""
        buffer = self.buffer
        batch: list[Point] = []
        while len(batch) < size:
            first = buffer[0]
            if type(first) is not PackedPoints:
                batch.append(buffer.popleft())  # type: ignore[arg-type]
                continue
            n = min(size - len(batch), len(first))
            batch.extend([first.popleft() for _ in range(n)])
            if len(first):
                self.packed -= n
            else:
                buffer.popleft()
                self.packed -= n - 1
        return batch

    def pack(self) -> None:
        """Pack the points appended since the last pack (the newest end of the buffer),
        leaving the oldest batch plain: the next write takes it as it is."""
        buffer = self.buffer
        run: list[Point] = []
        limit = min(self.emitted - self.mark, len(buffer) - self.batch_size)
        if type(buffer[-1]) is not Point:  # not the recorder's: packing would gain nothing
            limit = 0
        # The run stops at an earlier one (points appended since the last pack may have
        # been taken out already); a run of 0 or 1 point is left plain.
        while len(run) < limit and type(buffer[-1]) is not PackedPoints:
            run.append(buffer.pop())  # type: ignore[arg-type]
        self.mark = self.emitted
        if len(run) < 2:
            buffer.extend(reversed(run))
            return
        run.reverse()
        buffer.append(PackedPoints(run))
        self.packed += len(run) - 1

    def set_inflight(self, batch: list[Point] | None) -> None:
        self.inflight = batch
        self.capacity = self.buffer_size - (len(batch) if batch else 0)

    def stats(self) -> SinkStats:
        stats: SinkStats = {
            "emitted": self.emitted,
            "written": self.written,
            "retries": self.retries,
            "buffered": self.buffered(),
            "dropped": dict(self.dropped),
        }
        # Things a sink saw that are not point accounting (InfluxDB: a database it had
        # to create again), when it counts any: `sink.events`, a mapping name -> count.
        events = getattr(self.sink, "events", None)
        if isinstance(events, Mapping):
            stats["events"] = dict(events)
        return stats


_live_flushers: weakref.WeakSet[Flusher] = weakref.WeakSet()


def _forget_in_child() -> None:
    # Points buffered before fork() belong to the parent, which sends them.
    for flusher in list(_live_flushers):
        flusher._reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def _drain_unstarted_at_exit() -> None:
    # A flusher that never started (gunicorn's master with --preload, a script that
    # never ran a loop) still holds what was emitted: send it once, within its deadline.
    for flusher in list(_live_flushers):
        if flusher._started or flusher._closed:
            continue
        if not any(c.buffered() for c in flusher._channels):
            continue
        try:
            asyncio.run(flusher.close())
        except Exception as exc:
            logger.error("drain_at_exit_failed", error=repr(exc)[:1024])


atexit.register(_drain_unstarted_at_exit)


class Flusher:
    """Buffers points per sink and delivers them in batches."""

    def __init__(self, sinks: Sequence[Sink], policy: FlushPolicy) -> None:
        self.policy = policy
        self._channels: list[_Channel] = []
        seen: dict[str, int] = {}
        for sink in sinks:
            base = sink_name(sink)
            seen[base] = seen.get(base, 0) + 1
            name = base if seen[base] == 1 else f"{base}#{seen[base]}"
            self._channels.append(_Channel(sink, name, self.policy))
        self._started = False
        self._closed = False
        self._log = RateLimitedLogger()
        self._rng = random.Random()
        _live_flushers.add(self)

    # ------------------------------------------------------------------ hot path

    def emit(self, point: Point) -> None:
        """Queue ``point`` for every sink. Synchronous, O(1), never raises."""
        if _taps:
            for tap in _taps:
                tap.append(point)
        if self._closed:
            for channel in self._channels:
                channel.emitted += 1
                channel.dropped["after_close"] += 1
            return
        for channel in self._channels:
            channel.emitted += 1
            buffer = channel.buffer
            size = len(buffer) + channel.packed
            if size >= channel.capacity:
                if not size:  # the whole bound is taken by the batch in flight
                    channel.dropped["overflow"] += 1
                    continue
                channel.drop_oldest()
                channel.dropped["overflow"] += 1
            buffer.append(point)
            if size >= channel.wake_at:
                if (
                    size >= channel.pack_at
                    and channel.attempts  # the batch in flight failed: the sink is down
                    and channel.emitted - channel.mark >= PACK_RUN
                ):
                    channel.pack()  # keep what waits behind it compact
                if not channel.backing_off and channel.wake:
                    channel.wake.set()

    def emitter(self) -> Callable[[Point], None]:
        """What to call instead of :meth:`emit` on the hot path: the compiled
        ``Emitter`` when built, which appends the common point itself (no Python frame)
        and hands every other to :meth:`emit`; else :meth:`emit`. Not kept by the
        flusher (no cycle through it)."""
        if _Emitter is None:
            return self.emit
        emitter: Callable[[Point], None] = _Emitter(self._channels, _taps, self.emit)
        return emitter

    # ------------------------------------------------------------------ lifecycle

    @property
    def sink_names(self) -> list[str]:
        return [c.name for c in self._channels]

    # ------------------------------------------------------------------ spool (lunamon.spool)

    def positions(self) -> dict[str, int]:
        """Per sink name: points emitted to it so far (the position of the next)."""
        return {c.name: c.emitted for c in self._channels}

    def fronts(self) -> dict[str, int]:
        """Per sink name: the position of its oldest point not yet done."""
        return {c.name: c.front() for c in self._channels}

    def room(self, name: str) -> int:
        """Points that may be added to sink ``name``'s buffer with half of it free."""
        channel = self._channel(name)
        return max(channel.buffer_size // 2, 1) - channel.buffered()

    def sink(self, name: str) -> Sink:
        return self._channel(name).sink

    def _channel(self, name: str) -> _Channel:
        return next(c for c in self._channels if c.name == name)

    def emit_to(self, name: str, points: Sequence[Point]) -> int:
        """Queue ``points`` for sink ``name`` alone (a dead process's, replayed); the
        position of the first. Like :meth:`emit`, never raises."""
        channel = self._channel(name)
        start = channel.emitted
        for point in points:
            channel.emitted += 1
            if self._closed:
                channel.dropped["after_close"] += 1
                continue
            size = len(channel.buffer) + channel.packed
            if size >= channel.capacity:
                channel.dropped["overflow"] += 1
                if not size:
                    continue
                channel.drop_oldest()
            channel.buffer.append(point)
        if channel.wake is not None and not channel.backing_off:
            channel.wake.set()
        return start

    async def start(self) -> None:
        """Start the sinks and one delivery task per sink (idempotent)."""
        if self._started or self._closed:
            return
        self._started = True
        for channel in self._channels:
            channel.wake = asyncio.Event()
            channel.lock = asyncio.Lock()
            try:
                await channel.sink.start()
            except Exception as exc:
                logger.error("sink_start_failed", sink=channel.name, error=repr(exc)[:1024])
            channel.task = asyncio.create_task(self._run(channel), name=f"lunamon:{channel.name}")

    async def flush(self) -> None:
        """One attempt per sink now to write everything buffered; never raises."""
        if self._closed:
            return
        if not self._started:
            await self.start()
        await asyncio.gather(*(self._flush_now(c) for c in self._channels))

    async def _flush_now(self, channel: _Channel) -> None:
        assert channel.lock is not None
        try:
            async with channel.lock:
                await self._attempt_all(channel)
        except Exception as exc:  # _attempt_all catches sink errors; a log handler may raise
            logger.error("flush_failed", sink=channel.name, error=repr(exc)[:1024])

    async def close(self) -> None:
        """Drain every buffer within ``shutdown_timeout``, count leftovers, close the sinks."""
        if self._closed:
            return
        self._closed = True
        for channel in self._channels:
            channel.closed = True
        deadline = time.monotonic() + self.policy.shutdown_timeout
        await asyncio.gather(*(self._shutdown(c, deadline) for c in self._channels))

    async def _shutdown(self, channel: _Channel, deadline: float) -> None:
        if channel.lock is None:
            channel.lock = asyncio.Lock()
        try:
            # Taking the lock waits for a write in flight instead of cancelling it: a
            # cancelled write may still land (a thread, a request already sent), and
            # the drain would then send its batch a second time.
            async with _timeout(max(0.0, deadline - time.monotonic())), channel.lock:
                await self._stop_task(channel)
                while channel.buffered():
                    if await self._attempt_all(channel):
                        break
                    if not channel.written:
                        # Never reached in this process (nothing listening, a typo in
                        # the URL): waiting out the deadline would only delay the exit.
                        break
                    delay = self._backoff(channel)
                    await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        except asyncio.TimeoutError:
            pass
        await self._stop_task(channel)  # a write still hanging at the deadline is abandoned
        left = channel.buffered()
        if left:
            channel.dropped["shutdown"] += left
            channel.clear()
            channel.set_inflight(None)
            logger.warning("points_dropped_at_shutdown", sink=channel.name, count=left)
        try:
            async with _timeout(max(0.1, deadline - time.monotonic())):
                await channel.sink.close()
        except Exception as exc:
            logger.error("sink_close_failed", sink=channel.name, error=repr(exc)[:1024])

    @staticmethod
    async def _stop_task(channel: _Channel) -> None:
        task, channel.task = channel.task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _reset_after_fork(self) -> None:
        for channel in self._channels:
            channel.clear()
            channel.set_inflight(None)
            channel.wake = channel.lock = channel.task = None
            channel.failing = None
        self._started = False

    def stats(self) -> dict[str, SinkStats]:
        """Counters per sink name; ``emitted == written + sum(dropped) + buffered``."""
        return {c.name: c.stats() for c in self._channels}

    # ------------------------------------------------------------------ delivery

    async def _run(self, channel: _Channel) -> None:
        assert channel.wake is not None
        assert channel.lock is not None
        timeout = self.policy.flush_interval
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                async with _timeout(timeout):
                    await channel.wake.wait()
            channel.wake.clear()
            channel.backing_off = False
            async with channel.lock:
                try:
                    done = await self._attempt_all(channel)
                except Exception as exc:  # a log handler that raises: the task goes on
                    logger.error("flush_failed", sink=channel.name, error=repr(exc)[:1024])
                    done = False
            if done:
                timeout = self.policy.flush_interval
            else:
                timeout = self._backoff(channel)
                channel.backing_off = True
                # emit() may have set `wake` during the failed attempt: keep the backoff.
                channel.wake.clear()

    def _backoff(self, channel: _Channel) -> float:
        policy = self.policy
        if channel.retry_after is not None:
            return min(max(float(channel.retry_after), 0.0), policy.retry_max_delay)
        try:  # base * 2 ** (attempts - 1), exactly, however small the base
            delay = math.ldexp(policy.retry_base_delay, max(channel.attempts - 1, 0))
        except OverflowError:
            delay = policy.retry_max_delay
        delay = min(policy.retry_max_delay, delay)
        return delay / 2 + self._rng.uniform(0, delay / 2)

    async def _attempt_all(self, channel: _Channel) -> bool:
        """Write batches until the buffer is empty (True) or one must wait for a retry (False)."""
        buffer = channel.buffer
        while True:
            if channel.inflight is None:
                if not buffer:
                    return True
                size = min(channel.batch_size, len(buffer) + channel.packed)
                channel.inflight_at = channel.emitted - len(buffer) - channel.packed
                channel.set_inflight(channel.take(size))
                channel.attempts = 0
                channel.retry_after = None
            if not await self._write(channel, channel.inflight):  # type: ignore[arg-type]
                return False

    async def _write(self, channel: _Channel, batch: list[Point]) -> bool:
        """One attempt at the batch in flight. False: keep it for a retry."""
        try:
            async with _timeout(self.policy.write_timeout):
                await channel.sink.write(batch)
        except BatchTooLarge as exc:
            batch = self._settle(channel, batch, exc)
            if len(batch) == 1:
                self._drop(channel, "rejected", exc, "point_too_large")
            elif batch:
                half = len(batch) // 2
                channel.batch_size = max(1, min(channel.batch_size, half))
                channel.buffer.extendleft(reversed(batch[half:]))
                channel.set_inflight(batch[:half])
            return True
        except SinkError as exc:
            # Points the sink stored all the same are written at once; only the rest is
            # retried or rejected.
            if not self._settle(channel, batch, exc):
                return True
            if exc.retryable:
                return self._retry(channel, exc, exc.retry_after)
            self._drop(channel, "rejected", exc, "batch_rejected")
            return True
        except _TRANSIENT as exc:
            return self._retry(channel, exc, None)
        except Exception as exc:
            self._drop(channel, "rejected", exc, "sink_raised")
            return True
        channel.written += len(batch)
        channel.set_inflight(None)
        if channel.failing is not None:
            self._recovered(channel, len(batch))
        # Freeing a written batch at once (5,000 points, ~70,000 objects) stalls the
        # loop for ~6 ms: free it in slices, a loop turn apart, when the list is ours
        # alone (its only references: this frame and getrefcount's argument).
        while len(batch) > _FREE_SLICE and sys.getrefcount(batch) <= 2:
            del batch[-_FREE_SLICE:]
            await asyncio.sleep(0)
        return True

    @staticmethod
    def _settle(channel: _Channel, batch: list[Point], exc: SinkError) -> list[Point]:
        """Count written the points of the failed ``batch`` that the sink stored all the
        same (all but ``exc.pending``; else the ``delivered`` first of a refused batch)
        and keep the others in flight: they are returned (empty: nothing is left)."""
        pending = exc.pending
        if pending is None or len(pending) > len(batch):
            delivered = 0 if exc.retryable else min(max(exc.delivered, 0), len(batch))
            pending = batch[delivered:] if delivered else batch
        stored = len(batch) - len(pending)
        if stored:
            channel.written += stored
            channel.set_inflight(pending or None)
        return pending

    @staticmethod
    def _recovered(channel: _Channel, written: int) -> None:
        """One line when a sink writes again after failing: how long it failed, and what
        waited for it (delivered late, from this batch on) or was dropped meanwhile."""
        since, dropped_before = channel.failing or (_now(), 0)
        channel.failing = None
        logger.info(
            "sink_recovered",
            sink=channel.name,
            down_seconds=round(_now() - since, 3),
            delivered_late=written + channel.buffered(),
            dropped_meanwhile=sum(channel.dropped.values()) - dropped_before,
        )

    def _retry(self, channel: _Channel, exc: BaseException, retry_after: float | None) -> bool:
        if channel.failing is None:
            channel.failing = (_now(), sum(channel.dropped.values()))
        channel.attempts += 1
        if channel.attempts > self.policy.max_retries:
            self._drop(channel, "retry_exhausted", exc, "retry_budget_exhausted")
            return True
        channel.retries += 1
        channel.retry_after = retry_after
        self._log.log(
            "warning",
            "sink_write_failed",
            key=channel.name,
            sink=channel.name,
            attempt=channel.attempts,
            points=channel.buffered(),
            error=_error_text(exc),
        )
        return False

    def _drop(self, channel: _Channel, reason: str, exc: BaseException, event: str) -> None:
        batch = channel.inflight or []
        channel.dropped[reason] += len(batch)
        channel.set_inflight(None)
        status = getattr(exc, "status", None)
        self._log.log(
            "error",
            event,
            key=f"{channel.name}:{status}",
            sink=channel.name,
            count=len(batch),
            status=status,
            error=_error_text(exc),
        )


_now = time.monotonic  # the outage's clock (a test swaps it)


def _error_text(exc: BaseException) -> str:
    """An exception's text for the log, cut to 1 KB; its type's name when it has no text
    or cannot give one (a sink's exception whose ``__str__`` raises must not kill the task)."""
    try:
        text = str(exc)[:1024]
    except Exception:
        text = ""
    return text or type(exc).__name__
