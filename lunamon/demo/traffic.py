"""Generated traffic for the demo service: a weighted mix of its routes and failures.

Each request picks a route (handler events are the busiest, as in LUNA), and
about one in ten asks the service to fail (``?fail=...``, see
:mod:`lunamon.demo.service`): LUNA error bodies, unhandled exceptions, and
requests the client gives up on (``fail=hang`` with a short client timeout,
recorded by the service as 499).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import aiohttp

__all__ = ["FAILURES", "ROUTES", "PlannedRequest", "TrafficResult", "drive", "plan_request"]

HANDLER_IDS: Final = (
    "2a9c0d52-0c6a-4a4b-9bd4-54b3a2f4c001",
    "7f3e1b90-5d2c-4e8f-a1b6-0c9d8e7f6a02",
    "c41d7e55-9a3b-4f10-8e2d-6b5a4c3d2e03",
)
VERIFIER_IDS: Final = (
    "0b6f8e2a-3c4d-4e5f-9a7b-8c9d0e1f2a04",
    "e5d4c3b2-a1f0-4e9d-8c7b-6a5f4e3d2c05",
)

# (route template, path maker, weight)
ROUTES: Final[tuple[tuple[str, Callable[[random.Random], str], int], ...]] = (
    (
        "POST:/handlers/{handlerId}/events",
        lambda rng: f"/handlers/{rng.choice(HANDLER_IDS)}/events",
        40,
    ),
    (
        "POST:/verifiers/{verifierId}/verifications",
        lambda rng: f"/verifiers/{rng.choice(VERIFIER_IDS)}/verifications",
        15,
    ),
    ("POST:/detector", lambda rng: "/detector", 20),
    ("POST:/extractor", lambda rng: "/extractor", 15),
    ("POST:/extractor/upgrade", lambda rng: "/extractor/upgrade", 10),
)

# fail= value -> share of requests (the rest succeed): about 10% fail.
FAILURES: Final[dict[str, float]] = {
    "400": 0.035,
    "500": 0.01,
    "raise": 0.01,
    "luna_exc": 0.015,
    "http": 0.015,
    "hang": 0.006,
}


@dataclass(frozen=True)
class PlannedRequest:
    route: str
    path: str
    fail: str | None
    request_id: str | None  # half the requests arrive with a Luna-Request-Id, as behind LUNA's API


def plan_request(rng: random.Random) -> PlannedRequest:
    """One request of the mix."""
    route, make_path, _ = rng.choices(ROUTES, weights=[w for *_, w in ROUTES])[0]
    draw = rng.random()
    fail = None
    for name, share in FAILURES.items():
        if draw < share:
            fail = name
            break
        draw -= share
    request_id = None
    if rng.random() < 0.5:
        request_id = f"{int(time.time())},{uuid.UUID(int=rng.getrandbits(128), version=4)}"
    return PlannedRequest(route, make_path(rng), fail, request_id)


@dataclass
class TrafficResult:
    """What the client saw."""

    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    abandoned: int = 0  # fail=hang: the client timed out and went away
    timeouts: int = 0  # other requests that timed out (should be none)
    client_errors: Counter[str] = field(default_factory=Counter)
    by_route: Counter[str] = field(default_factory=Counter)
    elapsed: float = 0.0

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed if self.elapsed else 0.0


async def drive(
    base_url: str,
    *,
    requests: int | None,
    concurrency: int,
    duration: float | None = None,
    seed: int | None = None,
    abandon_after: float = 0.05,
    timeout: float = 30.0,
    on_request: Callable[[], None] | None = None,
) -> TrafficResult:
    """Send the mix to ``base_url`` with ``concurrency`` workers.

    Stops after ``requests`` requests or ``duration`` seconds, whichever comes
    first (at least one of them must be given). ``fail=hang`` requests are
    abandoned after ``abandon_after`` seconds.
    """
    if requests is None and duration is None:
        raise ValueError("give requests or duration")
    rng = random.Random(seed)
    result = TrafficResult()
    counter = itertools.count()
    started = time.monotonic()
    deadline = started + duration if duration is not None else None
    body = {"image": "data:image/jpeg;base64,/9j/4AAQSkZJRgABAQ", "source": "lunamon-demo"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    abandon_timeout = aiohttp.ClientTimeout(total=abandon_after)

    async def worker(session: aiohttp.ClientSession) -> None:
        while True:
            index = next(counter)
            if requests is not None and index >= requests:
                return
            if deadline is not None and time.monotonic() >= deadline:
                return
            planned = plan_request(rng)
            params = {"fail": planned.fail} if planned.fail else {}
            headers = {"Luna-Request-Id": planned.request_id} if planned.request_id else {}
            result.sent += 1
            result.by_route[planned.route] += 1
            try:
                async with session.post(
                    base_url + planned.path,
                    json=body,
                    params=params,
                    headers=headers,
                    timeout=abandon_timeout if planned.fail == "hang" else client_timeout,
                ) as response:
                    await response.read()
                    result.statuses[response.status] += 1
            except TimeoutError:
                if planned.fail == "hang":
                    result.abandoned += 1
                else:
                    result.timeouts += 1
            except aiohttp.ClientError as exc:
                result.client_errors[type(exc).__name__] += 1
            if on_request is not None:
                on_request()

    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    result.elapsed = time.monotonic() - started
    return result
