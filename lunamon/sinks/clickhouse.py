"""The ClickHouse sink: LUNA's row format over ClickHouse's HTTP interface.

One table per series (``request``, ``error``), named after it, in ``database``;
one row per point with two columns:

- ``time``: the point's time, nanoseconds kept;
- ``data``: one JSON object merging the point's tags and fields, numbers kept as
  numbers: ``{"service": "luna-events", "route": "POST:/events", "status_code": 204,
  "request_id": "1536751345,6a5c...", "execution_time": 1.234}``.

**Tags to JSON.** A point holds its tags as strings (InfluxDB has no other tag
type). A tag value that is a canonical decimal integer within int64 (``0|-?[1-9][0-9]*``:
no ``+``, no ``-0``, no leading zero, no spaces) is written as a JSON number, so
``status_code`` and ``error_code`` are numbers as in LUNA's example; every other
tag value stays a JSON string (``"007"``, ``"1.5"``, ``"1e3"``, a UUID). A tag that
only sometimes looks like an integer (an id chosen by users) is therefore a number
in some rows and a string in others: read it with ``visitParamExtractRaw``. Fields
keep their types (``execution_time`` stays a float: ``1.0``, never ``1``); a field
with the same key as a tag wins; NaN and infinities, which have no JSON (only
``Point.trusted`` can hold them), are left out as the line-protocol encoder leaves
them out. ``data`` is compact JSON (no spaces after ``:``
and ``,``) with non-ASCII characters as UTF-8, so 18.16's
``visitParamExtractString(data, 'route')`` / ``visitParamExtractInt`` /
``visitParamExtractFloat`` read it.

**Schema** (created when ``create_tables``, with ``IF NOT EXISTS``), chosen for the
server the tests run, Debian bookworm's 18.16.1, and the same on every version::

    CREATE TABLE db.request (time Int64, data String) ENGINE = MergeTree()
      PARTITION BY toYYYYMM(toDateTime(intDiv(time, 1000000000))) ORDER BY time

``time`` is ``Int64`` nanoseconds (a point's time is an int64; 18.16 has no
DateTime64), exact on any server; ``toDateTime(intDiv(time, 1000000000))`` reads it
as a date. A newer server would allow ``time DateTime64(9, 'UTC')`` (since 20.1;
``toUnixTimestamp64Nano`` since 20.5) with ``PARTITION BY toYYYYMM(time)``: the
sink does not create it, because no server here can test it, but writes into such
a table when one exists (below). ``data`` stays ``String`` on every server: the
``JSON`` type (generally available only since 25.3, experimental ``Object('json')``
before) infers a type per path and row, so a float field whose value happens to be
whole could come back as an integer, the type drift DESIGN.md §1 forbids; a
``String`` keeps the exact text.
Tables that already exist are used as they are: the type of their ``time`` column
(read from ``system.columns``) decides how the time is sent: integer columns get
the nanoseconds, ``DateTime`` columns (tested on 18.16) and ``DateTime64(p)``
columns (the same text with ``p`` digits of fraction, a format ClickHouse documents
for them, tested here without a server) the Unix time as ``"seconds.fraction"``
text, which they parse whatever their time zone.

**Encoding.** With orjson installed (the ``clickhouse`` extra) rows are written by it,
twice as fast as with the standard library: orjson formats a float (Ryu) in a fraction
of ``repr``'s time, and ten floats a row are most of the work. Both paths store the same
data, the same numbers; a float may be spelled otherwise (``0.00001`` for ``1e-05``).
``LUNAMON_PURE_PYTHON=1`` uses the standard library's path anyway.

**Streaming.** An INSERT's body is encoded while it is sent (chunked transfer, gzip
flushed per chunk): the server parses the first rows while the next are encoded.
Every chunk but the last ends inside a row, because 18.16 stores a body cut off at
a row boundary as if it were complete; a cut body is a parse error instead, and
nothing of it is stored. A server or proxy that answers ``411 Length Required``
gets whole bodies from then on.

**Delivery.** A batch holds both series: each table gets one
``INSERT INTO db.table FORMAT JSONEachRow`` (gzip-compressed by default), each with
a ``query_id`` of its own (``lunamon-<random>-<pid>-<count>``). A table refused for
its data does not stop the others; a retryable failure does (the server is down or
busy). The :class:`SinkError` raised says which points are not stored (``pending``):
the flusher counts the tables stored written at once and retries, refuses or splits
only the rest, so a stored table is never sent again and ``stats()`` says what the
server holds, at shutdown too.

**Exactly once after an unknown outcome.** Plain MergeTree tables keep every row,
so an INSERT the server may have stored without saying so (a timeout, a connection
reset or closed, a 5xx, ``Code: 319`` "unknown status of insert"; not a refused
connection, nor a code the server answers before running the query: 201, 202, 216)
leaves its table *unsure*, its query_id remembered. The next INSERT into that table
(the flusher's retry) first asks which of its points the table holds, with one
``SELECT time FROM db.table WHERE time BETWEEN <lowest> AND <highest>`` (point times
are unique per series: lunamon's design), then sends only the others; their count
is written at once. Before the check, the sink *holds* the unsure INSERT's query_id:
a query of its own under that id (``sleepEachRow``, :data:`HOLD_SECONDS`), confirmed
in ``system.processes``, left running while the check and the re-send go by under a
new id. ClickHouse refuses a second query with a running query's id (``Code: 216``):
while the unsure INSERT still runs (a server resumed after a pause commits it then),
the hold is refused and retried, so the check never runs beside it; and once the id
is held, the unsure INSERT can no longer start. That matters because 18.16 registers
an HTTP INSERT's query_id only once it has read its body: a request queued in a paused
server could start after the check and the re-send (the fault campaign found it,
``tests/test_sink_clickhouse.py`` replays it). Residual window: an unsure INSERT
that starts more than :data:`HOLD_SECONDS` after the server answered the hold. A
user who cannot read ``system.processes`` gets the check under the unsure id instead
(a shorter guarantee), logged once. Behind a load balancer over several servers a
query_id is held on one of them only.

Tables whose ``time`` is coarser than nanoseconds (``DateTime``: seconds, where
points share a second) are checked on the time and the whole ``data`` object
(parsed, so either encoder's spelling compares equal; ``DateTime64`` alike, through
functions of servers since 20.5, untested here). A ``Distributed`` table (``engine`` read from
``system.tables``) is written with ``insert_distributed_sync=1``: an asynchronous
insert (its default) is forwarded to the shards later, where a check made meanwhile
would miss it; the sync INSERT's answer waits for the shards. The check costs one
SELECT after an unsure INSERT only, or before every INSERT with ``check_existing``
(``lunamon send``: a file sent twice is stored once). A batch still unsure at
shutdown (the server never answered again) is counted ``shutdown``, though it may
be stored. An INSERT answered ``Code: 60`` (unknown table) or ``Code: 81`` (unknown
database) creates them when ``create_tables`` and is sent once more.

Credentials go in the ``X-ClickHouse-User`` / ``X-ClickHouse-Key`` headers, never
in URLs; errors and logs are redacted. ClickHouse answers errors as text
(``Code: 241, e.displayText() = DB::Exception: Memory limit ...``, newer servers
add an ``X-ClickHouse-Exception-Code`` header); :func:`classify_clickhouse_response`
decides by that code before the HTTP status (ClickHouse answers 500 for a parse
error as for an overload).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import math
import operator
import os
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Final
from urllib.parse import unquote

import aiohttp
from yarl import URL

from lunamon._log import RateLimitedLogger, logger
from lunamon._secrets import Secret, redact
from lunamon._validation import INT64_MAX, INT64_MIN
from lunamon.errors import BatchTooLarge, SinkError
from lunamon.point import Point, pure_python_requested
from lunamon.sinks._http import (
    DEFAULT_COMPRESSION_LEVEL,
    HTTPSink,
    StreamedBody,
    check_compression_level,
    classify_response,
    compress,
    parse_retry_after,
    read_error_body,
    refuse_plain_credentials,
    request_data,
    transport_error,
)

__all__ = [
    "ClickHouseSink",
    "classify_clickhouse_response",
    "exception_code",
    "quote_identifier",
    "quote_string",
]

# Failures a later attempt can get past: the server is overloaded, short of memory,
# restarting a replica, or the network failed. Retried with backoff by the flusher.
RETRYABLE_CODES: Final[Mapping[int, str]] = {
    159: "timeout exceeded",
    173: "cannot allocate memory",
    201: "quota exceeded",
    202: "too many simultaneous queries",
    203: "no free connection",
    209: "socket timeout",
    210: "network error",
    225: "no ZooKeeper",
    216: "an earlier insert with this query_id is still running",
    236: "aborted",
    241: "memory limit exceeded",
    242: "table is read-only (replica without ZooKeeper)",
    243: "not enough disk space",
    252: "too many parts (merges are behind)",
    319: "unknown status of insert",
    394: "query was cancelled",
    425: "system error",
    999: "keeper exception",
}
# Failures the same request will meet again: bad data, bad SQL, missing tables,
# credentials or rights. Counted rejected, never retried (60/81: created when allowed).
REFUSED_CODES: Final[Mapping[int, str]] = {
    6: "cannot parse text",
    16: "no such column in table",
    26: "cannot parse JSON string",
    27: "cannot parse input",
    33: "cannot read all data",
    38: "cannot parse date",
    41: "cannot parse datetime",
    46: "unknown function",
    47: "unknown identifier",
    53: "type mismatch",
    60: "unknown table",
    62: "syntax error",
    69: "argument out of bound",
    70: "cannot convert type",
    72: "cannot parse number",
    73: "unknown format",
    81: "unknown database",
    115: "unknown setting",
    117: "incorrect data",
    164: "read-only user",
    192: "unknown user",
    193: "wrong password",
    194: "password required",
    195: "IP address not allowed",
    497: "access denied",
    516: "authentication failed",
}
UNKNOWN_TABLE: Final = 60
UNKNOWN_DATABASE: Final = 81
SAME_QUERY_ID_RUNNING: Final = 216
# After an unsure INSERT, its query_id is held this long by a query of ours (see _hold).
HOLD_SECONDS: Final = 5
_HOLD_MARK: Final = "lunamon_hold"
_HOLD_SQL: Final = (
    f"SELECT sleepEachRow(0.5) AS {_HOLD_MARK} FROM system.numbers"
    f" LIMIT {HOLD_SECONDS * 2} SETTINGS max_block_size = 1 FORMAT Null"
)
# Refused when the query is registered, before it runs: an INSERT answered so stored nothing.
_NOT_RUN_CODES: Final = frozenset({201, 202, SAME_QUERY_ID_RUNNING})

_CODE: Final = re.compile(r"\bCode: ([0-9]{1,6})\b")
_DATETIME64: Final = re.compile(r"(?:Nullable\()?DateTime64\(\s*([0-9])")
_DATETIME: Final = re.compile(r"(?:Nullable\()?DateTime(?:\(|$)")
_INTEGER_TAG: Final = re.compile(r"0|-?[1-9][0-9]{0,18}")
LUNA_SERIES: Final = ("request", "error")
_CHUNK: Final = 100  # points encoded between two yields to the event loop
_ERROR_TEXT: Final = 2048
_SQL_TYPE: Final = "text/plain; charset=utf-8"

_dumps = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), check_circular=False, allow_nan=False
).encode
_dumps_ascii = json.JSONEncoder(
    ensure_ascii=True, separators=(",", ":"), check_circular=False, allow_nan=False
).encode
_encode_string: Callable[[str], str] = json.encoder.encode_basestring
_CACHE_LIMIT: Final = 50_000


DEFAULT_DATABASE: Final = "luna_monitoring"


def url_database(path: str, database: str | None) -> str:
    """The database a ClickHouse URL's ``path`` and a ``database`` option name together:
    the path (``http://host:8123/mydb``), else the option, else ``luna_monitoring``; both,
    naming different databases, is a ``ValueError`` (the sink and ``lunamon send
    --clickhouse`` read a URL alike)."""
    named = unquote(path.strip("/"))
    if "/" in named:
        raise ValueError("the URL's path must be just the database name")
    if named and database is not None and database != named:
        raise ValueError(
            f"the URL names database {named!r} and database is {database!r}: give one of them"
        )
    return named or database or DEFAULT_DATABASE


def quote_identifier(name: str) -> str:
    """``name`` as a ClickHouse identifier in backquotes (any character allowed)."""
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def quote_string(text: str) -> str:
    """``text`` as a ClickHouse string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def exception_code(text: str, headers: Mapping[str, str] | None = None) -> int | None:
    """ClickHouse's exception code of an error answer: the ``X-ClickHouse-Exception-Code``
    header (servers since 19.x), else the ``Code: NNN`` of the text; ``None`` when absent
    (an answer from a proxy, not from ClickHouse)."""
    if headers is not None:
        value = headers.get("X-ClickHouse-Exception-Code", "").strip()
        if value.isdigit():
            return int(value)
    match = _CODE.search(text)
    return int(match[1]) if match else None


def classify_clickhouse_response(
    status: int,
    text: str,
    headers: Mapping[str, str] | None = None,
    *,
    what: str = "write",
    secrets: Iterable[str | Secret | None] = (),
) -> SinkError:
    """The :class:`SinkError` for a ClickHouse answer with a non-2xx ``status``.

    By the exception code first (:data:`RETRYABLE_CODES`, :data:`REFUSED_CODES`);
    a code in neither is retried on 5xx and refused on 4xx; an answer without a code
    (a proxy's 413, 502, 429 ...) is classified like the InfluxDB sinks'.
    """
    code = exception_code(text, headers)
    if code is None or status == 413:
        return classify_response(status, text, headers, what=what, secrets=secrets)
    if code in RETRYABLE_CODES:
        reason, retryable = RETRYABLE_CODES[code], True
    elif code in REFUSED_CODES:
        reason, retryable = REFUSED_CODES[code], False
    else:
        reason, retryable = "", status in (408, 429) or 500 <= status <= 599
    retry_after = None
    if retryable and headers is not None:
        retry_after = parse_retry_after(headers.get("Retry-After"))
    return SinkError(
        f"{what} failed: HTTP {status} Code {code} {reason}".rstrip(),
        retryable=retryable,
        status=status,
        retry_after=retry_after,
        server_text=redact(text.strip(), secrets),
    )


def _code_of(exc: SinkError) -> int | None:
    return exception_code(exc.server_text)


class _NotSent(SinkError):
    """A request that failed before anything of it reached the server (no connection)."""


def _forget_hold(holds: set[asyncio.Future[str]]) -> Callable[[asyncio.Future[str]], None]:
    """A done callback: drop a finished hold, and read its outcome (a hold ends as it
    ends: its failure matters only while it is waited on)."""

    def forget(hold: asyncio.Future[str]) -> None:
        holds.discard(hold)
        if not hold.cancelled():
            hold.exception()

    return forget


def _not_stored(exc: SinkError) -> bool:
    """Whether a failed INSERT certainly stored nothing: refused (its data, the SQL, the
    rights: a body of one block, under ``max_insert_block_size`` rows, is refused
    whole) or never sent. A timeout, a reset or a 5xx after the body went out may
    have stored it all."""
    return not exc.retryable or isinstance(exc, _NotSent) or _code_of(exc) in _NOT_RUN_CODES


def _canonical(data: str) -> str:
    """A ``data`` object's text in one spelling (keys sorted, numbers as Python writes
    them), so that the rows of two encoders compare equal."""
    return json.dumps(json.loads(data), sort_keys=True, separators=(",", ":"))


# --------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class _TimeColumn:
    """How a table's ``time`` column takes a point's time: ``scale`` None = integer ns,
    else ``"seconds.fraction"`` text with ``scale`` digits (DateTime: 0)."""

    scale: int | None = None

    def value(self, time_ns: int) -> int | str:
        """The time as this column takes it: the nanoseconds, or the text."""
        if self.scale is None:
            return time_ns
        seconds, rest = divmod(time_ns, 1_000_000_000)
        if not self.scale:
            return str(seconds)
        return f"{seconds}.{rest // 10 ** (9 - self.scale):0{self.scale}d}"

    def encode(self, time_ns: int) -> str:
        """:meth:`value` as JSON."""
        value = self.value(time_ns)
        return str(value) if self.scale is None else f'"{value}"'


_NANOSECONDS: Final = _TimeColumn()


def _time_column(type_name: str) -> _TimeColumn:
    """The encoding for a ``time`` column of ClickHouse type ``type_name``."""
    match = _DATETIME64.match(type_name)
    if match:
        return _TimeColumn(int(match[1]))
    if _DATETIME.match(type_name):
        return _TimeColumn(0)
    return _NANOSECONDS


def _tag_json(value: str) -> str | int:
    """A tag value as JSON: a canonical decimal integer within int64 becomes a number."""
    if _INTEGER_TAG.fullmatch(value):
        number = int(value)
        if INT64_MIN <= number <= INT64_MAX:
            return number
    return value


def row_data(point: Point) -> dict[str, object]:
    """The ``data`` object of a point: its tags (integers as numbers), then its fields."""
    data: dict[str, object] = {key: _tag_json(value) for key, value in point.tags.items()}
    data.update(point.fields)
    return data


# Tags -> their JSON members ('"service":"luna-handlers","status_code":201'), and field
# keys -> '"key":': a route's tags repeat in every point of it.
_tag_members: dict[tuple[tuple[str, str], ...], str] = {}
_field_keys: dict[str, str] = {}
_float_repr = float.__repr__


def _data_json(point: Point) -> str:
    """``json.dumps(row_data(point))``, compact, built from cached parts (1.5x faster)."""
    tags, fields = point.tags, point.fields
    if not fields.keys().isdisjoint(tags):
        return _dumps(row_data(point))  # a field overrides a tag: the dict decides
    key = tuple(tags.items())
    members = _tag_members.get(key)
    if members is None:
        if len(_tag_members) >= _CACHE_LIMIT:
            _tag_members.clear()
        members = _dumps({k: _tag_json(v) for k, v in tags.items()})[1:-1]
        _tag_members[key] = members
    parts = [members] if members else []
    for name, value in fields.items():
        head = _field_keys.get(name)
        if head is None:
            if len(_field_keys) >= _CACHE_LIMIT:
                _field_keys.clear()
            head = _field_keys[name] = _encode_string(name) + ":"
        if type(value) is float:
            text = _float_repr(value)
            if text[-1] in "nf":  # nan, inf: no JSON for them (Point() never holds one)
                continue
        elif type(value) is str:
            text = _encode_string(value)
        else:
            text = _dumps(value)  # bool, int and their subclasses
        parts.append(head + text)
    return "{" + ",".join(parts) + "}"


def _row(point: Point, time_column: _TimeColumn, ascii_only: bool = False) -> str:
    """One row built from the point's parts (the reference the templates must equal)."""
    data = _dumps_ascii(row_data(point)) if ascii_only else _data_json(point)
    return (
        '{"time":' + time_column.encode(point.time_ns) + ',"data":' + _encode_string(data) + "}\n"
    )


# A row is the JSON of ``data`` inside the JSON of the row: the text of one row is a
# %-template per kind of point (tags, field keys, field types), where only the time
# and the field values vary. Template, the argument positions of the strings, those
# of the booleans, and what picks the floats out of the field values (None: none).
_Template = tuple[str, tuple[int, ...], tuple[int, ...], Callable[..., tuple[float, ...]] | None]
_templates: dict[tuple[object, ...], _Template | None] = {}
# A string that needs more than itself inside the doubled JSON: quote, backslash, control.
_UNSAFE: Final = re.compile(r'["\\\x00-\x1f]').search


def _inside(text: str) -> str:
    """``text`` escaped as the inside of a JSON string literal."""
    return _encode_string(text)[1:-1]


def _template(key: tuple[object, ...], point: Point) -> _Template | None:
    """The row template of ``point``'s kind, remembered under ``key``; None: no template
    fits (a field named like a tag, a type other than str, int, float, bool)."""
    if len(_templates) >= _CACHE_LIMIT:
        _templates.clear()
    tags, fields = point.tags, point.fields
    found: _Template | None = None
    if fields.keys().isdisjoint(tags):
        # Literal text with its % doubled, %s where a value goes; escaping keeps both.
        members = [_dumps({k: _tag_json(v) for k, v in tags.items()})[1:-1]] if tags else []
        members = [text.replace("%", "%%") for text in members]
        strings: list[int] = []
        bools: list[int] = []
        floats: list[int] = []
        for position, (name, value) in enumerate(fields.items(), start=1):
            cls = type(value)
            if cls is str:
                strings.append(position)
                members.append(_encode_string(name).replace("%", "%%") + ':"%s"')
            elif cls is bool or cls is int or cls is float:
                if cls is bool:
                    bools.append(position)
                elif cls is float:
                    floats.append(position - 1)
                members.append(_encode_string(name).replace("%", "%%") + ":%s")
            else:
                break
        else:
            inner = _inside("{" + ",".join(members) + "}")
            # itemgetter of one position gives the value, not a tuple: name it twice.
            pick = operator.itemgetter(*floats * 2) if floats else None
            found = '{"time":%s,"data":"' + inner + '"}\n', tuple(strings), tuple(bools), pick
    _templates[key] = found
    return found


_NO_TEMPLATE: Final[_Template] = ("", (), (), None)


def _rows_text(points: Sequence[Point], time_column: _TimeColumn) -> str:
    """The rows of ``points`` as text, each from its kind's template: the same text as
    :func:`_row`. Formatting the floats (``repr``) is most of what is left."""
    rows: list[str] = []
    append = rows.append
    get = _templates.get
    unsafe = _UNSAFE
    finite = math.isfinite
    encode_time = time_column.encode if time_column.scale is not None else None
    for point in points:
        _, time_ns, tags, fields = point
        values = tuple(fields.values())
        # Flat: the types (the only non-strings) say how many field keys precede them.
        key = (*tags, *tags.values(), *fields, *map(type, values))
        entry = get(key, _NO_TEMPLATE)
        if entry is _NO_TEMPLATE:
            entry = _template(key, point)
        # A NaN or infinity has no JSON and is left out (a sum overflowing to inf too:
        # the reference row is right either way).
        if entry is None or (entry[3] is not None and not finite(sum(entry[3](values)))):
            append(_row(point, time_column))
            continue
        template, strings, bools, _ = entry
        args = [time_ns if encode_time is None else encode_time(time_ns), *values]
        for position in strings:
            if unsafe(args[position]) is not None:
                args[position] = _inside(_inside(args[position]))
        for position in bools:
            args[position] = "true" if args[position] else "false"
        append(template % tuple(args))
    return "".join(rows)


def _row_bytes(point: Point, time_column: _TimeColumn) -> bytes:
    """:func:`_row` as UTF-8; a string holding a lone surrogate (not encodable as UTF-8)
    is written with ``\\u`` escapes in ``data`` instead."""
    try:
        return _row(point, time_column).encode("utf-8")
    except UnicodeEncodeError:
        return _row(point, time_column, ascii_only=True).encode("utf-8")


def _rows_from_templates(points: Sequence[Point], time_column: _TimeColumn) -> bytes:
    """JSONEachRow rows of ``points`` with the standard library alone: :func:`_rows_text`."""
    try:
        return _rows_text(points, time_column).encode("utf-8")
    except UnicodeEncodeError:
        return b"".join([_row_bytes(point, time_column) for point in points])


# Tags -> the same tags as ``data`` members (integers as numbers), for orjson.
_typed_tags: dict[tuple[tuple[str, str], ...], dict[str, str | int]] = {}


def _rows_from_orjson(
    points: Sequence[Point], time_column: _TimeColumn, orjson: ModuleType
) -> bytes:
    """JSONEachRow rows of ``points`` written by orjson: the data of
    :func:`_rows_from_templates`' rows in less than half the time, because orjson formats
    a float (Ryu) in a fraction of ``repr``'s time. The numbers are the same; only some
    are spelled otherwise (``0.00001``, ``1e16``; ``repr``: ``1e-05``, ``1e+16``).

    ``data`` goes into the row as a JSON string: orjson's text with its ``\\`` and
    ``"`` escaped (it writes every other character a JSON string may not hold escaped).
    A point orjson cannot write (a lone surrogate, an integer beyond 64 bits, a type it
    does not know) or whose ``data`` holds ``null`` (orjson's NaN and infinity, which
    have no JSON and are left out; or a string merely containing "null") is written by
    :func:`_row_bytes` instead.
    """
    rows: list[bytes] = []
    append = rows.append
    dumps = orjson.dumps
    typed_of = _typed_tags.get
    nanoseconds = time_column.scale is None
    row = b'{"time":%d,"data":"%b"}\n' if nanoseconds else b'{"time":"%b","data":"%b"}\n'
    for point in points:
        _, time_ns, tags, fields = point
        key = tuple(tags.items())
        typed = typed_of(key)
        if typed is None:
            if len(_typed_tags) >= _CACHE_LIMIT:
                _typed_tags.clear()
            typed = _typed_tags[key] = {k: _tag_json(v) for k, v in key}
        try:
            data = dumps({**typed, **fields})  # a field wins over a tag of its key
        except TypeError:  # orjson.JSONEncodeError
            data = b"null"
        if b"null" in data:
            append(_row_bytes(point, time_column))
            continue
        data = data.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
        when = time_ns if nanoseconds else str(time_column.value(time_ns)).encode()
        append(row % (when, data))
    return b"".join(rows)


def _load_orjson() -> ModuleType | None:
    """orjson when it is installed (the ``clickhouse`` extra) and
    ``LUNAMON_PURE_PYTHON`` is not set; else None (rows from the templates)."""
    if pure_python_requested():
        return None
    try:
        import orjson
    except ImportError:
        return None
    return orjson


_orjson = _load_orjson()


def encode_rows(points: Sequence[Point], time_column: _TimeColumn = _NANOSECONDS) -> bytes:
    """JSONEachRow rows of ``points`` (UTF-8): through orjson when it is installed,
    else from the templates; the same data either way."""
    orjson = _orjson
    if orjson is not None:
        return _rows_from_orjson(points, time_column, orjson)
    return _rows_from_templates(points, time_column)


async def _encode_rows_async(points: Sequence[Point], time_column: _TimeColumn) -> bytes:
    """:func:`encode_rows`, yielding to the loop every 100 points (a 5,000-point batch
    encoded at once would stall the requests the loop serves)."""
    if len(points) <= _CHUNK:
        return encode_rows(points, time_column)
    parts = []
    for start in range(0, len(points), _CHUNK):
        parts.append(encode_rows(points[start : start + _CHUNK], time_column))
        await asyncio.sleep(0)
    return b"".join(parts)


def _create_table_sql(database: str, table: str) -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {quote_identifier(database)}.{quote_identifier(table)}"
        " (time Int64, data String) ENGINE = MergeTree()"
        " PARTITION BY toYYYYMM(toDateTime(intDiv(time, 1000000000))) ORDER BY time"
    )


