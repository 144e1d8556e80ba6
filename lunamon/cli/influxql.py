"""The CLI's view of an InfluxDB 1.x server: ``http://[user:pass@]host:port/db`` URLs and
reading points back with InfluxQL (for ``lunamon report --influx`` and ``lunamon demo``).

Failures are told as the sinks tell theirs (:mod:`lunamon.sinks._http`): the
server's own explanation, a reason per status, no credential anywhere.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import aiohttp

from lunamon.point import FieldValue, Point
from lunamon.sinks._http import (
    classify_exception,
    classify_response,
    error_text,
    read_error_body,
    truncate,
)
from lunamon.sinks.influxdb import InfluxDBSink

__all__ = [
    "InfluxQueryError",
    "InfluxTarget",
    "InfluxURLError",
    "parse_duration",
    "parse_influx_url",
    "ping",
    "query_points",
]

DEFAULT_PORT: Final = 8086
# InfluxQL duration literals: 90m, 1h, 7d, 2w ...
_DURATION: Final = re.compile(r"([0-9]+)(ns|us|u|µ|ms|s|m|h|d|w)")
_CHUNK_SIZE: Final = 5000
# How much of the server's explanation a one-line CLI error keeps.
_SERVER_TEXT: Final = 300


class InfluxURLError(ValueError):
    """An ``--influx`` URL the CLI cannot use; the message says why."""


class InfluxQueryError(RuntimeError):
    """Reading from InfluxDB failed (unreachable, refused, bad database); one-line message."""


@dataclass(frozen=True)
class InfluxTarget:
    """Where an InfluxDB 1.x database is; the password never shows in ``repr``."""

    host: str
    port: int
    database: str
    ssl: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """The server's base URL (without credentials)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.ssl else 'http'}://{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.url}/{self.database}"

    def sink(self, **options: Any) -> InfluxDBSink:
        """An :class:`InfluxDBSink` writing to this database."""
        return InfluxDBSink(
            host=self.host,
            port=self.port,
            database=self.database,
            username=self.username,
            password=self.password,
            ssl=self.ssl,
            **options,
        )

    def _headers(self) -> dict[str, str]:
        """Basic auth in a header, as the sink sends it (aiohttp's ``BasicAuth`` is deprecated)."""
        if not self.username:
            return {}
        token = base64.b64encode(f"{self.username}:{self.password or ''}".encode()).decode("ascii")
        return {"Authorization": f"Basic {token}"}


def parse_influx_url(url: str, database: str | None = None) -> InfluxTarget:
    """``http://[user:password@]host[:port]/database``, or the database as ``database``
    (both, naming different databases, are refused: one rule with ``--clickhouse``)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise InfluxURLError(f"{_shown(url)!r}: expected http://host:port/database")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:  # a port that is not a number or out of range
        raise InfluxURLError(f"{_shown(url)!r}: {exc}") from None
    if not host:
        raise InfluxURLError(f"{_shown(url)!r}: no host")
    path_db = unquote(parts.path.strip("/"))
    if "/" in path_db:
        raise InfluxURLError(f"{_shown(url)!r}: the path must be just the database name")
    if path_db and database is not None and database != path_db:
        raise InfluxURLError(
            f"{_shown(url)!r}: the URL names database {path_db!r} and --database is"
            f" {database!r}: give one of them"
        )
    name = database or path_db
    if not name:
        raise InfluxURLError(
            f"{_shown(url)!r}: no database: give it as the URL path (http://host:8086/mydb)"
            " or with --database"
        )
    if parts.query or parts.fragment:
        raise InfluxURLError(f"{_shown(url)!r}: unexpected query or fragment")
    return InfluxTarget(
        host=host,
        port=port or DEFAULT_PORT,
        database=name,
        ssl=parts.scheme == "https",
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


def _shown(url: str) -> str:
    """``url`` with any password masked, for messages."""
    return re.sub(r"//([^/@:]*):[^/@]*@", r"//\1:***@", url)


def parse_duration(text: str) -> str:
    """An InfluxQL duration literal (``1h``, ``30m``, ``7d``, ``1h30m``), checked."""
    value = text.strip()
    if not value or _DURATION.sub("", value) or not _DURATION.match(value):
        raise ValueError(f"{text!r} is not a duration such as 15m, 1h, 7d or 1h30m")
    return value


async def ping(target: InfluxTarget, timeout: float = 5.0) -> None:
    """Raise :class:`InfluxQueryError` unless the server answers ``/ping``."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.get(f"{target.url}/ping") as response,
        ):
            if response.status != 204:
                raise InfluxQueryError(
                    f"{target.url} answered /ping with HTTP {response.status}: not an InfluxDB 1.x?"
                )
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        raise _unreachable(target, exc, "ping") from None


