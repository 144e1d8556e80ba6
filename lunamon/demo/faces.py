"""A service shaped like LUNA's luna-faces, which the demo's handlers-like service calls.

The handlers-like service's face storage policy creates a face here
(``POST /faces``) through a session with :func:`lunamon.client_trace_config`: the
call carries the request's ``Luna-Request-Id``, so this service's point has the
same ``request_id``, and the call's time is the handlers' ``faces_time`` step.
``lunamon trace`` then shows both points of one request as a waterfall.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Iterable
from typing import Any

from aiohttp import web

import lunamon
from lunamon.sinks.base import Sink

__all__ = ["FACES_SERVICE", "FACES_STEP", "create_faces_app"]

FACES_SERVICE = "luna-faces"
# The step of the handlers' point that the calls to this service are timed into.
FACES_STEP = "faces"

_LATENCY = web.AppKey("faces_latency", float)


@lunamon.timed("insert_face_time")
async def insert_face(latency: float) -> str:
    """Simulated database insert: about ``latency`` seconds (0: one loop turn)."""
    await asyncio.sleep(latency * random.uniform(0.5, 1.5) if latency else 0)
    return str(uuid.uuid4())


async def create_face(request: web.Request) -> web.Response:
    await request.read()
    face_id = await insert_face(request.app[_LATENCY])
    return web.json_response({"face_id": face_id}, status=201)


def create_faces_app(
    *, sinks: Iterable[Sink] | None = None, latency: float = 0.0, **setup_options: Any
) -> web.Application:
    """The faces-like service, monitored by lunamon with ``sinks``."""
    app = web.Application()
    app[_LATENCY] = latency
    app.router.add_post("/faces", create_face)
    lunamon.setup(app, service=FACES_SERVICE, sinks=sinks, **setup_options)
    return app
