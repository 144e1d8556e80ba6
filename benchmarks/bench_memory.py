"""Table 5: memory held for a dead sink, and event-loop lag while batches are flushed.

Each measurement runs in a fresh interpreter (``--child rss`` / ``--child lag``):

- **RSS**: a ``Monitoring`` whose only sink always raises ``ConnectionError``
  (the flusher keeps retrying) is given request points made the way the
  recorder makes them; RSS (``/proc/self/status``) is read after
  ``buffer_size`` points and again after twice as many: the first growth is
  the cost of a full buffer, the second must be flat (oldest points dropped).
- **loop lag**: a ticker task sleeps 1 ms in a loop and records how late it
  wakes, while a load task emits request points at a steady rate and the
  flusher sends 5,000-point batches to the sink under test.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any, Final

import lunamon
from benchmarks._common import InfluxServer as Influxd
from benchmarks._common import (
    RequestDriver,
    base_parser,
    fmt_float,
    fmt_int,
    have,
    influxd_available,
    markdown_table,
    python_module,
    verdict,
)

__all__ = ["main"]

TITLE: Final = "5. Memory and event-loop lag"
RSS_TARGET_MB: Final = 40.0
LAG_TARGET_MS: Final = 5.0
CHILD_TIMEOUT: Final = 180.0
WARMUP: Final = 0.5  # seconds of load before lag samples count (first calls, imports)


def rss_bytes() -> int:
    """This process's resident set size (Linux ``/proc``; ``ru_maxrss`` elsewhere)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class DeadSink:
    """A sink whose server is gone: every write fails as a refused connection would."""

    name = "dead"

    async def start(self) -> None:
        return None

    async def write(self, points: Sequence[lunamon.Point]) -> None:
        raise ConnectionRefusedError("connection refused (bench: dead sink)")

    async def close(self) -> None:
        return None


class NullSink:
    """Takes every batch and does nothing: the lag of the load alone."""

    name = "null"

    async def start(self) -> None:
        return None

    async def write(self, points: Sequence[lunamon.Point]) -> None:
        return None

    async def close(self) -> None:
        return None


class EncodeSink:
    """Encodes each batch in one go (``encode_lines``), as a naive sink would."""

    name = "encode"

    async def start(self) -> None:
        return None

    async def write(self, points: Sequence[lunamon.Point]) -> None:
        lunamon.encode_lines(list(points))

    async def close(self) -> None:
        return None


class EncodeAsyncSink(EncodeSink):
    """Encodes each batch in chunks, yielding between them (``encode_lines_async``)."""

    name = "encode_async"

    def __init__(self, chunk: int = 500) -> None:
        self.chunk = chunk

    async def write(self, points: Sequence[lunamon.Point]) -> None:
        from lunamon.point import encode_lines_async

        await encode_lines_async(list(points), chunk=self.chunk)


# --------------------------------------------------------------------------- children


async def _child_rss(points: int, steps: bool) -> dict[str, Any]:
    settings = lunamon.MonitoringSettings(
        buffer_size=points,
        batch_size=min(5000, points),
        shutdown_timeout=0.1,
        retry_base_delay=0.05,
        retry_max_delay=0.2,
        max_retries=1_000_000,
    )
    monitoring = lunamon.Monitoring(settings, [DeadSink()])
    await monitoring.start()
    request = await RequestDriver(monitoring, steps=steps).start()
    for _ in range(200):  # warm-up: caches, the recorder's routes and tag sets (0.2 %)
        await request()
    await monitoring.flush()  # the dead sink: nothing leaves, these stay buffered
    gc.collect()
    await asyncio.sleep(0.05)
    base = rss_bytes()
    readings = []
    for _ in range(2):
        for i in range(points):
            await request()
            if i % 1000 == 0:
                await asyncio.sleep(0)  # the flusher runs and fails meanwhile
        await asyncio.sleep(0.05)
        gc.collect()
        readings.append(rss_bytes() - base)
    stats = monitoring.stats()["dead"]
    await monitoring.close()
    return {"full": readings[0], "double": readings[1], "stats": stats}


