"""Request ids in LUNA's format, and point times that never collide.

Point times: InfluxDB keeps one point per (series, tags, time), so two requests
with the same route and status must never get the same time, in one process or
across the workers, containers and hosts of a service. A time is a 10 µs
*quantum* of the wall clock followed by the process's *slot*, four digits
(0-9999), as its last four nanosecond digits. Within a process a point in the
same quantum as the previous one takes the next quantum (exact up to 100,000
points a second, beyond which times run ahead of the clock), so two processes
with different slots never write the same time. Clocks are not accurate to
10 µs, so nothing of value is lost.

A slot is *claimed*, lazily at the first point and again in a forked child: the
process holds a non-blocking ``flock`` on ``slot-NNNN`` in a lock folder
(``slot_dir``; by default ``lunamon-slots-<uid>`` in the temporary folder), so
the processes of one host (gunicorn's workers) hold different slots by
construction, and a slot is free again when its process dies, even by SIGKILL.
The search starts at a slot drawn from ``os.urandom``: processes that share no
lock folder (containers, hosts) hold the same slot with probability 1/10,000
per pair. ``instance`` (0-99, unique per replica) makes that exact too: a
replica's processes claim among its own 100 slots, ``instance * 100`` on. When
no lock can be taken (no ``fcntl``, an unwritable folder) the drawn slot is
used unlocked, with a warning.

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
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Final

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: slots are drawn, not locked
    fcntl = None  # type: ignore[assignment]

from lunamon._log import logger
from lunamon.point import compiled_speedups

MAX_REQUEST_ID_LENGTH: Final = 128

QUANTUM_NS: Final = 10_000  # a point time: a 10 µs quantum ...
SLOTS: Final = QUANTUM_NS  # ... followed by the process's slot, 0-9999
INSTANCES: Final = 100  # `instance` 0-99 ...
INSTANCE_SLOTS: Final = SLOTS // INSTANCES  # ... each with 100 slots of its own

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
    start = rng.getrandbits(47)
    _id_counter = itertools.count(start)
    if _core is not None:
        _core.set_id_source(_id_prefix, start)


_core = compiled_speedups()  # point times and ids, compiled (the functions below: the reference)


# The slot: -1 until the first point claims one (and again in a forked child).
_slot = -1
_slot_fd = -1  # the open lock file holding it, -1 when unlocked
_slot_dir = ""  # the `slot_dir` setting: "" is the default folder
_instance = -1  # the `instance` setting: -1 is none
_claim_lock = threading.Lock()
# The last quantum given, for every clock of the process: they share the slot.
_last_quantum = 0


def _draw_start(size: int) -> int:
    """Where the search for a free slot starts: from ``os.urandom``, fresh in every process
    (no seed, no state inherited from a parent)."""
    return random.SystemRandom().randrange(size)


def default_slot_dir() -> str:
    """The lock folder when ``slot_dir`` is not set: one per user, in the temporary folder."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return os.path.join(tempfile.gettempdir(), f"lunamon-slots-{uid}")


def configure_slots(slot_dir: str = "", instance: int = -1) -> None:
    """Where this process claims its slot and from which range (the settings, at setup).

    A slot already held under other settings is given up; the next point claims anew.
    """
    global _slot_dir, _instance
    with _claim_lock:
        if (slot_dir, instance) == (_slot_dir, _instance):
            return
        _slot_dir, _instance = slot_dir, instance
        _release()


def _release() -> None:
    global _slot, _slot_fd
    if _slot_fd >= 0:
        os.close(_slot_fd)  # in a forked child: the parent's lock stays (its own descriptor)
    _slot, _slot_fd = -1, -1
    if _core is not None:
        _core.set_slot(-1)


def _claim() -> int:
    """Claim this process's slot: the first free one from a random start (see above)."""
    global _slot, _slot_fd
    with _claim_lock:
        if _slot >= 0:
            return _slot
        base, size = (_instance * INSTANCE_SLOTS, INSTANCE_SLOTS) if _instance >= 0 else (0, SLOTS)
        start = _draw_start(size)
        directory = _slot_dir or default_slot_dir()
        fd, slot, problem = _lock_a_slot(directory, base, size, start)
        if fd < 0:
            slot = base + start
            logger.warning(
                "point_slot_unlocked",
                slot=slot,
                slot_dir=directory,
                problem=problem,
                consequence="another process of this host may draw the same slot",
            )
        _slot, _slot_fd = slot, fd
        if _core is not None:
            _core.set_slot(slot)
        return slot


