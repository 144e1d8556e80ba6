"""What the end-to-end reliability tests share: the invariant, a traffic driver for the
demo service, and non-blocking read-back from influxd (RELIABILITY.md's catalogue)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient
from servers import InfluxServer

from lunamon import Monitoring
from lunamon.flusher import SinkStats

__all__ = [
    "SEED_PATHS",
    "Answer",
    "ClientFactory",
    "assert_invariant",
    "assert_served",
    "drive",
    "eventually",
    "fast_policy",
    "new_db",
    "stored_request_ids",
    "stored_rows",
]

ClientFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]

# One path per seed resource of the demo service (all POST, all answer 200 or 201).
SEED_PATHS: tuple[str, ...] = (
    "/detector",
    "/extractor",
    "/extractor/upgrade",
    "/handlers/3fa85f64-5717-4562-b3fc-2c963f66afa6/events",
    "/verifiers/v1/verifications",
)


def new_db() -> str:
    """A database name of its own for one test (the influxd fixtures are shared)."""
    return f"rel_{uuid.uuid4().hex[:12]}"


def fast_policy(**overrides: Any) -> dict[str, Any]:
    """Settings that flush, retry and give up fast enough for a test (``setup()`` options)."""
    options: dict[str, Any] = {
        "flush_interval": 0.05,
        "batch_size": 100,
        "buffer_size": 10_000,
        "shutdown_timeout": 3.0,
        "max_retries": 1000,
        "retry_base_delay": 0.02,
        "retry_max_delay": 0.2,
        "write_timeout": 10.0,
    }
    options.update(overrides)
    return options


def assert_invariant(stats: Mapping[str, SinkStats]) -> None:
    """``emitted == written + sum(dropped) + buffered`` for every sink."""
    for name, sink in stats.items():
        accounted = sink["written"] + sum(sink["dropped"].values()) + sink["buffered"]
        assert sink["emitted"] == accounted, (name, sink)


@dataclass(frozen=True)
class Answer:
    """One request of the driver: what was asked and what the service answered."""

    path: str
    status: int
    request_id: str
    seconds: float


async def drive(
    client: TestClient[web.Request, web.Application],
    count: int,
    *,
    concurrency: int = 4,
    paths: Sequence[str] = SEED_PATHS,
    monitoring: Monitoring | None = None,
) -> list[Answer]:
    """``count`` requests over ``paths`` (round robin), ``concurrency`` at a time.

    With ``monitoring`` the invariant is checked after every answer.
    """
    semaphore = asyncio.Semaphore(concurrency)

    async def one(index: int) -> Answer:
        path = paths[index % len(paths)]
        async with semaphore:
            started = time.perf_counter()
            async with client.post(path) as response:
                await response.read()
                answer = Answer(
                    path,
                    response.status,
                    response.headers.get("Luna-Request-Id", ""),
                    time.perf_counter() - started,
                )
        if monitoring is not None:
            assert_invariant(monitoring.stats())
        return answer

    return list(await asyncio.gather(*(one(i) for i in range(count))))


def assert_served(answers: Sequence[Answer]) -> None:
    """Every request got the service's normal answer (never a 5xx caused by monitoring)."""
    bad = [a for a in answers if a.status not in (200, 201)]
    assert not bad, bad[:5]
    assert all(a.request_id for a in answers)


async def eventually(
    predicate: Callable[[], object], timeout: float = 10.0, what: str = ""
) -> None:
    """Poll a cheap synchronous ``predicate`` from the event loop until it is truthy."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(0.01)


async def stored_rows(server: InfluxServer, query: str, db: str) -> list[dict[str, Any]]:
    """``server.rows`` in a worker thread: the event loop keeps serving and flushing."""
    return await asyncio.to_thread(server.rows, query, db)


async def stored_request_ids(server: InfluxServer, db: str, series: str = "request") -> list[str]:
    """Every stored ``request_id`` of ``series``, duplicates kept."""
    rows = await stored_rows(server, f'SELECT "request_id" FROM "{series}"', db)
    return [str(row["request_id"]) for row in rows]