class _Lag:
    """A ticker that sleeps ``interval`` in a loop and records how late it woke (ms).

    Corrected for coordinated omission (as HdrHistogram does): a wake-up late by
    L also stands for the ticks that could not happen meanwhile, late by
    L - interval, L - 2 x interval, ... So one 300 ms stall weighs as much as
    the 300 requests it delays, not as one sample, and the percentiles read as
    "a request arriving at a random instant waits this long for the loop".
    """

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.samples: list[float] = []

    def _record(self, late: float) -> None:
        self.samples.append(late * 1000.0)
        missed = late - self.interval
        while missed > 0:
            self.samples.append(missed * 1000.0)
            missed -= self.interval

    async def run(self, since: float, until: float) -> None:
        loop = asyncio.get_running_loop()
        perf = time.perf_counter
        while (now := loop.time()) < until:
            start = perf()
            await asyncio.sleep(self.interval)
            if now >= since:
                self._record(max(0.0, perf() - start - self.interval))


async def _emit_load(monitoring: lunamon.Monitoring, rate: int, until: float) -> int:
    """Serve ``rate`` requests per second through lunamon's recorder, in 1 ms steps."""
    loop = asyncio.get_running_loop()
    request = await RequestDriver(monitoring, steps=True).start()
    start = loop.time()
    sent = 0
    while (now := loop.time()) < until:
        due = int((now - start) * rate)
        for _ in range(min(due - sent, rate)):
            await request()
        sent = max(sent, due)
        await asyncio.sleep(0.001)
    return sent


class _GCPauses:
    """The longest garbage-collector pause (ms), by ``gc.callbacks``."""

    def __init__(self) -> None:
        self.longest = 0.0
        self.full = 0
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        self.longest = max(self.longest, (time.perf_counter() - self._start) * 1000.0)
        self.full += info["generation"] == 2


async def _child_lag(
    sink_kind: str, seconds: float, rate: int, url: str | None, freeze: bool
) -> dict[str, Any]:
    sink: Any
    if sink_kind in ("idle", "null"):
        sink = NullSink()
    elif sink_kind == "encode":
        sink = EncodeSink()
    elif sink_kind.startswith("encode_async"):
        sink = EncodeAsyncSink(int(sink_kind.rpartition("_")[2] or 500))
    elif sink_kind == "influxdb":
        from lunamon.sinks.influxdb import InfluxDBSink

        assert url is not None
        host, port = url.rsplit("//", 1)[1].split(":")
        sink = InfluxDBSink(host=host, port=int(port), database=f"bench_lag_{os.getpid()}")
    else:
        raise ValueError(sink_kind)
    monitoring = lunamon.Monitoring(lunamon.MonitoringSettings(batch_size=5000), [sink])
    await monitoring.start()
    if freeze:  # what a service can do once started: old objects leave the GC's scans
        gc.collect()
        gc.freeze()
    loop = asyncio.get_running_loop()
    now = loop.time()
    until = now + WARMUP + seconds
    lag = _Lag()
    pauses = _GCPauses()
    ticker = asyncio.create_task(lag.run(now + WARMUP, until))
    emitted = await _emit_load(monitoring, rate, until) if sink_kind != "idle" else 0
    await ticker
    gc.callbacks.remove(pauses._callback)
    stats = monitoring.stats()[sink.name]
    await monitoring.close()
    samples = sorted(lag.samples)
    return {
        "p50": statistics.median(samples),
        "p99": samples[min(len(samples) - 1, int(len(samples) * 0.99))],
        "max": samples[-1],
        "samples": len(samples),
        "emitted": emitted,
        "written": stats["written"],
        "gc_longest": pauses.longest,
        "gc_full": pauses.full,
    }


def _run_child(*args: str) -> dict[str, Any]:
    done = python_module("benchmarks.bench_memory", "--child", *args, timeout=CHILD_TIMEOUT)
    if done.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{done.stdout}\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# --------------------------------------------------------------------------- parent


def _rss_rows(points: int, quick: bool) -> list[list[str]]:
    shapes = [(True, "seed request point with its 9 steps"), (False, "hello-world request point")]
    rows = []
    for steps, what in shapes[:1] if quick else shapes:
        result = _run_child("rss", "--points", str(points), *(["--steps"] if steps else []))
        full_mb = result["full"] / 2**20
        double_mb = result["double"] / 2**20
        stats = result["stats"]
        scale = 100_000 / points
        rows.append(
            [
                f"{fmt_int(points)} points buffered for a dead sink ({what})",
                f"{fmt_float(full_mb, 1)} MB ({fmt_int(result['full'] / points)} B/point)",
                f"<= {RSS_TARGET_MB:.0f} MB per 100,000",
                verdict(full_mb * scale <= RSS_TARGET_MB),
            ]
        )
        rows.append(
            [
                f"… after {fmt_int(2 * points)} emitted (bound {fmt_int(points)};"
                f" dropped {fmt_int(stats['dropped']['overflow'])})",
                f"{fmt_float(double_mb, 1)} MB (+{fmt_float(double_mb - full_mb, 1)} MB)",
                "flat beyond the bound",
                verdict(double_mb - full_mb <= max(2.0, 0.05 * full_mb)),
            ]
        )
    return rows


