"""The campaign's client: a steady, moderate stream of requests to the service, each on a
fresh connection (so that every gunicorn worker gets some), bounded in count and time.

Some requests fail on purpose (400 and 500 answers, an unhandled exception, a route that
does not exist), so that ``error`` points exist. Every answer is kept with its
``Luna-Request-Id``, status and ``X-Worker`` pid; a request that got no answer (its
worker was killed under it) is counted, without an id.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field

import aiohttp

__all__ = ["Answer", "Traffic"]

# (path, weight): mostly the demo service's normal routes, some failures.
_PATHS: tuple[tuple[str, int], ...] = (
    ("/detector", 20),
    ("/extractor", 20),
    ("/extractor/upgrade", 10),
    ("/handlers/3fa85f64-5717-4562-b3fc-2c963f66afa6/events", 20),
    ("/verifiers/v1/verifications", 10),
    ("/detector?fail=400", 8),
    ("/extractor?fail=500", 5),
    ("/verifiers/v2/verifications?fail=raise", 3),
    ("/no/such/route", 4),
)


@dataclass(frozen=True)
class Answer:
    """One answered request: what was asked, what came back, and when (monotonic)."""

    path: str
    status: int
    request_id: str
    worker: int
    sent: float
    received: float


@dataclass
class Traffic:
    """``rate`` requests per second, at most ``concurrency`` at a time, until ``stop()``
    or ``max_requests`` or ``max_seconds``."""

    url: str
    rate: float
    seed: int
    concurrency: int = 16
    max_requests: int = 100_000
    max_seconds: float = 600.0
    answers: list[Answer] = field(default_factory=list)
    unanswered: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        rng = random.Random(self.seed)
        paths = [p for p, _ in _PATHS]
        weights = [w for _, w in _PATHS]
        semaphore = asyncio.Semaphore(self.concurrency)
        tasks: set[asyncio.Task[None]] = set()
        connector = aiohttp.TCPConnector(force_close=True, limit=self.concurrency)
        timeout = aiohttp.ClientTimeout(total=30.0)
        started = time.monotonic()
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            for index in range(self.max_requests):
                if self._stop.is_set() or time.monotonic() - started > self.max_seconds:
                    break
                await semaphore.acquire()
                path = rng.choices(paths, weights)[0]
                task = asyncio.create_task(self._one(session, path, semaphore))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                delay = started + (index + 1) / self.rate - time.monotonic()
                if delay > 0:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), delay)
            if tasks:
                await asyncio.gather(*tasks)

    async def _one(
        self, session: aiohttp.ClientSession, path: str, semaphore: asyncio.Semaphore
    ) -> None:
        sent = time.monotonic()
        try:
            async with session.post(self.url + path) as response:
                await response.read()
                self.answers.append(
                    Answer(
                        path,
                        response.status,
                        response.headers.get("Luna-Request-Id", ""),
                        int(response.headers.get("X-Worker", "0") or 0),
                        sent,
                        time.monotonic(),
                    )
                )
        except (aiohttp.ClientError, asyncio.TimeoutError):
            self.unanswered += 1
        finally:
            semaphore.release()
