"""Points and their InfluxDB 1.x line-protocol encoding.

The encoder follows what InfluxDB 1.x really parses (``models/points.go``), not
what other clients do: backslashes in tag values are left as they are (1.x does
not unescape ``\\\\`` there), newlines never split a line, and values InfluxDB
cannot store are sanitised or omitted by the rules in :func:`sanitize_tag_value`
and :class:`Point`. Escaped keys, measurements and tag pairs are cached, and
nothing is escaped unless a special character is present.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any, Final

__all__ = [
    "FieldValue",
    "Point",
    "TagSet",
    "TagValue",
    "encode_lines",
    "encode_lines_async",
    "omitted_counts",
    "parse_line_protocol",
    "sanitize_tag_value",
    "validate_field_value",
    "validate_key",
    "validate_tag_value",
]

TagValue = str | int | float
FieldValue = str | int | float | bool

INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
MAX_KEY_BYTES: Final = 65535
RESERVED_KEYS: Final = frozenset({"time"})

# Why a value was left out of a point; read with `omitted_counts()`.
_omitted: dict[str, int] = {
    "field_nan_inf": 0,
    "field_int_range": 0,
    "field_none": 0,
    "tag_empty": 0,
    "tag_sanitized": 0,
}


def omitted_counts() -> dict[str, int]:
    """How many field values were omitted and tag values sanitised, by reason, in this process."""
    return dict(_omitted)


# --------------------------------------------------------------------------- validation


def validate_key(key: object, what: str = "key") -> str:
    """Return ``key`` if InfluxDB can store it as a tag or field key, else raise.

    Keys are chosen by code, not by users, so a bad one is a programming error:
    ``TypeError`` for a non-string, ``ValueError`` for an empty key, the reserved
    key ``time``, a CR or LF, a key over 64 KB, a key ending in a backslash, or an
    odd run of backslashes before ``,``, ``=`` or a space (see :func:`sanitize_tag_value`).
    """
    if type(key) is not str:
        if not isinstance(key, str):
            raise TypeError(f"{what} must be a str, not {type(key).__name__}: {key!r}")
        key = str(key)
    if not key:
        raise ValueError(f"{what} must not be empty")
    if key[0] == "\t":
        raise ValueError(f"{what} {key!r} starts with a tab, which InfluxDB 1.x strips")
    if key in RESERVED_KEYS:
        raise ValueError(f"{what} {key!r} is reserved by InfluxDB")
    if "\n" in key or "\r" in key:
        raise ValueError(f"{what} {key!r} contains a newline or carriage return")
    if len(key) > MAX_KEY_BYTES // 4 and len(key.encode()) > MAX_KEY_BYTES:
        raise ValueError(f"{what} is longer than {MAX_KEY_BYTES} bytes")
    if key.endswith("\\") or ("\\" in key and _fix_backslash_runs(key, ",= ") != key):
        raise ValueError(
            f"{what} {key!r} has a backslash before a separator or at its end,"
            " which InfluxDB cannot store"
        )
    return key


def validate_series(series: object) -> str:
    """Return ``series`` if it is a measurement name InfluxDB stores, else raise ``ValueError``."""
    name = validate_key(series, "series")
    if name.startswith("#"):
        raise ValueError(f"series {name!r} starts with '#': InfluxDB would read it as a comment")
    if "\\" in name and ("\\," in name or "\\ " in name or "\\=" in name):
        raise ValueError(
            f"series {name!r} has a backslash before ',', '=' or a space:"
            " InfluxDB 1.x would store it garbled"
        )
    return name


def sanitize_tag_value(value: TagValue) -> str:
    """The one rule for tag values InfluxDB 1.x could not store as given.

    - the value is converted with ``str()`` (tags are strings in InfluxDB);
    - CR and LF become a space (a newline would end the line: line injection);
    - an odd run of backslashes just before ``,``, ``=`` or a space gets one more
      backslash (1.x would otherwise read the last one as an escape of the
      separator and cut or corrupt the line);
    - backslashes at the end of the value are removed: InfluxDB 1.x rejects a tag
      value ending in a backslash, however many there are;
    - the result may be empty: the caller omits such a tag.

    Everything else, including backslashes elsewhere, is stored exactly.
    """
    text = value if type(value) is str else str(value)
    if "\n" in text or "\r" in text:
        text = text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
    if "\\" in text:
        text = _fix_backslash_runs(text.rstrip("\\"), ",= ")
    return text


def _fix_backslash_runs(text: str, specials: str) -> str:
    out: list[str] = []
    run = 0
    for ch in text:
        if ch == "\\":
            run += 1
            continue
        if run:
            out.append("\\" * (run + (run % 2 if ch in specials else 0)))
            run = 0
        out.append(ch)
    if run:
        out.append("\\" * (run + run % 2))
    return "".join(out)


def validate_tag_value(value: object) -> str | None:
    """The stored form of a tag value, ``None`` when the tag is to be omitted.

    ``TypeError`` for a value that is not str, int or float (``None`` omits the tag).
    """
    if value is None:
        return None
    if not isinstance(value, (str, int, float)):
        raise TypeError(f"tag value must be str, int or float, not {type(value).__name__}")
    text = sanitize_tag_value(value)
    if type(value) is str and text != value:
        _omitted["tag_sanitized"] += 1
    if not text:
        _omitted["tag_empty"] += 1
        return None
    return text


def validate_field_value(value: object) -> FieldValue | None:
    """The field value to store, ``None`` when it is to be omitted (and counted).

    bool is checked before int; ints outside int64, NaN and infinities are
    omitted (InfluxDB cannot parse them); ``None`` is omitted; any other type is
    a ``TypeError`` at the call that recorded it.
    """
    cls = type(value)
    if cls is float:
        if math.isfinite(value):  # type: ignore[arg-type]
            return value  # type: ignore[return-value]
        _omitted["field_nan_inf"] += 1
        return None
    if cls is str or cls is bool:
        return value  # type: ignore[return-value]
    if cls is int:
        if INT64_MIN <= value <= INT64_MAX:  # type: ignore[operator]
            return value  # type: ignore[return-value]
        _omitted["field_int_range"] += 1
        return None
    if value is None:
        _omitted["field_none"] += 1
        return None
    # Subclasses of the allowed types (IntEnum, numpy scalars are not) are normalised.
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return validate_field_value(int(value))
    if isinstance(value, float):
        return validate_field_value(float(value))
    if isinstance(value, str):
        return str(value)
    raise TypeError(f"field value must be str, int, float or bool, not {cls.__name__}")


# --------------------------------------------------------------------------- Point


class TagSet(dict[str, str]):
    """A tags dict shared by many points and never mutated (the recorder makes them).

    It remembers its encoded line prefix (series + tags), so the encoder escapes
    and joins a route's tags once, not once per point.
    """

    __slots__ = ("_head",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head: tuple[str, str] | None = None

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
        return _encode(self)


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


def _encode(point: Point) -> str:
    series, time_ns, tags, fields = point
    if type(tags) is TagSet:
        cached = tags._head
        if cached is not None and cached[0] == series:
            head = cached[1]
        else:
            head = _head(series, tags)
            tags._head = (series, head)
    else:
        head = _head(series, tags)
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
    if not points:
        return b""
    return ("\n".join([_encode(p) for p in points]) + "\n").encode()


# --------------------------------------------------------------------------- parsing


class LineProtocolError(ValueError):
    """A line that is not valid line protocol; says which line and why."""


def _split_logical_lines(text: str) -> Iterator[tuple[int, str]]:
    # A newline inside a quoted string field does not end the line.
    start = 0
    lineno = 1
    start_lineno = 1
    in_quotes = False
    in_fields = False
    spaces = 0
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\" and i + 1 < n and text[i + 1] != "\n":
            i += 2
            continue
        if ch == '"' and in_fields and (in_quotes or (i > 0 and text[i - 1] == "=")):
            # A string field value opens right after `=` and ends at the next bare quote.
            in_quotes = not in_quotes
        elif ch == " " and not in_quotes:
            spaces += 1
            in_fields = spaces == 1
        elif ch == "\n":
            lineno += 1
            if not in_quotes:
                yield start_lineno, text[start:i]
                start = i + 1
                start_lineno = lineno
                spaces = 0
                in_fields = False
        i += 1
    if start < n:
        yield start_lineno, text[start:]


def _scan(text: str, pos: int, stops: str) -> tuple[str, int]:
    """Read up to the first unescaped character of ``stops``; return the raw token and its end."""
    i = pos
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch in stops:
            break
        i += 1
    return text[pos:i], min(i, n)


def _unescape(token: str, chars: str) -> str:
    if "\\" not in token:
        return token
    for ch in chars:
        token = token.replace("\\" + ch, ch)
    return token


def _parse_field_value(raw: str, lineno: int) -> FieldValue:
    if raw.startswith('"'):
        if len(raw) < 2 or not raw.endswith('"'):
            raise LineProtocolError(f"line {lineno}: unterminated string field")
        body = raw[1:-1]
        out: list[str] = []
        i = 0
        while i < len(body):
            ch = body[i]
            if ch == "\\" and i + 1 < len(body) and body[i + 1] in '"\\':
                out.append(body[i + 1])
                i += 2
                continue
            out.append(ch)
            i += 1
        return "".join(out)
    if raw in ("t", "T", "true", "True", "TRUE"):
        return True
    if raw in ("f", "F", "false", "False", "FALSE"):
        return False
    if raw.endswith("i") or raw.endswith("u"):
        try:
            return int(raw[:-1])
        except ValueError:
            raise LineProtocolError(f"line {lineno}: bad integer {raw!r}") from None
    try:
        number = float(raw)
    except ValueError:
        raise LineProtocolError(f"line {lineno}: bad field value {raw!r}") from None
    if not math.isfinite(number):
        raise LineProtocolError(f"line {lineno}: field value {raw!r} is not finite")
    return number


def _scan_field_value(text: str, pos: int) -> tuple[str, int]:
    if pos < len(text) and text[pos] == '"':
        i = pos + 1
        while i < len(text):
            if text[i] == "\\":
                i += 2
                continue
            if text[i] == '"':
                return text[pos : i + 1], i + 1
            i += 1
        return text[pos:], len(text)
    return _scan(text, pos, ", ")


def parse_line(line: str, lineno: int = 1) -> Point:
    """Parse one logical line of InfluxDB 1.x line protocol (with a timestamp in ns)."""
    raw_series, pos = _scan(line, 0, ", ")
    series = _unescape(raw_series, ", ")
    if not series:
        raise LineProtocolError(f"line {lineno}: missing measurement")
    tags: dict[str, str] = {}
    while pos < len(line) and line[pos] == ",":
        raw, pos = _scan(line, pos + 1, ", ")
        key_raw, eq = _scan(raw, 0, "=")
        if eq >= len(raw):
            raise LineProtocolError(f"line {lineno}: tag without '=': {raw[:80]!r}")
        tags[_unescape(key_raw, ",= ")] = _unescape(raw[eq + 1 :], ",= ")
    if pos >= len(line) or line[pos] != " ":
        raise LineProtocolError(f"line {lineno}: missing fields")
    pos += 1
    fields: dict[str, FieldValue] = {}
    while True:
        key_raw, pos = _scan(line, pos, "= ,")
        if pos >= len(line) or line[pos] != "=":
            raise LineProtocolError(f"line {lineno}: field without '=': {key_raw[:80]!r}")
        value_raw, pos = _scan_field_value(line, pos + 1)
        fields[_unescape(key_raw, ",= ")] = _parse_field_value(value_raw, lineno)
        if pos < len(line) and line[pos] == ",":
            pos += 1
            continue
        break
    rest = line[pos:].strip()
    if not rest:
        raise LineProtocolError(f"line {lineno}: missing timestamp")
    try:
        time_ns = int(rest)
    except ValueError:
        raise LineProtocolError(f"line {lineno}: bad timestamp {rest[:40]!r}") from None
    return Point.trusted(series, time_ns, tags, fields)


def parse_line_protocol(text: str) -> list[Point]:
    """Parse a line-protocol document; blank lines and ``#`` comments are skipped."""
    points = []
    for lineno, line in _split_logical_lines(text):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        points.append(parse_line(line.rstrip("\r"), lineno))
    return points


async def encode_lines_async(points: list[Point] | tuple[Point, ...], chunk: int = 100) -> bytes:
    """Like :func:`encode_lines`, yielding to the event loop between chunks.

    A 5,000-point batch takes tens of milliseconds to encode; encoding it in one
    go would stall every request the loop serves meanwhile. 100 points take well
    under a millisecond, which keeps the loop's lag p99 below 5 ms under load.
    """
    import asyncio

    if len(points) <= chunk:
        return encode_lines(points)
    parts = []
    for start in range(0, len(points), chunk):
        parts.append(encode_lines(points[start : start + chunk]))
        await asyncio.sleep(0)
    return b"".join(parts)