def _lag_rows(seconds: float, rate: int, quick: bool) -> list[list[str]]:
    kinds = [
        ("idle", "no load: the machine's own noise"),
        ("null", "load alone (sink discards batches)"),
        ("encode", "sink encoding each batch in one go (`encode_lines`)"),
        ("encode_async_500", "sink encoding in chunks of 500 (`encode_lines_async(chunk=500)`)"),
        ("encode_async_500+freeze", "same, `gc.freeze()` after startup"),
        ("encode_async_100", "sink encoding in chunks of 100 (`encode_lines_async(chunk=100)`)"),
    ]
    rows = []
    url: str | None = None
    server: Influxd | None = None
    if influxd_available() and have("lunamon.sinks.influxdb"):
        server = Influxd()
        server.start()
        url = server.url
        kinds.append(("influxdb", "**lunamon** `InfluxDBSink` into a private influxd"))
    if quick:
        kinds = [k for k in kinds if k[0] in ("null", "encode_async_100", "influxdb")]
    try:
        for kind, what in kinds:
            sink, _, freeze = kind.partition("+")
            args = ["lag", "--sink", sink, "--seconds", str(seconds), "--rate", str(rate)]
            args += ["--url", url] if url else []
            result = _run_child(*args, *(["--freeze"] if freeze else []))
            target = ""
            if sink in ("encode_async_100", "influxdb"):
                target = f"p99 < {LAG_TARGET_MS:.0f} ms: {verdict(result['p99'] < LAG_TARGET_MS)}"
            rows.append(
                [
                    f"loop lag, {what}"
                    if kind == "idle"
                    else f"loop lag, {fmt_int(rate)} points/s emitted, {what}"
                    f" ({fmt_int(result['written'])} points written)",
                    f"p50 {fmt_float(result['p50'])} / p99 {fmt_float(result['p99'])} /"
                    f" max {fmt_float(result['max'])} ms; longest GC pause"
                    f" {fmt_float(result['gc_longest'])} ms ({result['gc_full']} full)",
                    target or "(reference)",
                    "",
                ]
            )
    finally:
        if server is not None:
            server.stop()
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--points", type=int, default=100_000, help="the buffer bound")
    parser.add_argument("--seconds", type=float, default=4.0, help="of loop-lag measurement")
    parser.add_argument("--rate", type=int, default=10_000, help="points emitted per second")
    parser.add_argument("--child", choices=("rss", "lag"), help=argparse.SUPPRESS)
    parser.add_argument("--steps", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sink", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--freeze", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "rss":
        print(json.dumps(asyncio.run(_child_rss(args.points, args.steps))))
        return
    if args.child == "lag":
        lag = _child_lag(args.sink, args.seconds, args.rate, args.url, args.freeze)
        print(json.dumps(asyncio.run(lag)))
        return
    if args.quick:
        args.points, args.seconds, args.rate = 10_000, 1.0, 5000
    rows = _rss_rows(args.points, args.quick) + _lag_rows(args.seconds, args.rate, args.quick)
    print(f"### {TITLE}\n")
    print(markdown_table(["what", "measured", "target", "verdict"], rows))
    print(
        "\nEach row in a fresh interpreter. RSS growth is measured from a warmed-up"
        " Monitoring; the points come from lunamon's RequestRecorder serving mocked"
        " requests; the dead sink raises ConnectionRefusedError on every write (retried,"
        " never dropped as rejected). Loop lag: a 1 ms ticker's"
        " lateness, corrected for coordinated omission (a stall of L ms also counts the"
        " ticks it swallowed), while the load emits points every millisecond and"
        " batches of 5,000 are flushed (as soon as 5,000 wait, or every second)."
    )


if __name__ == "__main__":
    main()
