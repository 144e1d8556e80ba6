"""An instrumented service shaped like LUNA's luna-handlers: the reference for users.

Every resource of the LUNA monitoring specification is here, and every sub-step
of it is a storage-policy coroutine decorated with ``@timed``. Failures can be
asked for with the query parameter ``fail`` so that tests and the demo traffic
exercise every outcome:

- ``fail=400`` / ``fail=500``: a LUNA-style JSON error body (``error_code``, ``desc``, ...)
- ``fail=raise``: an unhandled exception (500, error code 1)
- ``fail=luna_exc``: an exception carrying ``error_code`` (500)
- ``fail=http``: ``web.HTTPBadRequest`` raised
- ``fail=hang``: the handler waits until the client goes away (recorded as 499;
  aiohttp cancels the handler of a vanished client only when the runner has
  ``handler_cancellation=True``, as ``lunamon demo``'s has)

``lunamon demo`` runs it on a free loopback port and drives it with the mix of
:mod:`lunamon.demo.traffic`. Given the URL of the faces-like service
(:mod:`lunamon.demo.faces`), its face storage policy creates the face there, through a
session with :func:`lunamon.client_trace_config`: the request id goes along, and the
call's time is the ``faces_time`` step.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterable
from typing import Any

import aiohttp
from aiohttp import web

import lunamon
from lunamon.demo.faces import FACES_STEP
from lunamon.sinks.base import Sink

__all__ = ["SERVICE", "SUBSTEPS", "LunaError", "create_app", "use_faces_service"]

# The service tag of every point of the demo.
SERVICE = "luna-handlers"

# The sub-step fields of each resource, as in the LUNA monitoring specification.
SUBSTEPS: dict[str, tuple[str, ...]] = {
    "POST:/detector": ("download_images_time", "save_warps_time"),
    "POST:/extractor": ("load_face_samples_time", "save_attributes_time"),
    "POST:/extractor/upgrade": (
        "load_face_samples_time",
        "load_body_samples_time",
        "save_face_attributes_time",
        "save_event_attributes_time",
    ),
    "POST:/handlers/{handlerId}/events": (
        "load_images_for_processing_time",
        "face_sample_storage_policy_time",
        "body_sample_storage_policy_time",
        "image_origin_storage_policy_time",
        "face_attribute_storage_policy_time",
        "face_storage_policy_time",
        "event_storage_policy_time",
        "notification_storage_policy_time",
        "match_policy_time",
    ),
    "POST:/verifiers/{verifierId}/verifications": (
        "face_sample_storage_policy_time",
        "face_attribute_storage_policy_time",
        "match_policy_time",
    ),
}

LATENCY_KEY = web.AppKey("demo_latency", float)
# The faces-like service: its URL, and the session that calls it (while the app runs).
FACES_URL_KEY = web.AppKey("demo_faces_url", str)
FACES_SESSION_KEY = web.AppKey("demo_faces_session", aiohttp.ClientSession)


class LunaError(Exception):
    """An application error with a LUNA error code."""

    def __init__(self, error_code: int, desc: str) -> None:
        super().__init__(desc)
        self.error_code = error_code


async def _work(app: web.Application) -> None:
    """Simulated I/O: about ``latency`` seconds (0 in tests: one loop turn)."""
    latency = app[LATENCY_KEY]
    await asyncio.sleep(latency * random.uniform(0.5, 1.5) if latency else 0)


# Storage policies and loaders: each is one sub-step field of the `request` point.
@lunamon.timed("download_images_time")
async def download_images(app: web.Application) -> None:
    await _work(app)


@lunamon.timed("save_warps_time")
async def save_warps(app: web.Application) -> None:
    await _work(app)


@lunamon.timed("load_face_samples_time")
async def load_face_samples(app: web.Application) -> None:
    await _work(app)


@lunamon.timed("load_body_samples_time")
async def load_body_samples(app: web.Application) -> None:
    await _work(app)


@lunamon.timed("save_attributes_time")
async def save_attributes(app: web.Application) -> None:
    await _work(app)


@lunamon.timed("save_face_attributes_time")
async def save_face_attributes(app: web.Application) -> None:
    await _work(app)


@lunamon.timed("save_event_attributes_time")
async def save_event_attributes(app: web.Application) -> None:
    await _work(app)


@lunamon.timed("load_images_for_processing_time")
async def load_images_for_processing(app: web.Application) -> None:
    await _work(app)


@lunamon.timed("face_sample_storage_policy_time")
async def face_sample_storage_policy(app: web.Application) -> None:
    await _work(app)


@lunamon.timed("body_sample_storage_policy_time")
async def body_sample_storage_policy(app: web.Application) -> None:
    await _work(app)


@lunamon.timed("image_origin_storage_policy_time")
async def image_origin_storage_policy(app: web.Application) -> None:
    await _work(app)


@lunamon.timed("face_attribute_storage_policy_time")
async def face_attribute_storage_policy(app: web.Application) -> None:
    await _work(app)


@lunamon.timed("face_storage_policy_time")
async def face_storage_policy(app: web.Application) -> None:
    session = app.get(FACES_SESSION_KEY)
    if session is None:
        await _work(app)
        return
    # A call to the faces-like service: timed into faces_time, the request id sent along.
    async with session.post(app[FACES_URL_KEY] + "/faces", json={"source": "demo"}) as answer:
        await answer.read()


@lunamon.timed("event_storage_policy_time")
async def event_storage_policy(app: web.Application) -> None:
    await _work(app)


@lunamon.timed("notification_storage_policy_time")
async def notification_storage_policy(app: web.Application) -> None:
    await _work(app)


@lunamon.timed("match_policy_time")
async def match_policy(app: web.Application) -> None:
    await _work(app)


async def _maybe_fail(request: web.Request) -> web.Response | None:
    fail = request.query.get("fail")
    if not fail:
        return None
    if fail in ("400", "500"):
        status = int(fail)
        code = 12012 if status == 400 else 1
        body = {
            "error_code": code,
            "desc": "Bad/incomplete input data" if status == 400 else "Internal server error",
            "detail": f"simulated failure of {request.path}",
            "link": f"https://docs.visionlabs.ai/info/luna/troubleshooting/errors-description/code-{code}",
        }
        return web.json_response(body, status=status)
    if fail == "raise":
        raise RuntimeError("simulated unhandled exception")
    if fail == "luna_exc":
        raise LunaError(10015, "Image store unavailable")
    if fail == "http":
        raise web.HTTPBadRequest(text="simulated bad request")
    if fail == "hang":
        await asyncio.Event().wait()
    return None


async def detector(request: web.Request) -> web.Response:
    app = request.app
    await download_images(app)
    if (failed := await _maybe_fail(request)) is not None:
        return failed
    await save_warps(app)
    return web.json_response({"faces": []}, status=201)


async def extractor(request: web.Request) -> web.Response:
    app = request.app
    await load_face_samples(app)
    if (failed := await _maybe_fail(request)) is not None:
        return failed
    await save_attributes(app)
    return web.json_response({"attributes": []}, status=201)


async def extractor_upgrade(request: web.Request) -> web.Response:
    app = request.app
    await asyncio.gather(load_face_samples(app), load_body_samples(app))
    if (failed := await _maybe_fail(request)) is not None:
        return failed
    await asyncio.gather(save_face_attributes(app), save_event_attributes(app))
    return web.json_response({"upgraded": True})


async def handler_events(request: web.Request) -> web.Response:
    app = request.app
    await load_images_for_processing(app)
    if (failed := await _maybe_fail(request)) is not None:
        return failed
    # LUNA runs the storage policies of one event concurrently.
    await asyncio.gather(
        face_sample_storage_policy(app),
        body_sample_storage_policy(app),
        image_origin_storage_policy(app),
        face_attribute_storage_policy(app),
    )
    await face_storage_policy(app)
    await asyncio.gather(event_storage_policy(app), notification_storage_policy(app))
    await match_policy(app)
    return web.json_response(
        {"events": [], "handler_id": request.match_info["handlerId"]}, status=201
    )


async def verifier_verifications(request: web.Request) -> web.Response:
    app = request.app
    await face_sample_storage_policy(app)
    if (failed := await _maybe_fail(request)) is not None:
        return failed
    await face_attribute_storage_policy(app)
    await match_policy(app)
    return web.json_response({"verifier_id": request.match_info["verifierId"]}, status=201)


async def healthcheck(request: web.Request) -> web.Response:
    return web.Response(status=204)


def create_app(
    *,
    sinks: Iterable[Sink] | None = None,
    latency: float = 0.0,
    **setup_options: Any,
) -> web.Application:
    """The demo service, monitored by lunamon with ``sinks``.

    ``latency`` is the mean simulated time of one sub-step, in seconds.
    """
    app = web.Application()
    app[LATENCY_KEY] = latency
    app.router.add_post("/detector", detector)
    app.router.add_post("/extractor", extractor)
    app.router.add_post("/extractor/upgrade", extractor_upgrade)
    app.router.add_post("/handlers/{handlerId}/events", handler_events)
    app.router.add_post("/verifiers/{verifierId}/verifications", verifier_verifications)
    app.router.add_get("/healthcheck", healthcheck)
    setup_options.setdefault("exclude", ["GET:/healthcheck"])
    lunamon.setup(app, service=SERVICE, sinks=sinks, **setup_options)
    return app


def use_faces_service(app: web.Application, url: str) -> None:
    """Store the faces of ``app`` (before it starts) in the faces-like service at ``url``."""
    app[FACES_URL_KEY] = url
    app.cleanup_ctx.append(_faces_session)


async def _faces_session(app: web.Application) -> AsyncIterator[None]:
    """The session calling the faces-like service, for as long as the app runs."""
    config = lunamon.client_trace_config(step=FACES_STEP)
    async with aiohttp.ClientSession(trace_configs=[config]) as session:
        app[FACES_SESSION_KEY] = session
        yield
