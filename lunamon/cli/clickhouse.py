"""The CLI's view of ClickHouse: ``--clickhouse http://[user:pass@]host:8123[/database]`` URLs,
reading LUNA's rows back as points (``lunamon report`` and ``lunamon demo``), and
``lunamon send`` into a :class:`~lunamon.sinks.clickhouse.ClickHouseSink`.

A row's ``data`` object does not say which keys were tags: they are told apart
by one rule, enough for the report: ``request_id``, ``execution_time``, keys
ending in ``_time`` and every float or boolean are fields (``*_time`` integers
back as floats, as the InfluxDB reader does); other strings and integers are tags
(integers as their decimal text, the form a point holds).

Failures are told as the sinks tell theirs (:mod:`lunamon.sinks.clickhouse`):
the server's own explanation, a reason per exception code, no credential anywhere.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import aiohttp

from lunamon.cli.influxql import parse_duration
from lunamon.cli.send import BATCH_SIZE, MAX_RETRIES, deliver
from lunamon.flusher import SinkStats
from lunamon.point import FieldValue, Point
from lunamon.sinks._http import classify_exception, read_error_body, truncate
from lunamon.sinks.clickhouse import (
    DEFAULT_DATABASE,
    ClickHouseSink,
    classify_clickhouse_response,
    quote_identifier,
    quote_string,
    url_database,
)

__all__ = [
    "DEFAULT_DATABASE",
    "ClickHouseQueryError",
    "ClickHouseTarget",
    "ClickHouseURLError",
    "parse_clickhouse_url",
    "ping",
    "query_points",
    "send_points",
    "since_ns",
]

_PORTS: Final = {"http": 8123, "https": 8443}
_UNITS_NS: Final = {
    "ns": 1,
    "us": 1_000,
    "u": 1_000,
    "µ": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
    "d": 86400 * 1_000_000_000,
    "w": 7 * 86400 * 1_000_000_000,
}
_DURATION_PART: Final = re.compile(r"([0-9]+)(ns|us|u|µ|ms|s|m|h|d|w)")
_DATETIME64: Final = re.compile(r"(?:Nullable\()?DateTime64\(")
_DATETIME: Final = re.compile(r"(?:Nullable\()?DateTime(?:\(|$)")
# How much of the server's explanation a one-line CLI error keeps.
_SERVER_TEXT: Final = 300


class ClickHouseURLError(ValueError):
    """A ``--clickhouse`` URL the CLI cannot use; the message says why."""


class ClickHouseQueryError(RuntimeError):
    """Reading from ClickHouse failed (unreachable, refused, no such database); one line."""


@dataclass(frozen=True)
class ClickHouseTarget:
    """Where a ClickHouse database is; the password never shows in ``repr``."""

    url: str  # the HTTP interface, without credentials
    database: str = DEFAULT_DATABASE
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return f"{self.url}/{self.database}"

    def sink(self, **options: Any) -> ClickHouseSink:
        """A :class:`ClickHouseSink` writing to this database."""
        return ClickHouseSink(
            url=self.url,
            database=self.database,
            username=self.username or "default",
            password=self.password or "",
            **options,
        )

    def _headers(self) -> dict[str, str]:
        headers = {}
        if self.username:
            headers["X-ClickHouse-User"] = self.username
        if self.password:
            headers["X-ClickHouse-Key"] = self.password
        return headers


def parse_clickhouse_url(url: str, database: str | None = None) -> ClickHouseTarget:
    """``http[s]://[user:password@]host[:port][/database]`` (port 8123, or 8443 for https;
    database ``luna_monitoring``): the path or ``database`` names it, as for the sink
    (:func:`~lunamon.sinks.clickhouse.url_database`)."""
    parts = urlsplit(url)
    if parts.scheme not in _PORTS:
        raise ClickHouseURLError(f"{_shown(url)!r}: expected http://host:8123[/database]")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:  # a port that is not a number or out of range
        raise ClickHouseURLError(f"{_shown(url)!r}: {exc}") from None
    if not host:
        raise ClickHouseURLError(f"{_shown(url)!r}: no host")
    try:
        named = url_database(parts.path, database)
    except ValueError as exc:
        raise ClickHouseURLError(f"{_shown(url)!r}: {exc}") from None
    if parts.query or parts.fragment:
        raise ClickHouseURLError(f"{_shown(url)!r}: unexpected query or fragment")
    shown_host = f"[{host}]" if ":" in host else host
    return ClickHouseTarget(
        url=f"{parts.scheme}://{shown_host}:{port or _PORTS[parts.scheme]}",
        database=named,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


def _shown(url: str) -> str:
    """``url`` with any password masked, for messages."""
    return re.sub(r"//([^/@:]*):[^/@]*@", r"//\1:***@", url)


def since_ns(text: str, now_ns: int | None = None) -> int:
    """The time ``text`` (``15m``, ``1h``, ``7d``, ``1h30m``) before now, in ns since the epoch.

    ``ValueError`` for anything else (the same durations as ``--influx``'s).
    """
    value = parse_duration(text)
    span = sum(int(n) * _UNITS_NS[unit] for n, unit in _DURATION_PART.findall(value))
    return (time.time_ns() if now_ns is None else now_ns) - span


# --------------------------------------------------------------------------- reading


async def ping(target: ClickHouseTarget, timeout: float = 5.0) -> None:
    """Raise :class:`ClickHouseQueryError` unless the server answers ``/ping`` with ``Ok.``."""
    try:
        async with (
            aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=timeout), trust_env=False
            ) as session,
            session.get(f"{target.url}/ping", allow_redirects=False) as response,
        ):
            body = await response.content.read(64)
            if response.status != 200 or body.strip() != b"Ok.":
                raise ClickHouseQueryError(
                    f"{target.url} answered /ping with HTTP {response.status}: not a ClickHouse?"
                )
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        raise _unreachable(target, exc) from None


async def query_points(
    target: ClickHouseTarget,
    series: Sequence[str],
    *,
    since: int | None = None,
    where: str | None = None,
    timeout: float = 60.0,
) -> list[Point]:
    """Every row of the tables ``series`` (at or after ``since`` ns, when given; matching
    the SQL condition ``where``, when given) as points, by time.

    A missing table holds no points; a missing database is a :class:`ClickHouseQueryError`.
    """
    points: list[Point] = []
    try:
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout),
            headers=target._headers(),
            trust_env=False,
        ) as session:
            columns = await _time_columns(session, target, series)
            for name in series:
                type_name = columns.get(name)
                if type_name is None:
                    continue
                expression = _time_expression(type_name)
                conditions = [f"{expression} >= {int(since)}"] if since is not None else []
                conditions += [where] if where else []
                filtered = f" WHERE {' AND '.join(conditions)}" if conditions else ""
                sql = (
                    f"SELECT {expression} AS t, data FROM"
                    f" {quote_identifier(target.database)}.{quote_identifier(name)}{filtered}"
                    " ORDER BY time FORMAT JSONEachRow"
                )
                async for row in _rows(session, target, sql):
                    points.append(_point(name, row))
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        raise _unreachable(target, exc) from None
    points.sort(key=lambda p: p.time_ns)
    return points


def _time_expression(type_name: str) -> str:
    """``time`` as ns since the epoch, whatever its column type (DESIGN's schemas and others)."""
    if _DATETIME64.match(type_name):
        return "toUnixTimestamp64Nano(time)"
    if _DATETIME.match(type_name):
        return "toInt64(time) * 1000000000"
    return "time"


async def _time_columns(
    session: aiohttp.ClientSession, target: ClickHouseTarget, series: Sequence[str]
) -> dict[str, str]:
    """Table -> type of its ``time`` column, for the tables of ``series`` that exist."""
    database = quote_string(target.database)
    found = [row async for row in _rows(session, target, _exists_sql(database))]
    if not found:
        raise ClickHouseQueryError(
            f"ClickHouse at {target.url}: database {target.database!r} does not exist"
        )
    tables = ", ".join(quote_string(name) for name in series)
    sql = (
        f"SELECT table, type FROM system.columns WHERE database = {database}"
        f" AND table IN ({tables}) AND name = 'time' FORMAT JSONEachRow"
    )
    return {str(row["table"]): str(row["type"]) async for row in _rows(session, target, sql)}


def _exists_sql(database: str) -> str:
    return f"SELECT name FROM system.databases WHERE name = {database} FORMAT JSONEachRow"


def _point(series: str, row: dict[str, Any]) -> Point:
    try:
        time_ns = int(row["t"])
        data = json.loads(row["data"])
    except (KeyError, TypeError, ValueError):
        raise ClickHouseQueryError(
            f"a row of table {series!r} is not LUNA's (time, data JSON object):"
            f" {truncate(json.dumps(row), 120)}"
        ) from None
    if not isinstance(data, dict):
        raise ClickHouseQueryError(f"a row of table {series!r} has data that is not an object")
    tags: dict[str, str] = {}
    fields: dict[str, FieldValue] = {}
    for key, value in data.items():
        timing = key == "execution_time" or key.endswith("_time")
        if key == "request_id" or timing or type(value) in (float, bool):
            if timing and type(value) is int:
                value = float(value)
            if isinstance(value, (str, int, float)):
                fields[key] = value
        elif isinstance(value, str):
            tags[key] = value
        elif type(value) is int:
            tags[key] = str(value)
    return Point.trusted(series, time_ns, tags, fields)


async def _rows(
    session: aiohttp.ClientSession, target: ClickHouseTarget, sql: str
) -> AsyncIterator[dict[str, Any]]:
    """The rows of one ``FORMAT JSONEachRow`` query; raise on any error.

    ``wait_end_of_query=1``: the server answers once the query is done, so an error
    comes as an error status, not after a ``200`` and half of the rows.
    """
    params = {"wait_end_of_query": "1"}
    async with session.post(
        f"{target.url}/", params=params, data=sql.encode(), allow_redirects=False
    ) as response:
        if response.status != 200:
            text = (await read_error_body(response)).decode("utf-8", errors="replace")
            error = classify_clickhouse_response(
                response.status,
                truncate(text.strip(), _SERVER_TEXT),
                response.headers,
                what="query",
                secrets=(target.password,),
            )
            raise ClickHouseQueryError(f"ClickHouse at {target.url}: {error}")
        parts: list[bytes] = []
        async for chunk in response.content.iter_any():
            if b"\n" not in chunk:
                parts.append(chunk)
                continue
            head, *lines, tail = chunk.split(b"\n")
            parts.append(head)
            for line in (b"".join(parts), *lines):
                if line.strip():
                    yield _json(line, target)
            parts = [tail]
        rest = b"".join(parts)
        if rest.strip():
            yield _json(rest, target)


def _json(line: bytes, target: ClickHouseTarget) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except ValueError:
        text = line.decode("utf-8", errors="replace")
        if text.startswith("Code: "):  # an exception after the answer began
            raise ClickHouseQueryError(
                f"ClickHouse at {target.url}: {truncate(text, _SERVER_TEXT)}"
            ) from None
        raise ClickHouseQueryError(f"{target.url} sent a reply that is not JSON") from None
    if not isinstance(row, dict):
        raise ClickHouseQueryError(f"{target.url} sent an unexpected reply")
    return row


def _unreachable(target: ClickHouseTarget, exc: BaseException) -> ClickHouseQueryError:
    """A transport failure (refused, DNS, reset, timeout, TLS), said as the sinks say it."""
    error = classify_exception(exc, what="query", secrets=(target.password,))
    return ClickHouseQueryError(f"cannot reach ClickHouse at {target.url}: {error}")


# --------------------------------------------------------------------------- sending


async def send_points(
    points: Sequence[Point],
    target: ClickHouseTarget,
    *,
    batch_size: int = BATCH_SIZE,
    max_retries: int = MAX_RETRIES,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, SinkStats]:
    """Write ``points`` to ``target`` through a :class:`Monitoring` (batches, retries,
    accounting as in a service), those the tables hold already left out (the same
    points sent twice are stored once); the stats once every point is written or dropped."""
    await ping(target)
    return await deliver(
        points,
        target.sink(check_existing=True),
        batch_size=batch_size,
        max_retries=max_retries,
        on_progress=on_progress,
    )
