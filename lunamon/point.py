"""Points and their InfluxDB 1.x line-protocol encoding.

The encoder follows what InfluxDB 1.x really parses (``models/points.go``), not
what other clients do: backslashes in tag values are left as they are (1.x does
not unescape ``\\\\`` there), newlines never split a line, and values InfluxDB
cannot store are sanitised or omitted by the rules of :mod:`lunamon._validation`.
Escaped keys, measurements and tag pairs are cached, and nothing is escaped
unless a special character is present.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any, Final

from lunamon._validation import (
    INT64_MAX,
    INT64_MIN,
    FieldValue,
    TagValue,
    omitted_counts,
    validate_field_value,
    validate_key,
    validate_series,
    validate_tag_value,
)

__all__ = ["FieldValue", "Point", "TagValue", "encode_lines", "omitted_counts"]

# --------------------------------------------------------------------------- Point


class TagSet(dict[str, str]):
    """A tags dict shared by many points and never mutated (the recorder makes them).

    It remembers its encoded line prefix (series + tags), so the encoder escapes
    and joins a route's tags once, not once per point; and the metrics' label
    key, so the metrics sink builds it once per route and status.
    """

    __slots__ = ("_head", "_metrics_key")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head: tuple[str, str] | None = None
        self._metrics_key: tuple[str, str, str] | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        return (TagSet, (dict(self),))


class Point(tuple):  # type: ignore[type-arg]
    """One event: series, start time (ns since the epoch), tags and fields.

    Immutable and slotted (a tuple underneath, like a namedtuple). Constructing
    one validates everything; code that already holds validated parts (the
    middleware) uses :meth:`trusted`, which skips the checks.
    """

    __slots__ = ()

    @property
    def series(self) -> str:
        """The series (measurement) name."""
        return self[0]  # type: ignore[no-any-return]

    @property
    def time_ns(self) -> int:
        """Start time of the event, ns since the epoch."""
        return self[1]  # type: ignore[no-any-return]

    @property
    def tags(self) -> Mapping[str, str]:
        """Tags (indexed), values as stored: strings."""
        return self[2]  # type: ignore[no-any-return]

    @property
    def fields(self) -> Mapping[str, FieldValue]:
        """Fields (not indexed)."""
        return self[3]  # type: ignore[no-any-return]

    def __new__(
        cls,
        series: str,
        time_ns: int,
        tags: Mapping[str, TagValue] | None = None,
        fields: Mapping[str, object] | None = None,
    ) -> Point:
        series = validate_series(series)
        if type(time_ns) is not int:
            if isinstance(time_ns, bool) or not isinstance(time_ns, int):
                raise TypeError(f"time_ns must be an int, not {type(time_ns).__name__}")
            time_ns = int(time_ns)
        if not INT64_MIN <= time_ns <= INT64_MAX:
            raise ValueError(f"time_ns {time_ns} is outside int64")
        clean_tags: dict[str, str] = {}
        for key, value in (tags or {}).items():
            validate_key(key, "tag key")
            text = validate_tag_value(value)
            if text is not None:
                clean_tags[key] = text
        clean_fields: dict[str, FieldValue] = {}
        for key, raw in (fields or {}).items():
            validate_key(key, "field key")
            checked = validate_field_value(raw)
            if checked is not None:
                clean_fields[key] = checked
        if not clean_fields:
            raise ValueError(f"point of series {series!r} has no storable field")
        return tuple.__new__(cls, (series, time_ns, clean_tags, clean_fields))

    @classmethod
    def trusted(
        cls, series: str, time_ns: int, tags: dict[str, str], fields: dict[str, FieldValue]
    ) -> Point:
        """Build a point from parts already validated by lunamon (no checks)."""
        return tuple.__new__(cls, (series, time_ns, tags, fields))

    def __repr__(self) -> str:
        return (
            f"Point(series={self[0]!r}, time_ns={self[1]!r}, tags={self[2]!r}, fields={self[3]!r})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (Point.trusted, tuple(self))

    def to_line_protocol(self) -> str:
        """This point as one InfluxDB line-protocol line (no trailing newline)."""
        return _line_encoder(self)


# --------------------------------------------------------------------------- encoding

_CACHE_LIMIT: Final = 50_000
_series_cache: dict[str, str] = {}
_tag_cache: dict[tuple[str, str], str] = {}
_field_key_cache: dict[str, str] = {}

_TAG_SPECIALS: Final = (",", "=", " ")


def _escape_key(text: str) -> str:
    # Tag keys, tag values and field keys escape comma, equals sign and space.
    if "," in text or "=" in text or " " in text:
        return text.replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")
    return text


def _escape_series(name: str) -> str:
    escaped = name
    if "," in name or " " in name:
        escaped = name.replace(",", "\\,").replace(" ", "\\ ")
    if len(_series_cache) >= _CACHE_LIMIT:
        _series_cache.clear()
    _series_cache[name] = escaped
    return escaped


def _tag_pair(key: str, value: str) -> str:
    pair = f",{_escape_key(key)}={_escape_key(value)}"
    if len(_tag_cache) >= _CACHE_LIMIT:
        _tag_cache.clear()
    _tag_cache[(key, value)] = pair
    return pair


def _field_key(key: str) -> str:
    escaped = _escape_key(key) + "="
    if len(_field_key_cache) >= _CACHE_LIMIT:
        _field_key_cache.clear()
    _field_key_cache[key] = escaped
    return escaped


def _head(series: str, tags: Mapping[str, str]) -> str:
    head = _series_cache.get(series)
    if head is None:
        head = _escape_series(series)
    if tags:
        tag_get = _tag_cache.get
        for item in tags.items():
            pair = tag_get(item)
            head += pair if pair is not None else _tag_pair(*item)
    return head


def _point_head(series: str, tags: Mapping[str, str]) -> str:
    """The line head of a point: a :class:`TagSet` keeps its own once made."""
    if type(tags) is TagSet:
        cached = tags._head
        if cached is not None and cached[0] == series:
            return cached[1]
        head = _head(series, tags)
        tags._head = (series, head)
        return head
    return _head(series, tags)


def _encode(point: Point) -> str:
    series, time_ns, tags, fields = point
    head = _point_head(series, tags)
    key_get = _field_key_cache.get
    parts: list[str] = []
    append = parts.append
    for key, value in fields.items():
        fkey = key_get(key) or _field_key(key)
        cls = type(value)
        if cls is float:
            append(fkey + _float_repr(value))
        elif cls is str:
            if "\\" in value or '"' in value:
                value = value.replace("\\", "\\\\").replace('"', '\\"')
            append(f'{fkey}"{value}"')
        elif cls is bool:
            append(fkey + ("true" if value else "false"))
        else:
            append(f"{fkey}{value}i")
    return f"{head} {','.join(parts)} {time_ns}"


_float_repr = float.__repr__


def encode_lines(points: list[Point] | tuple[Point, ...]) -> bytes:
    """Points as a newline-terminated line-protocol body (UTF-8)."""
    return _encoder(points)


def _encode_lines(points: list[Point] | tuple[Point, ...]) -> bytes:
    """:func:`encode_lines` in pure Python."""
    if not points:
        return b""
    return ("\n".join([_encode(p) for p in points]) + "\n").encode()


Encoder = Callable[[list[Point] | tuple[Point, ...]], bytes]
LineEncoder = Callable[[Point], str]


def pure_python_requested() -> bool:
    """Whether ``LUNAMON_PURE_PYTHON`` asks for the pure-Python paths (no compiled encoder,
    no orjson): ``1``, ``true``, ``yes`` or ``on``."""
    return os.environ.get("LUNAMON_PURE_PYTHON", "").strip().lower() in ("1", "true", "yes", "on")


def compiled_speedups() -> ModuleType | None:
    """``lunamon._speedups`` when it was built and ``LUNAMON_PURE_PYTHON`` is not set, else
    None: the encoder here, point times and ids (``_ids``), the collector's fields and the
    recorder's core (``collector``, ``_recorder``) use it then."""
    if pure_python_requested():
        return None
    try:
        from lunamon import _speedups
    except ImportError:
        return None
    return _speedups


