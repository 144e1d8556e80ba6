"""Types of the compiled encoder and recorder core (lunamon/_speedups.c)."""

from collections.abc import Callable
from types import ModuleType
from typing import Any

from lunamon.point import Point

def encode_lines(points: list[Point] | tuple[Point, ...], /) -> bytes: ...
def encode_line(point: Point, /) -> str: ...
def configure(point_module: ModuleType, /) -> None: ...
def float_repr(value: float, /) -> str: ...
def point_time(now_ns: int, /) -> int: ...
def set_last_quantum(quantum: int, /) -> None: ...
def set_slot(slot: int, /) -> None: ...
def configure_ids(claim: Callable[[], int], /) -> None: ...
def set_id_source(prefix: str, counter: int, /) -> None: ...
def request_id(seconds: int, /) -> str: ...
def request_point(
    point_type: type[Point],
    tag_sets: dict[Any, Any],
    params: tuple[str, ...],
    match_info: Any,
    status: int,
    start_ns: int,
    request_id: str,
    elapsed: float,
    steps: dict[str, float],
    /,
) -> Point | None: ...

class CollectorCore:
    route: str
    request_id: str
    steps: dict[str, float]
    extra_tags: dict[str, str] | None
    extra_fields: dict[str, Any] | None
    sent_status: int | None
    started: float
    ended: float
    _start_ns: int
    _token: Any
    def __init__(self, route: str, request_id: str) -> None: ...

def begin(
    collector_type: Any,
    route: str,
    header_value: str | None,
    now_ns: int,
    context_var: Any,
    /,
) -> Any: ...

class Runner:
    """RequestRecorder.run, compiled: the middleware, called (request, handler)."""

    __middleware_version__: int
    def __init__(
        self,
        recorder: Any,
        collector_type: type[CollectorCore],
        current: Any,
        finished: Any,
        expect: Any,
        response_type: type,
        point_type: type,
        time_module: Any,
    ) -> None: ...
    def __call__(self, request: Any, handler: Any) -> Any: ...

class PrepareGate:
    """on_response_prepare, compiled where there is nothing to do."""

    def __init__(self, hook: Any, current: Any, finished: Any, expect: Any) -> None: ...
    def __call__(self, request: Any, response: Any) -> Any: ...

READY: Any

class ChannelCore:
    """The fields of a flusher channel that emit uses (lunamon.flusher), compiled."""

    buffer: Any
    emitted: int
    packed: int
    capacity: int
    wake_at: int
    closed: bool

class Emitter:
    """Flusher.emit, compiled for the point that needs no decision."""

    def __init__(
        self, channels: list[Any], taps: list[Any], emit: Callable[[Point], None]
    ) -> None: ...
    def __call__(self, point: Point, /) -> None: ...

class MonitoredHandler:
    """A handler decorated with @monitor_request, compiled for the common call."""

    def __init__(
        self,
        func: Callable[..., Any],
        reference: Callable[..., Any],
        last: list[Any],
        request_type: type,
        /,
    ) -> None: ...
    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...
    def __get__(self, instance: Any, owner: Any = None) -> Any: ...
