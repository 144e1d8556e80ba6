"""Server-Timing: the request's step times and total in a response header (opt-in),
read back by a real browser's Performance API."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs

import lunamon
from lunamon.settings import MIN_TIMING_SECRET
from lunamon.testing import capture_points

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


SECRET = "q8Vd2-timing-secret-0123"


async def test_only_for_requests_that_carry_the_secret(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(
        timing_app(server_timing=True, server_timing_when=f"X-Debug-Timing: {SECRET}")
    )
    for sent in ({}, {"X-Debug-Timing": "1"}, {"X-Debug-Timing": SECRET[:-1]}):
        response = await client.get("/", headers=sent)
        assert "Server-Timing" not in response.headers, sent
        # A cache must not hand a timed answer to others: it varies by the gating header.
        assert response.headers["Vary"] == "X-Debug-Timing"
    asked = await client.get("/", headers={"X-Debug-Timing": SECRET})
    assert "total" in entries(asked.headers["Server-Timing"])
    assert asked.headers["Vary"] == "X-Debug-Timing"
    not_found = await client.get("/missing", headers={"X-Debug-Timing": SECRET})
    assert not_found.status == 404
    assert "Server-Timing" in not_found.headers
    assert not_found.headers["Vary"] == "X-Debug-Timing"


async def test_vary_keeps_what_the_handler_set(aiohttp_client: ClientFactory) -> None:
    async def negotiated(request: web.Request) -> web.Response:
        return web.Response(text="x", headers={"Vary": request.query.get("vary", "Accept")})

    app = web.Application()
    app.router.add_get("/", negotiated)
    lunamon.setup(
        app,
        service="svc",
        sinks=[lunamon.MemorySink()],
        server_timing=True,
        server_timing_when=f"X-Debug-Timing: {SECRET}",
    )
    client = await aiohttp_client(app)
    assert (await client.get("/")).headers["Vary"] == "Accept, X-Debug-Timing"
    assert (await client.get("/?vary=*")).headers["Vary"] == "*"
    again = await client.get("/?vary=accept, x-debug-timing")
    assert again.headers["Vary"] == "accept, x-debug-timing"
    unspaced = await client.get("/?vary=Origin,X-Debug-Timing")  # a list without spaces
    assert unspaced.headers["Vary"] == "Origin,X-Debug-Timing"


@pytest.mark.parametrize(
    ("when", "message"),
    [
        ("X-Debug-Timing: 1", "too easy to guess"),
        (f"X-Debug-Timing: {SECRET[:15]}", "too easy to guess"),
        ("X-Debug-Timing", "a header name alone ('X-Debug-Timing') lets any client"),
    ],
)
def test_a_gate_anyone_could_open_is_refused(when: str, message: str) -> None:
    with pytest.raises(lunamon.SettingsError, match="server_timing_when") as refused:
        timing_app(server_timing=True, server_timing_when=when)
    assert message in str(refused.value)
    timing_app(server_timing=True, server_timing_when=f"X-Debug-Timing: {SECRET[:16]}")


def test_the_secret_never_shows_in_the_settings_repr() -> None:
    settings = lunamon.MonitoringSettings(server_timing_when=f"X-Debug-Timing: {SECRET}")
    assert SECRET not in repr(settings)
    assert "server_timing_when='X-Debug-Timing: ***'" in repr(settings)


async def test_the_secret_from_a_file(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    secret_file = tmp_path / "timing"
    secret_file.write_text(f"{SECRET}\n")
    client = await aiohttp_client(
        timing_app(
            server_timing=True,
            server_timing_when="X-Debug-Timing",
            server_timing_secret_file=str(secret_file),
        )
    )
    assert "Server-Timing" not in (await client.get("/", headers={"X-Debug-Timing": "x"})).headers
    asked = await client.get("/", headers={"X-Debug-Timing": SECRET})
    assert "total" in entries(asked.headers["Server-Timing"])


def test_a_secret_file_of_exactly_the_minimum_length_serves(tmp_path: Path) -> None:
    exact = tmp_path / "exact"
    exact.write_text(SECRET[:MIN_TIMING_SECRET])
    timing_app(
        server_timing=True,
        server_timing_when="X-Debug-Timing",
        server_timing_secret_file=str(exact),
    )
    exact.write_text(SECRET[: MIN_TIMING_SECRET - 1])
    with pytest.raises(lunamon.SettingsError, match="at least 16 characters"):
        timing_app(
            server_timing=True,
            server_timing_when="X-Debug-Timing",
            server_timing_secret_file=str(exact),
        )


def test_a_secret_file_that_cannot_serve_is_refused_at_setup(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("1234")
    for path, message in [(short, "at least 16 characters"), (tmp_path / "no", "cannot read")]:
        with pytest.raises(lunamon.SettingsError, match="server_timing_secret_file") as refused:
            timing_app(
                server_timing=True,
                server_timing_when="X-Debug-Timing",
                server_timing_secret_file=str(path),
            )
        assert message in str(refused.value)
    with pytest.raises(lunamon.SettingsError, match="header's name alone"):
        timing_app(
            server_timing=True,
            server_timing_when=f"X-Debug-Timing: {SECRET}",
            server_timing_secret_file=str(short),
        )


async def test_a_callable_decides_which_requests_are_timed(aiohttp_client: ClientFactory) -> None:
    def allow(request: web.Request) -> bool:
        if request.query.get("who") == "boom":
            raise RuntimeError("the gate failed")
        return request.query.get("who") == "staff"

    client = await aiohttp_client(timing_app(server_timing=True, server_timing_allow=allow))
    assert "Server-Timing" in (await client.get("/?who=staff")).headers
    for who in ("guest", "boom"):  # a failing gate times nothing and breaks nothing
        response = await client.get(f"/?who={who}")
        assert response.status == 200
        assert "Server-Timing" not in response.headers
        assert "Vary" not in response.headers  # no header gate, nothing for caches to vary on
    with pytest.raises(TypeError, match=r"^server_timing_allow= takes a callable \(request\)"):
        timing_app(server_timing=True, server_timing_allow="staff")


async def test_a_failing_gate_callable_is_logged_with_its_error(
    aiohttp_client: ClientFactory,
) -> None:
    failure = RuntimeError("the gate failed " + "x" * 600)  # longer than the 512 logged

    def allow(request: web.Request) -> bool:
        raise failure

    client = await aiohttp_client(timing_app(server_timing=True, server_timing_allow=allow))
    with capture_logs() as logs:
        assert (await client.get("/")).status == 200
    (event,) = [e for e in logs if e["event"] == "server_timing_allow_failed"]
    assert (event["log_level"], event["error"]) == ("error", repr(failure)[:512])


async def test_the_callable_and_the_header_must_both_agree(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(
        timing_app(
            server_timing=True,
            server_timing_when=f"X-Debug-Timing: {SECRET}",
            server_timing_allow=lambda request: request.query.get("who") == "staff",
        )
    )
    shown = {
        (who, carries): "Server-Timing"
        in (
            await client.get(f"/?who={who}", headers={"X-Debug-Timing": SECRET} if carries else {})
        ).headers
        for who in ("staff", "guest")
        for carries in (True, False)
    }
    assert shown == {
        ("staff", True): True,
        ("staff", False): False,
        ("guest", True): False,
        ("guest", False): False,
    }


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


# ----------------------------------------------------------- one execution_time


_crash_started: list[float] = []


async def _crash(request: web.Request) -> web.Response:
    _crash_started.append(time.perf_counter())
    raise RuntimeError("unhandled")


async def _stream(request: web.Request) -> web.StreamResponse:
    await match_policy()
    response = web.StreamResponse()
    await response.prepare(request)
    await response.write(b"x" * 10)
    return response


def _one_time_app(static: Path) -> web.Application:
    app = web.Application()
    app.router.add_get("/ok", page)
    app.router.add_get("/json", _json)
    app.router.add_get("/missing", _missing)
    app.router.add_get("/crash", _crash)
    app.router.add_get("/stream", _stream)
    app.router.add_static("/static", static)
    lunamon.setup(app, service="svc", sinks=[lunamon.MemorySink()], server_timing=True)
    return app


async def _json(request: web.Request) -> web.Response:
    await storage()
    return web.json_response({"ok": True})


async def test_the_header_total_is_the_points_execution_time_for_each_response_kind(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    (tmp_path / "file.txt").write_text("static")
    logged: list[float] = []

    class _When(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logged.append(time.perf_counter())

    when = _When()
    logging.getLogger("aiohttp.server").addHandler(when)
    try:
        client = await aiohttp_client(_one_time_app(tmp_path))
        with capture_points() as points:
            headers = {}
            for path in ("/ok", "/json", "/missing", "/crash", "/static/file.txt", "/stream"):
                response = await client.get(path)
                await response.read()
                headers[path] = response.headers.get("Server-Timing")
            await client.close()  # every request's task is done: all recorded
    finally:
        logging.getLogger("aiohttp.server").removeHandler(when)
    recorded = {p.tags["route"].split(":", 1)[1]: p for p in points.series("request")}
    recorded["/static/file.txt"] = recorded.pop("/static")
    assert recorded["/crash"].tags["status_code"] == "500"
    for path in ("/ok", "/json", "/missing", "/crash", "/static/file.txt"):
        total = entries(str(headers[path]))["total"]
        assert total == round(float(recorded[path].fields["execution_time"]) * 1000, 3), path
    # A stream's header goes out before its body: the steps so far, no total.
    assert list(entries(str(headers["/stream"]))) == ["match_policy"]
    stream = recorded["/stream"].fields
    assert float(stream["execution_time"]) >= float(stream["match_policy_time"])
    # An unhandled exception's execution ends when aiohttp's 500 is ready, after aiohttp
    # logged the exception: what the client waited for.
    assert logged, "aiohttp logged no error"
    assert float(recorded["/crash"].fields["execution_time"]) >= logged[-1] - _crash_started[-1]