def _compiled_encoders() -> tuple[Encoder, LineEncoder] | None:
    """``lunamon._speedups``' encoders when it was built (and ``LUNAMON_PURE_PYTHON`` is
    not set), wired to this module's caches and escaping; else None."""
    _speedups = compiled_speedups()
    if _speedups is None:
        return None
    _speedups.configure(sys.modules[__name__])
    return _speedups.encode_lines, _speedups.encode_line


# Both give the same bytes (tests/test_speedups.py); the compiled ones are several times
# faster, and are what a normal install uses.
_encoder: Encoder
_line_encoder: LineEncoder
_encoder, _line_encoder = _compiled_encoders() or (_encode_lines, _encode)


async def encode_lines_async(points: list[Point] | tuple[Point, ...], chunk: int = 100) -> bytes:
    """Like :func:`encode_lines`, yielding to the event loop between chunks.

    A 5,000-point batch takes tens of milliseconds to encode; encoding it in one
    go would stall every request the loop serves meanwhile. 100 points take well
    under a millisecond, which keeps the loop's lag p99 below 5 ms under load.
    """
    if len(points) <= chunk:
        return encode_lines(points)
    parts = []
    for start in range(0, len(points), chunk):
        parts.append(encode_lines(points[start : start + chunk]))
        await asyncio.sleep(0)
    return b"".join(parts)