# --------------------------------------------------------------------------- the sink


class ClickHouseSink(HTTPSink):
    """Writes batches to ClickHouse in LUNA's format: a table per series, rows of
    ``time`` (ns) and ``data`` (the tags and fields as one JSON object). With orjson
    installed (``pip install 'lunamon[clickhouse]'``) rows are encoded twice as fast.

    Tables (and the database) are created when ``create_tables``: at :meth:`start`
    (or, when the server is down then, before the first write) and again after an
    INSERT answered "unknown table/database", which is then sent once more.
    Credentials over plain HTTP to another host are refused unless
    ``allow_plain_credentials=True``.

    :param url: the HTTP interface, ``http://host:8123`` or ``https://host:8443`` (no credentials)
    :param database: the tables' database: the URL's path, else this, else ``luna_monitoring``
    :param username: the ClickHouse user, sent in ``X-ClickHouse-User``
    :param password: that user's password, sent in ``X-ClickHouse-Key`` (a secret: never shown)
    :param create_tables: create the database and the series' tables when missing
    :param gzip: send bodies gzip-compressed
    :param compression_level: gzip level, 1 (fastest, the default) to 9 (smallest bodies)
    :param timeout: seconds for one HTTP request, connect to answer
    :param verify_ssl: verify the server's certificate and host name
    :param ca_file: a PEM file of CAs trusted besides the system's
    :param name: the sink's name in ``stats()`` and logs
    :param allow_plain_credentials: allow a password over plain HTTP to another host
    :param check_existing: before every INSERT, leave out the points the table holds
        already (one SELECT each; ``lunamon send`` turns it on). Without it, only an
        INSERT after one whose outcome is unknown is checked.
    """

    content_type = "application/x-ndjson"

    def __init__(
        self,
        url: str = "http://127.0.0.1:8123",
        database: str | None = None,
        username: str = "default",
        password: str = "",
        *,
        create_tables: bool = True,
        gzip: bool = True,
        compression_level: int = DEFAULT_COMPRESSION_LEVEL,
        timeout: float = 10.0,
        verify_ssl: bool = True,
        ca_file: str | None = None,
        name: str | None = None,
        allow_plain_credentials: bool = False,
        check_existing: bool = False,
    ) -> None:
        if not isinstance(url, str) or not url:
            raise ValueError("url must be a non-empty string such as http://127.0.0.1:8123")
        try:
            base = URL(url)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"url is not a URL: {exc}") from None
        if base.user is not None or base.password is not None:
            raise ValueError("url must not hold credentials: give username= and password=")
        if base.scheme not in ("http", "https") or not base.host:
            raise ValueError("url must be http://host:port or https://host:port")
        if base.query_string or base.fragment:
            raise ValueError("url must have no query or fragment")
        if database is not None and (not isinstance(database, str) or not database):
            raise ValueError("database must be a non-empty string")
        database = url_database(base.path, database)
        base = base.with_path("")
        if not isinstance(username, str):
            raise ValueError("username must be a string")
        if password and not username:
            raise ValueError("a password needs a username")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, not {timeout!r}")
        tls = base.scheme == "https"
        plain = refuse_plain_credentials(bool(password), tls, base.host, allow_plain_credentials)
        self.name = name or "clickhouse"
        self.url = str(base).rstrip("/")
        self.database = database
        self.username = username
        self.create_tables = create_tables
        self.check_existing = check_existing
        self.gzip = gzip
        self.compression_level = check_compression_level(compression_level)
        self.timeout = float(timeout)
        self.verify_ssl = verify_ssl
        self.ca_file = ca_file
        self._password = Secret(password or "")
        self._base = URL(self.url)
        # Rows are streamed (chunked transfer) until a server or proxy answers
        # 411 Length Required; from then on bodies are encoded whole first.
        self.stream = True
        self._configure(
            write_url=self._base,
            what=f"clickhouse write to {self.url} db={database}",
            timeout=self.timeout,
            tls=tls,
            verify_ssl=verify_ssl,
            ca_file=ca_file,
            authorization=None,  # ClickHouse's own headers instead: see _headers()
            secrets=(self._password,),
            plain_credentials=plain,
        )
        self._time_columns: dict[str, _TimeColumn] = {}
        self._distributed: set[str] = set()  # tables of engine Distributed: sync inserts
        self._create_refused = False
        self._schema_lock = asyncio.Lock()
        self._log = RateLimitedLogger()
        # Per table, the query_id of an INSERT whose outcome is unknown (a timeout, a
        # reset, a 5xx after the body went out): the next INSERT into it is checked first.
        self._unsure: dict[str, str] = {}
        # (series, time) of points a dead process may have stored (a spool's replay):
        # the INSERT that carries one is checked first, as after an unsure INSERT.
        self._recheck: set[tuple[str, int]] = set()
        self._holds: set[asyncio.Future[str]] = set()  # queries holding an unsure INSERT's id
        self._query_ids = itertools.count(1)
        self._query_id_prefix = f"lunamon-{secrets.token_hex(4)}"

    def __repr__(self) -> str:
        password = "'***'" if self._password else "''"
        return (
            f"ClickHouseSink(name={self.name!r}, url={self.url!r}, database={self.database!r},"
            f" username={self.username!r}, password={password})"
        )

    __str__ = __repr__

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Open the HTTP session; with ``create_tables``, create LUNA's two tables.

        A server that is down is logged, not raised: the tables are created
        before the first write instead.
        """
        await super().start()
        if not self.create_tables:
            return
        try:
            for table in LUNA_SERIES:
                await self._time_column(table)
        except SinkError as exc:
            logger.warning(
                "clickhouse_create_tables_failed",
                sink=self.name,
                database=self.database,
                error=str(exc),
                will_retry=exc.retryable,
            )

    async def write(self, points: Sequence[Point]) -> None:
        """One INSERT per series of the batch. Raises a classified :class:`SinkError`
        whose ``pending`` lists the points not stored (the tables stored are not)."""
        if not points:
            return
        self._http.open()  # a closed sink fails here, before any work
        groups: dict[str, list[Point]] = {}
        for point in points:
            rows = groups.get(point.series)
            if rows is None:
                groups[point.series] = rows = []
            rows.append(point)
        pending: list[Point] = []
        retry: SinkError | None = None  # the server is down or busy: the rest waits too
        refused: SinkError | None = None  # this table's rows only: the others go on
        for table, rows in groups.items():
            if retry is not None:
                pending.extend(rows)
                continue
            try:
                await self._insert(table, rows)
            except SinkError as exc:
                pending.extend(exc.pending if exc.pending is not None else rows)
                if exc.retryable:
                    retry = exc
                elif refused is None or isinstance(exc, BatchTooLarge):
                    # A 413 first: split, the rows refused for their data are refused alone.
                    refused = exc
        error = retry or refused
        if error is not None:
            error.pending = pending
            raise error

    async def close(self) -> None:
        """Stop holding unsure INSERTs' ids (see :meth:`_hold`), then close the session."""
        for hold in list(self._holds):
            hold.cancel()
        await asyncio.gather(*self._holds, return_exceptions=True)
        await super().close()

    def mark_possibly_stored(self, points: Iterable[Point]) -> None:
        """Points that may be in their tables already (``spool_dir``: a dead process's,
        replayed): the INSERT that carries them leaves out those the table holds."""
        self._recheck.update((point.series, point.time_ns) for point in points)

    async def encode(self, batch: list[Point]) -> bytes:
        """JSONEachRow rows of a batch of one series, the time as its table takes it."""
        column = self._time_columns.get(batch[0].series, _NANOSECONDS) if batch else _NANOSECONDS
        return await _encode_rows_async(batch, column)

    async def send(
        self, body: bytes | StreamedBody, table: str = "request", query_id: str | None = None
    ) -> None:
        """INSERT an encoded (and, with ``gzip``, compressed) body into ``table``, as
        ``query_id`` when given; into a Distributed table with ``insert_distributed_sync``."""
        statement = (
            f"INSERT INTO {quote_identifier(self.database)}.{quote_identifier(table)}"
            " FORMAT JSONEachRow"
        )
        query = {"query": statement}
        if query_id is not None:
            query["query_id"] = query_id
        if table in self._distributed:
            query["insert_distributed_sync"] = "1"
        await self._request(
            self._base.with_query(query),
            body,
            gzipped=self.gzip,
            what=f"{self._what} table={table}",
        )

    # ----------------------------------------------------------------- inserts

    def _new_query_id(self) -> str:
        """A query_id no other INSERT has: this sink's random prefix, the process, a count."""
        return f"{self._query_id_prefix}-{os.getpid()}-{next(self._query_ids)}"

    async def _insert(self, table: str, points: list[Point]) -> None:
        """INSERT ``points`` into ``table``; after an INSERT into it whose outcome is unknown
        (or always, with ``check_existing``), only those the table does not hold yet.

        A :class:`SinkError` raised has ``pending``: the points not stored (all of them
        when the outcome is unknown: the next attempt checks).
        """
        time_column = await self._time_column(table)
        unsure = self._unsure.get(table)
        query_id = self._new_query_id()
        if unsure is not None:
            try:
                held = await self._hold(unsure)
            except SinkError as exc:
                exc.pending = points
                raise
            if not held:  # the id cannot be held here: check and send under it instead
                query_id = unsure
        rows = points
        recheck = self._recheck
        replayed = bool(recheck) and any((table, p.time_ns) in recheck for p in points)
        if unsure is not None or self.check_existing or replayed:
            try:
                rows = await self._missing(table, points, time_column, query_id)
            except SinkError as exc:
                if _code_of(exc) not in (UNKNOWN_TABLE, UNKNOWN_DATABASE):
                    exc.pending = points
                    raise
                # No table (dropped, or not created yet): it holds none of them, and the
                # INSERT creates it when allowed.
            if replayed:  # checked: from now on what happens to them is known as usual
                recheck.difference_update((table, p.time_ns) for p in points)
            if not rows:
                self._unsure.pop(table, None)
                return
        outcome_known = False
        try:
            await self._insert_rows(table, rows, time_column, query_id)
            outcome_known = True
        except SinkError as exc:
            exc.pending = rows
            # Refused before it ran (nothing sent, or this query_id's INSERT still runs:
            # then the one before stays unsure), or answered for certain (nothing stored).
            outcome_known = _not_stored(exc) and _code_of(exc) != SAME_QUERY_ID_RUNNING
            raise
        finally:  # a cancelled INSERT (the flusher's deadline) is unsure too
            if outcome_known:
                self._unsure.pop(table, None)
            else:
                self._unsure[table] = query_id
                self._log.log(
                    "info",
                    "clickhouse_insert_unsure",
                    key=table,
                    sink=self.name,
                    table=table,
                    query_id=query_id,
                    points=len(rows),
                    detail="the next INSERT into the table is checked first",
                )

    async def _hold(self, query_id: str) -> bool:
        """Hold ``query_id`` on the server for :data:`HOLD_SECONDS` (a query of ours under
        that id, left running in the background) so that the unsure INSERT of that id can
        no longer start: ClickHouse refuses a second query with a running query's id (216).
        An HTTP INSERT takes its id only once its body is read, so an INSERT delayed in the
        server (paused, still reading) could otherwise start after the check and store its
        rows a second time. True once held; False when ``system.processes`` cannot be
        read (the check then runs under the unsure id, as the fallback). Raises a retryable
        :class:`SinkError` while the unsure INSERT itself runs: it is waited for."""
        what = f"clickhouse hold of query {query_id} at {self.url}"
        hold = asyncio.ensure_future(self._query(_HOLD_SQL, what, query_id=query_id))
        self._holds.add(hold)
        hold.add_done_callback(_forget_hold(self._holds))
        probe = (
            "SELECT query FROM system.processes WHERE query_id ="
            f" {quote_string(query_id)} FORMAT TabSeparated"
        )
        deadline = asyncio.get_running_loop().time() + self.timeout
        while True:
            if hold.done():
                error = hold.exception()
                if isinstance(error, SinkError) and _code_of(error) == SAME_QUERY_ID_RUNNING:
                    raise SinkError(
                        f"{what}: the unsure INSERT still runs (Code 216); waiting for it",
                        retryable=True,
                        status=error.status,
                        server_text=error.server_text,
                    )
                raise SinkError(f"{what}: ended before it held the id", retryable=True)
            try:
                running = await self._query(probe, what)
            except SinkError as exc:
                if exc.retryable:
                    raise
                hold.cancel()
                self._log.log("warning", "clickhouse_hold_unavailable", key="hold", error=str(exc))
                return False
            if _HOLD_MARK in running:
                return True
            if asyncio.get_running_loop().time() > deadline:
                hold.cancel()
                raise SinkError(f"{what}: not held within {self.timeout} s", retryable=True)
            await asyncio.sleep(0.01)

    async def _missing(
        self, table: str, points: list[Point], time_column: _TimeColumn, query_id: str
    ) -> list[Point]:
        """The points that ``table`` does not hold, by one SELECT over their time range run
        as ``query_id``.

        A point is held when a row has its time (nanosecond columns: times are unique per
        series), or its time and the same ``data`` (coarser columns, where two points can
        share a second)."""
        lowest = min(point.time_ns for point in points)
        highest = max(point.time_ns for point in points)
        name = f"{quote_identifier(self.database)}.{quote_identifier(table)}"
        what = f"clickhouse check of {self.database}.{table} at {self.url}"
        if time_column.scale is None:
            sql = (
                f"SELECT time FROM {name} WHERE time BETWEEN {lowest} AND {highest}"
                " FORMAT TabSeparated"
            )
            answer = await self._query(sql, what, query_id=query_id)
            held = {int(line) for line in answer.split()}
            return [point for point in points if point.time_ns not in held]
        if time_column.scale == 0:
            nanoseconds = "toInt64(toUInt32(time)) * 1000000000"
            bounds = f"toDateTime({lowest // 10**9}) AND toDateTime({highest // 10**9})"
        else:  # DateTime64: servers since 20.5 (none here to test it)
            nanoseconds = "toUnixTimestamp64Nano(time)"
            bounds = f"fromUnixTimestamp64Nano({lowest}) AND fromUnixTimestamp64Nano({highest})"
        sql = (
            f"SELECT toString({nanoseconds}) AS t, data FROM {name}"
            f" WHERE time BETWEEN {bounds} FORMAT JSONEachRow"
        )
        answer = await self._query(sql, what, query_id=query_id)
        held_rows = set()
        for line in answer.splitlines():
            if line.strip():
                row = json.loads(line)
                held_rows.add((time_column.value(int(row["t"])), _canonical(row["data"])))
        missing = []
        for point in points:
            data = json.loads(encode_rows([point], time_column))["data"]
            if (time_column.value(point.time_ns), _canonical(data)) not in held_rows:
                missing.append(point)
        return missing

    async def _insert_rows(
        self, table: str, points: list[Point], time_column: _TimeColumn, query_id: str
    ) -> None:
        """INSERT ``points``; a table (or database) found missing is created when allowed
        and the INSERT sent once more."""
        try:
            await self._send_rows(table, points, time_column, query_id)
        except SinkError as exc:
            if not self.create_tables or _code_of(exc) not in (UNKNOWN_TABLE, UNKNOWN_DATABASE):
                raise
            # Dropped while running (or never created): create it, then send once more.
            self._time_columns.pop(table, None)
            self._create_refused = False
            try:
                again = await self._time_column(table)
            except SinkError as create_error:
                raise (create_error if create_error.retryable else exc) from None
            if self._create_refused:
                raise
            await self._send_rows(table, points, again, query_id)

    async def _send_rows(
        self, table: str, points: list[Point], time_column: _TimeColumn, query_id: str
    ) -> None:
        """INSERT ``points`` into ``table``: streamed, or encoded whole when the server
        (or a proxy before it) refuses a body without a length."""
        if self.stream:
            level = self.compression_level if self.gzip else None
            encode = functools.partial(encode_rows, time_column=time_column)
            body = StreamedBody(points, encode, level)
            try:
                await self.send(body, table, query_id)
                return
            except SinkError as exc:
                if exc.status != 411:
                    raise
                self.stream = False
                logger.warning(
                    "clickhouse_chunked_body_refused",
                    sink=self.name,
                    url=self.url,
                    detail="411 Length Required: bodies are encoded whole from now on",
                )
        whole = await _encode_rows_async(points, time_column)
        if self.gzip:
            whole = await compress(whole, self.compression_level)
        await self.send(whole, table, query_id)

    def _headers(self) -> dict[str, str]:
        headers = {}
        if self.username:
            headers["X-ClickHouse-User"] = self.username
        if self._password:
            headers["X-ClickHouse-Key"] = self._password.reveal()
        return headers

    async def _request(
        self,
        url: URL,
        body: bytes | StreamedBody,
        *,
        what: str,
        gzipped: bool = False,
        read: bool = False,
        content_type: str | None = None,
    ) -> bytes:
        """POST ``body`` to ``url``; the answer on 2xx (when ``read``), else the classified
        :class:`SinkError`. Redirects are not followed (they could carry the credentials away)."""
        headers = {"Content-Type": content_type or self.content_type, **self._headers()}
        if gzipped:
            headers["Content-Encoding"] = "gzip"
        try:
            session = self._http.open()
            async with session.post(
                url, data=request_data(body), headers=headers, allow_redirects=False
            ) as resp:
                if 200 <= resp.status < 300:
                    return await resp.read() if read else b""
                status, answer_headers = resp.status, resp.headers
                raw = await read_error_body(resp)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            error = transport_error(exc, body, what=what, secrets=self._secrets)
            if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(error, SinkError):
                error = _NotSent(str(error), retryable=True)  # no connection: nothing sent
            raise error from None
        text = raw[:_ERROR_TEXT].decode("utf-8", errors="replace")
        raise classify_clickhouse_response(
            status, text, answer_headers, what=what, secrets=self._secrets
        )

    async def _query(self, sql: str, what: str, *, query_id: str | None = None) -> str:
        """Run one statement (its text as the body), as ``query_id`` when given; the
        answer as text."""
        url = self._base if query_id is None else self._base.with_query({"query_id": query_id})
        answer = await self._request(
            url, sql.encode(), what=what, read=True, content_type=_SQL_TYPE
        )
        return answer.decode("utf-8", errors="replace")

    # ----------------------------------------------------------------- schema

    async def _time_column(self, table: str) -> _TimeColumn:
        """How ``table`` takes the time, creating the table first when allowed.

        Retryable failures are raised (the write is retried); a creation the
        server refuses is logged and the INSERT tried all the same.
        """
        known = self._time_columns.get(table)
        if known is not None:
            return known
        async with self._schema_lock:
            known = self._time_columns.get(table)
            if known is not None:
                return known
            if self.create_tables and not self._create_refused:
                await self._create(table)
            found = await self._lookup_time_column(table)
            if found is None:
                return _NANOSECONDS  # not there (yet): the INSERT will tell
            self._time_columns[table], distributed = found
            if distributed:
                self._distributed.add(table)
            else:
                self._distributed.discard(table)
            return found[0]

    async def _create(self, table: str) -> None:
        what = f"clickhouse create table {self.database}.{table} at {self.url}"
        try:
            await self._query(
                f"CREATE DATABASE IF NOT EXISTS {quote_identifier(self.database)}", what
            )
            await self._query(_create_table_sql(self.database, table), what)
        except SinkError as exc:
            if exc.retryable:
                raise
            self._create_refused = True
            self._log.log(
                "warning",
                "clickhouse_create_tables_failed",
                key=f"{table}:{exc.status}",
                sink=self.name,
                database=self.database,
                table=table,
                error=str(exc),
                will_retry=False,
            )

    async def _lookup_time_column(self, table: str) -> tuple[_TimeColumn, bool] | None:
        """The encoding for ``table``'s ``time`` column and whether the table is
        Distributed; ``None`` when the table is absent or ``system.columns`` cannot be
        read (integer ns are sent, nothing is cached)."""
        what = f"clickhouse schema of {self.database}.{table} at {self.url}"
        where = f"database = {quote_string(self.database)} AND "
        sql = (
            f"SELECT type, (SELECT any(engine) FROM system.tables WHERE {where}"
            f"name = {quote_string(table)}) FROM system.columns WHERE {where}"
            f"table = {quote_string(table)} AND name = 'time' FORMAT TabSeparated"
        )
        try:
            answer = await self._query(sql, what)
        except SinkError as exc:
            if exc.retryable:
                raise
            return None
        type_name, _, engine = answer.strip().partition("\t")
        return (_time_column(type_name), engine == "Distributed") if type_name else None
