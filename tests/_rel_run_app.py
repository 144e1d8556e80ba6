"""A service whose app, sinks and a first point are made at import time, before any
event loop exists, then served by ``web.run_app`` or ``asyncio.run`` until SIGINT or
SIGTERM (catalogue 16). Prints the final ``stats()`` as JSON on its last line.

Configured by the environment: ``REL_MODE`` (``run_app`` | ``asyncio_run``),
``REL_PORT``, ``REL_FILE`` (line-protocol file sink), ``REL_INFLUX_PORT``, ``REL_DB``,
``REL_SHUTDOWN_TIMEOUT`` (seconds, default 10).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

from aiohttp import web

from lunamon import MONITORING_KEY, Point
from lunamon.demo.service import create_app
from lunamon.sinks.file import LineProtocolFileSink
from lunamon.sinks.influxdb import InfluxDBSink

MODE = os.environ["REL_MODE"]
PORT = int(os.environ["REL_PORT"])

app = create_app(
    sinks=[
        LineProtocolFileSink(os.environ["REL_FILE"]),
        InfluxDBSink("127.0.0.1", int(os.environ["REL_INFLUX_PORT"]), os.environ["REL_DB"]),
    ],
    flush_interval=30.0,
    shutdown_timeout=float(os.environ.get("REL_SHUTDOWN_TIMEOUT", "10")),
    retry_base_delay=0.05,
    retry_max_delay=0.2,
)
monitoring = app[MONITORING_KEY]
monitoring.emit(Point("startup", time.time_ns(), {"mode": MODE}, {"pid": os.getpid()}))


async def serve() -> None:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", PORT).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    if MODE == "run_app":
        web.run_app(app, host="127.0.0.1", port=PORT, print=None, handle_signals=True)
    else:
        asyncio.run(serve())
    print(json.dumps(monitoring.stats()), flush=True)


if __name__ == "__main__":
    main()
