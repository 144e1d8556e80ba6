"""Request ids in LUNA's format, and point times that never collide.

Point times: InfluxDB keeps one point per (series, tags, time), so two requests
with the same route and status must never get the same time, in one process or
across the workers of a service and its hosts. A time is the wall clock's
microsecond, and its last three nanosecond digits are the process's *slot*
(``pid % 1000``, taken again after ``fork``): two processes with different slots
never write the same time, and within a process a request in the same
microsecond as the previous one takes the next microsecond. Clocks are not
nanosecond-accurate, so nothing of value is lost. Gunicorn's workers (pids
within 1000 of each other) always differ; processes on other hosts differ
unless their pids end in the same three digits and they write the same tags in
the same microsecond.

Ids have uuid4's layout (version and variant bits) but are 74 random bits drawn
once per process (again after ``fork``, from a private ``random.Random``)
followed by a 48-bit counter: unique within the process by construction and
across processes by the random part, for one string format per request
(``uuid.uuid4()`` costs a syscall, an object and 2-4 µs). Ids must be unique,
not secret; a user calling ``random.seed()`` cannot make them repeat.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from collections.abc import Callable, Iterator
from typing import Final

MAX_REQUEST_ID_LENGTH: Final = 128

_wall_time = time.time
_id_prefix = ""
_id_counter: Iterator[int] = iter(())


def _new_id_source() -> None:
    """A fresh random uuid4 prefix and counter start: at import, and in a forked child."""
    global _id_prefix, _id_counter
    rng = random.Random()
    h = f"{rng.getrandbits(80):020x}"
    variant = "89ab"[int(h[16], 16) & 3]
    _id_prefix = f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-"
    _id_counter = itertools.count(rng.getrandbits(47))


_slot = 0  # this process's last three nanosecond digits of every point time


def _new_process() -> None:
    """A fresh id source and time slot: at import, and in a forked child."""
    global _slot
    _new_id_source()
    _slot = os.getpid() % 1000


_new_process()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_process)


class PointClock:
    """Point times in ns: the microsecond, then this process's slot; never twice the same."""

    __slots__ = ("_last_us",)

    def __init__(self) -> None:
        self._last_us = 0

    def now_ns(self, time_ns: Callable[[], int] = time.time_ns) -> int:
        us = time_ns() // 1000
        if us <= self._last_us:
            us = self._last_us + 1
        self._last_us = us
        return us * 1000 + _slot


def new_request_id(seconds: int | None = None) -> str:
    """A request id in LUNA's format: ``"<unix seconds>,<uuid4>"``."""
    if seconds is None:
        seconds = int(_wall_time())
    return f"{seconds},{_id_prefix}{next(_id_counter) & 0xFFFFFFFFFFFF:012x}"


def plausible_request_id(value: str) -> bool:
    """Whether a client's id may be kept: 1-128 printable ASCII characters."""
    return 0 < len(value) <= MAX_REQUEST_ID_LENGTH and value.isascii() and value.isprintable()
