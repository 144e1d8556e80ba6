"""The demo service the fault campaign (tests/campaign/) runs under gunicorn.

``_rel_campaign_app:create`` is the app factory each ``aiohttp.GunicornWebWorker`` calls
after the fork: the demo service with an InfluxDB sink, a ClickHouse sink and Prometheus
metrics shared through ``multiprocess_dir``, on policies short enough for faults to
resolve in seconds. Each response carries its worker's pid in ``X-Worker`` and each
``request`` point the same pid in its ``worker`` field, so that a point can be traced to
the worker that recorded it (a SIGKILLed worker's loss is attributed exactly).

Configured by the environment (``CAMPAIGN_*``, written by tests/campaign/stack.py):
``INFLUX_PORT``, ``DB``, ``CLICKHOUSE_URL``, ``METRICS_DIR``, ``SINK_TIMEOUT``,
``SHUTDOWN_TIMEOUT``, ``STATS_DIR`` (each worker writes its final ``stats()`` there,
``<pid>.json``, once lunamon drained at the graceful stop) and, when the installed lunamon
has the setting, ``SPOOL_DIR``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

import lunamon
from lunamon.demo.service import create_app

__all__ = ["create"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _worker_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["X-Worker"] = str(os.getpid())


@web.middleware
async def _worker_field(request: web.Request, handler: Handler) -> web.StreamResponse:
    lunamon.add_field("worker", os.getpid())
    return await handler(request)


async def _final_stats(app: web.Application) -> AsyncIterator[None]:
    yield
    # First in cleanup_ctx, so last to clean up: after lunamon's drain.
    path = Path(os.environ["CAMPAIGN_STATS_DIR"]) / f"{os.getpid()}.json"
    path.write_text(json.dumps(app[lunamon.MONITORING_KEY].stats()))


def _build() -> web.Application:
    env = os.environ
    timeout = float(env.get("CAMPAIGN_SINK_TIMEOUT", "2"))
    sinks = [
        lunamon.InfluxDBSink(
            "127.0.0.1", int(env["CAMPAIGN_INFLUX_PORT"]), env["CAMPAIGN_DB"], timeout=timeout
        ),
        lunamon.ClickHouseSink(env["CAMPAIGN_CLICKHOUSE_URL"], env["CAMPAIGN_DB"], timeout=timeout),
    ]
    options: dict[str, Any] = {
        "flush_interval": 0.2,
        "batch_size": 500,
        "buffer_size": 100_000,
        "max_retries": 100_000,  # faults last seconds: nothing is given up meanwhile
        "retry_base_delay": 0.05,
        "retry_max_delay": 0.5,
        "write_timeout": timeout * 2,
        "shutdown_timeout": float(env.get("CAMPAIGN_SHUTDOWN_TIMEOUT", "15")),
        "metrics": {"enabled": True, "multiprocess_dir": env["CAMPAIGN_METRICS_DIR"]},
    }
    spool = env.get("CAMPAIGN_SPOOL_DIR", "")
    if spool:
        options["spool_dir"] = spool
    app = create_app(sinks=sinks, **options)
    app.middlewares.append(_worker_field)  # inside lunamon's: the request is being recorded
    app.on_response_prepare.append(_worker_header)
    app.cleanup_ctx.insert(0, _final_stats)
    return app


def _log_lunamon() -> None:
    """lunamon's warnings and errors to the gunicorn log, one line each, marked for
    tests/campaign/stack.py to count (``lunamon-log LEVEL event key=value ...``)."""
    log = logging.getLogger("lunamon")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("lunamon-log %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.WARNING)


async def create() -> web.Application:
    """The app factory: one app per worker, built in the worker."""
    _log_lunamon()
    return _build()
