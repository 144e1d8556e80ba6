"""Request ids in LUNA's format, and point times that never collide in one process.

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
from collections.abc import Iterator
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


_new_id_source()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_id_source)


def new_request_id(seconds: int | None = None) -> str:
    """A request id in LUNA's format: ``"<unix seconds>,<uuid4>"``."""
    if seconds is None:
        seconds = int(_wall_time())
    return f"{seconds},{_id_prefix}{next(_id_counter) & 0xFFFFFFFFFFFF:012x}"


def plausible_request_id(value: str) -> bool:
    """Whether a client's id may be kept: 1-128 printable ASCII characters."""
    return 0 < len(value) <= MAX_REQUEST_ID_LENGTH and value.isascii() and value.isprintable()