def _lock_a_slot(directory: str, base: int, size: int, start: int) -> tuple[int, int, str]:
    """``(descriptor, slot, "")`` of the first slot from ``start`` whose lock was free,
    or ``(-1, -1, problem)``."""
    if fcntl is None:  # pragma: no cover - not POSIX
        return -1, -1, "no fcntl.flock on this platform"
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if directory == default_slot_dir() and os.stat(directory).st_uid != os.getuid():
            return -1, -1, "the folder belongs to another user"
    except OSError as exc:
        return -1, -1, f"{type(exc).__name__}: {exc}"
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    problem = f"all {size} slots are held"
    for i in range(size):
        slot = base + (start + i) % size
        try:
            fd = os.open(os.path.join(directory, f"slot-{slot:04d}"), flags, 0o600)
        except OSError as exc:  # another user's file: held or not, not ours to take
            problem = f"{type(exc).__name__}: {exc}"
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:  # BlockingIOError: another process holds it
            os.close(fd)
            if not isinstance(exc, BlockingIOError):
                problem = f"{type(exc).__name__}: {exc}"
            continue
        return fd, slot, ""
    return -1, -1, problem


def current_slot() -> int:
    """This process's slot, claimed now if it holds none yet."""
    return _slot if _slot >= 0 else _claim()


def _new_process() -> None:
    """A fresh id source and no slot: at import, and in a forked child (which must not
    share its parent's slot; it claims its own at its first point)."""
    global _claim_lock
    _new_id_source()
    _claim_lock = threading.Lock()  # another thread may have held it at the fork
    _release()


_new_process()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_process)


class PointClock:
    """Point times in ns: a 10 µs quantum, then this process's slot; never twice the same.

    Every clock of a process shares the last quantum given (they share the slot).
    """

    __slots__ = ()

    def __init__(self, slot_dir: str | None = None, instance: int | None = None) -> None:
        if slot_dir is not None or instance is not None:
            configure_slots(slot_dir or "", -1 if instance is None else instance)

    def now_ns(self, time_ns: Callable[[], int] = time.time_ns) -> int:
        return point_time(time_ns())


def _point_time(now_ns: int) -> int:
    """The point time for ``now_ns``: its quantum, or the next one not given yet, then
    the slot (claimed now if this process holds none)."""
    global _last_quantum
    quantum = now_ns // QUANTUM_NS
    if quantum <= _last_quantum:
        quantum = _last_quantum + 1
    _last_quantum = quantum
    slot = _slot
    if slot < 0:
        slot = _claim()
    return quantum * QUANTUM_NS + slot


def _request_id(seconds: int) -> str:
    """A new request id for a request that started at ``seconds`` (unix time)."""
    return f"{seconds},{_id_prefix}{next(_id_counter) & 0xFFFFFFFFFFFF:012x}"


# The compiled ones when built (the same state, kept in the extension): the recorder
# calls these two on every request.
point_time: Callable[[int], int] = _point_time
request_id: Callable[[int], str] = _request_id
if _core is not None:
    _core.configure_ids(lambda: _slot if _slot >= 0 else _claim())
    point_time, request_id = _core.point_time, _core.request_id


def _set_clock(last_quantum: int, slot: int | None = None) -> None:
    """Set the clock's state, in Python and in the extension (tests: a clock turned back,
    a slot forced)."""
    global _last_quantum, _slot
    _last_quantum = last_quantum
    if slot is not None:
        _slot = slot
    if _core is not None:
        _core.set_last_quantum(last_quantum)
        if slot is not None:
            _core.set_slot(slot)


def new_request_id(seconds: int | None = None) -> str:
    """A request id in LUNA's format: ``"<unix seconds>,<uuid4>"``."""
    if seconds is None:
        seconds = int(_wall_time())
    return request_id(seconds)


def plausible_request_id(value: str) -> bool:
    """Whether a client's id may be kept: 1-128 printable ASCII characters."""
    return 0 < len(value) <= MAX_REQUEST_ID_LENGTH and value.isascii() and value.isprintable()