async def query_points(
    target: InfluxTarget,
    series: Sequence[str],
    where: str,
    *,
    timeout: float = 60.0,
) -> list[Point]:
    """Every point of ``series`` matching the InfluxQL condition ``where``, as :class:`Point`.

    Columns that are tag keys become tags; the others, when not null, fields.
    InfluxDB's JSON writes a float with no fraction as an integer (``0``), so
    ``*_time`` fields come back as floats again.
    """
    points: list[Point] = []
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    try:
        async with aiohttp.ClientSession(
            timeout=client_timeout, headers=target._headers()
        ) as session:
            for name in series:
                measurement = _quote_identifier(name)
                tag_keys = {
                    row[0]
                    async for row in _rows(session, target, f"SHOW TAG KEYS FROM {measurement}")
                }
                query = f"SELECT * FROM {measurement} WHERE {where}"
                async for row, columns in _rows_with_columns(session, target, query):
                    points.append(_point(name, columns, row, tag_keys))
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        raise _unreachable(target, exc, "query") from None
    points.sort(key=lambda p: p.time_ns)
    return points


def _unreachable(target: InfluxTarget, exc: BaseException, what: str) -> InfluxQueryError:
    """A transport failure (refused, DNS, reset, timeout, TLS), said as the sinks say it."""
    error = classify_exception(exc, what=what, secrets=(target.password,))
    return InfluxQueryError(f"cannot reach InfluxDB at {target.url}: {error}")


def _quote_identifier(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _point(series: str, columns: list[str], row: list[Any], tag_keys: set[str]) -> Point:
    tags: dict[str, str] = {}
    fields: dict[str, FieldValue] = {}
    time_ns = 0
    for column, value in zip(columns, row, strict=False):
        if column == "time":
            time_ns = int(value)
        elif value is None:
            continue
        elif column in tag_keys:
            tags[column] = str(value)
        else:
            if type(value) is int and (column.endswith("_time") or column == "execution_time"):
                value = float(value)
            fields[column] = value
    return Point.trusted(series, time_ns, tags, fields)


async def _rows(
    session: aiohttp.ClientSession, target: InfluxTarget, query: str
) -> AsyncIterator[list[Any]]:
    async for row, _columns in _rows_with_columns(session, target, query):
        yield row


async def _rows_with_columns(
    session: aiohttp.ClientSession, target: InfluxTarget, query: str
) -> AsyncIterator[tuple[list[Any], list[str]]]:
    """Yield ``(row, columns)`` of a (chunked) ``/query`` answer; raise on any error."""
    params = {
        "db": target.database,
        "q": query,
        "epoch": "ns",
        "chunked": "true",
        "chunk_size": str(_CHUNK_SIZE),
    }
    # No redirect is followed (as the sinks): one could send the credentials elsewhere.
    async with session.get(f"{target.url}/query", params=params, allow_redirects=False) as response:
        if response.status != 200:
            text = error_text(await read_error_body(response), response.headers)
            error = classify_response(
                response.status,
                truncate(text, _SERVER_TEXT),
                what=f"query {query!r}",
                secrets=(target.password,),
            )
            raise InfluxQueryError(f"InfluxDB at {target.url}: {error}")
        async for answer in _json_lines(response):
            if "error" in answer:
                raise InfluxQueryError(f"InfluxDB: {answer['error']}")
            for result in answer.get("results", []):
                if "error" in result:
                    raise InfluxQueryError(f"InfluxDB: {result['error']} ({query})")
                for serie in result.get("series", []):
                    columns = serie.get("columns", [])
                    for row in serie.get("values", []):
                        yield row, columns


async def _json_lines(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of a chunked answer, one per line (a line can be megabytes long:
    JSON escapes newlines inside strings, so a raw newline only ends an object)."""
    parts: list[bytes] = []
    async for chunk in response.content.iter_any():
        if b"\n" not in chunk:
            parts.append(chunk)
            continue
        head, *lines, tail = chunk.split(b"\n")
        parts.append(head)
        for line in (b"".join(parts), *lines):
            if line.strip():
                yield _json(line, response)
        parts = [tail]
    rest = b"".join(parts)
    if rest.strip():
        yield _json(rest, response)


def _json(line: bytes, response: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        answer = json.loads(line)
    except ValueError:
        raise InfluxQueryError(f"{response.url.origin()} sent a reply that is not JSON") from None
    if not isinstance(answer, dict):
        raise InfluxQueryError(f"{response.url.origin()} sent an unexpected reply")
    return answer
