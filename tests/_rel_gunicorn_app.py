"""The demo service for gunicorn (``aiohttp.GunicornWebWorker``), for tests/test_deployment.py.

``_rel_gunicorn_app:create`` is an app factory each worker calls after the fork;
``_rel_gunicorn_app:app`` is built at import, for ``--preload`` (in the master, before
the fork), and emits one ``preload`` point then. Every response carries the worker's pid
in ``X-Worker``. Configured by ``REL_INFLUX_PORT`` and ``REL_DB``.
"""

from __future__ import annotations

import os
import time

from aiohttp import web

from lunamon import MONITORING_KEY, Point
from lunamon.demo.service import create_app
from lunamon.sinks.influxdb import InfluxDBSink

__all__ = ["app", "create"]


async def _worker_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["X-Worker"] = str(os.getpid())


def _build() -> web.Application:
    sink = InfluxDBSink("127.0.0.1", int(os.environ["REL_INFLUX_PORT"]), os.environ["REL_DB"])
    # a long interval: the points reach influxd through the drain at the graceful stop
    service = create_app(sinks=[sink], flush_interval=30.0)
    service.on_response_prepare.append(_worker_header)
    return service


async def create() -> web.Application:
    """The app factory: one app per worker, built in the worker."""
    return _build()


app: web.Application  # only with REL_PRELOAD: a point emitted before any fork
if os.environ.get("REL_PRELOAD"):
    app = _build()
    app[MONITORING_KEY].emit(Point("preload", time.time_ns(), {"pid": os.getpid()}, {"n": 1.0}))
