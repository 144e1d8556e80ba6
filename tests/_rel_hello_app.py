"""One route, one status: every point of every worker has the same series and tags.

For tests/test_point_times.py under gunicorn and wrk. Each worker writes how many
requests it answered to ``REL_COUNT_DIR/<pid>`` when it stops. With
``REL_METRICS_DIR``, ``/metrics`` answers for every worker (tests/test_metrics.py).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

import lunamon

__all__ = ["create"]

_SERVED = web.AppKey("served", list)


async def hello(request: web.Request) -> web.Response:
    request.app[_SERVED][0] += 1
    return web.Response(text="hello")


async def _count(app: web.Application) -> AsyncIterator[None]:
    yield
    path = Path(os.environ["REL_COUNT_DIR"]) / str(os.getpid())
    path.write_text(str(app[_SERVED][0]))


async def create() -> web.Application:
    app = web.Application()
    app[_SERVED] = [0]
    app.router.add_get("/hello", hello)
    app.cleanup_ctx.append(_count)  # after lunamon's: counted once its drain is done
    sink = lunamon.InfluxDBSink(
        "127.0.0.1", int(os.environ["REL_INFLUX_PORT"]), os.environ["REL_DB"]
    )
    metrics_dir = os.environ.get("REL_METRICS_DIR", "")
    metrics = {"enabled": True, "multiprocess_dir": metrics_dir} if metrics_dir else None
    lunamon.setup(app, service="svc", sinks=[sink], flush_interval=0.2, metrics=metrics)
    return app
