"""Processes for the load tests (tests/test_load.py), kept out of the service's process so
that they do not share its event loop or its GIL.

``client URL CONCURRENCY MAX_REQUESTS MAX_SECONDS``
    POSTs over the demo service's resources as fast as ``CONCURRENCY`` connections go, until
    ``MAX_REQUESTS`` were sent or ``MAX_SECONDS`` passed; prints one JSON line:
    ``{"sent", "statuses": {status: count}, "errors", "seconds"}``.
``slowsink PORT DELAY``
    An InfluxDB-like ``/write`` endpoint answering 204 after ``DELAY`` seconds; ``GET /count``
    gives the number of lines received. Prints ``ready`` once listening.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter

import aiohttp
from aiohttp import web

PATHS = (
    "/detector",
    "/extractor",
    "/extractor/upgrade",
    "/handlers/3fa85f64-5717-4562-b3fc-2c963f66afa6/events",
    "/verifiers/v1/verifications",
)


async def client(url: str, concurrency: int, max_requests: int, max_seconds: float) -> None:
    statuses: Counter[int] = Counter()
    errors = 0
    sent = 0
    started = time.monotonic()
    deadline = started + max_seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal sent, errors
        while sent < max_requests and time.monotonic() < deadline:
            path = PATHS[sent % len(PATHS)]
            sent += 1
            try:
                async with session.post(url + path) as response:
                    await response.read()
                    statuses[response.status] += 1
            except aiohttp.ClientError:
                errors += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    print(
        json.dumps(
            {
                "sent": sent,
                "statuses": {str(k): v for k, v in statuses.items()},
                "errors": errors,
                "seconds": time.monotonic() - started,
            }
        ),
        flush=True,
    )


async def slowsink(port: int, delay: float) -> None:
    lines = 0

    async def write(request: web.Request) -> web.Response:
        nonlocal lines
        body = await request.read()
        await asyncio.sleep(delay)
        lines += body.count(b"\n")
        return web.Response(status=204)

    async def count(request: web.Request) -> web.Response:
        return web.json_response({"lines": lines})

    app = web.Application(client_max_size=256 * 1024 * 1024)
    app.router.add_post("/write", write)
    app.router.add_get("/count", count)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    command, *args = sys.argv[1:]
    if command == "client":
        asyncio.run(client(args[0], int(args[1]), int(args[2]), float(args[3])))
    elif command == "slowsink":
        asyncio.run(slowsink(int(args[0]), float(args[1])))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main()
