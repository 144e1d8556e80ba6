"""One route under gunicorn, with Prometheus metrics shared by the workers through
``METRICS_DIR`` and served on ``METRICS_PORT`` too (tests/test_metrics.py)."""

from __future__ import annotations

import os

from aiohttp import web

import lunamon

__all__ = ["create"]


async def hello(request: web.Request) -> web.Response:
    return web.Response(text="hello")


async def create() -> web.Application:
    app = web.Application()
    app.router.add_get("/hello", hello)
    metrics = {
        "enabled": True,
        "multiprocess_dir": os.environ["METRICS_DIR"],
        "port": int(os.environ["METRICS_PORT"]),
        "host": "127.0.0.1",
    }
    lunamon.setup(app, service="svc", sinks=[], flush_interval=0.1, metrics=metrics)
    return app
