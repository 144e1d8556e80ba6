"""Server-Timing: the request's step times and total in a response header (opt-in),
read back by a real browser's Performance API."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

import lunamon

ClientFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]
ENTRY = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+;dur=\d+\.\d{3}$")


@lunamon.timed("match_policy_time")
async def match_policy() -> None:
    await asyncio.sleep(0.002)


@lunamon.timed("face_sample_storage_policy_time")
async def storage() -> None:
    await asyncio.sleep(0.001)


async def page(request: web.Request) -> web.Response:
    await match_policy()
    await storage()
    html = (
        "<html><body><p id=out>pending</p><script>"
        "const e = performance.getEntriesByType('navigation')[0];"
        "document.getElementById('out').textContent = JSON.stringify("
        "e.serverTiming.map(t => [t.name, t.duration]));"
        "</script></body></html>"
    )
    return web.Response(text=html, content_type="text/html")


def timing_app(**options: Any) -> web.Application:
    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_get("/missing", _missing)
    lunamon.setup(app, service="svc", sinks=[lunamon.MemorySink()], **options)
    return app


async def _missing(request: web.Request) -> web.Response:
    await match_policy()
    raise web.HTTPNotFound()


def entries(header: str) -> dict[str, float]:
    parts = [part.strip() for part in header.split(",")]
    assert all(ENTRY.match(part) for part in parts), parts
    return {name: float(dur) for name, dur in (p.split(";dur=") for p in parts)}


async def test_off_by_default(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(timing_app())
    response = await client.get("/")
    assert "Server-Timing" not in response.headers


async def test_steps_and_total_in_milliseconds(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(timing_app(server_timing=True))
    response = await client.get("/")
    timing = entries(response.headers["Server-Timing"])
    assert list(timing) == ["match_policy", "face_sample_storage_policy", "total"]
    assert timing["match_policy"] >= 2.0  # slept 2 ms
    assert timing["total"] >= timing["match_policy"] + timing["face_sample_storage_policy"]
    not_found = await client.get("/missing")  # an HTTPException carries it too
    assert list(entries(not_found.headers["Server-Timing"])) == ["match_policy", "total"]


async def test_only_for_requests_that_ask(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(
        timing_app(server_timing=True, server_timing_when="X-Debug-Timing: 1")
    )
    assert "Server-Timing" not in (await client.get("/")).headers
    assert "Server-Timing" not in (await client.get("/", headers={"X-Debug-Timing": "0"})).headers
    asked = await client.get("/", headers={"X-Debug-Timing": "1"})
    assert "total" in entries(asked.headers["Server-Timing"])


async def test_headless_chromium_reads_the_steps(tmp_path: Path) -> None:
    browser = shutil.which("chromium")
    assert browser is not None, "chromium is not installed (`make servers` installs it)"
    runner = web.AppRunner(timing_app(server_timing=True))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    assert site._server is not None
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    try:
        done = await asyncio.to_thread(
            subprocess.run,
            [
                browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                f"--user-data-dir={tmp_path / 'profile'}",
                "--dump-dom", f"http://127.0.0.1:{port}/",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )  # fmt: skip
    finally:
        await runner.cleanup()
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r'<p id="out">(.*?)</p>', done.stdout)
    assert found, done.stdout[-2000:]
    names = [name for name, _ in json.loads(found[1])]
    assert names == ["match_policy", "face_sample_storage_policy", "total"]
