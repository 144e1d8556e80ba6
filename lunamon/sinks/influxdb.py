"""The InfluxDB 1.x sink: ``POST /write?db=..&precision=ns`` with lunamon's own encoder.

Why the HTTP calls are made with aiohttp directly rather than through
aioinflux 0.9.0's ``InfluxDBClient`` (checked against its source):

- its encoder is wrong for InfluxDB 1.x (RELIABILITY.md), so lunamon encodes;
  it would only have been the transport, and as a transport it
- takes the error text only from the ``X-Influxdb-Error`` header, never from
  the body: influxd 1.6.7 leaves that header out of a 401, and proxies,
  VictoriaMetrics and 2.x do not send it at all;
- cannot send a per-request header, so no ``Content-Encoding: gzip``;
- raises ``NotImplementedError`` for ``precision=`` (we rely on the ns default);
- falls back to aiohttp's 300 s timeout, calls ``asyncio.get_event_loop()`` in
  its constructor (deprecated without a running loop: a warning since Python
  3.12, an error since 3.14, so it cannot be built with the app) and closes its
  session from ``__del__``;
- shows the password in ``repr(client)`` (the ``BasicAuth`` kept in ``opts``).

So :meth:`InfluxDBSink.start` creates one ``aiohttp.ClientSession`` in the
running loop, with an explicit timeout, and every request carries Basic auth
in its ``Authorization`` header, never in the URL. A service that already holds
an ``aioinflux.InfluxDBClient`` may pass it as ``client=``: it then carries the
bodies lunamon encodes (its database, credentials and URL apply; no gzip).
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from typing import Any

import aiohttp
from yarl import URL

from lunamon._log import RateLimitedLogger, logger
from lunamon._secrets import Secret
from lunamon.errors import SinkError
from lunamon.sinks._http import (
    DEFAULT_COMPRESSION_LEVEL,
    HTTPSink,
    check_compression_level,
    classify_exception,
    classify_response,
    error_text,
    read_error_body,
    refuse_plain_credentials,
)

if sys.version_info >= (3, 11):
    from asyncio import timeout as _timeout
else:  # pragma: no cover - aiohttp brings async_timeout on 3.10
    from async_timeout import timeout as _timeout  # type: ignore[import-not-found,unused-ignore]

__all__ = ["InfluxDBSink"]


class InfluxDBSink(HTTPSink):
    """Writes batches to an InfluxDB 1.x database (also VictoriaMetrics' ``/write``).

    With ``create_database`` the database is created at :meth:`start` (or, when
    the server is down then, before the first write) and again after a
    ``404 database not found``, after which the batch is retried once. A database
    that vanished (dropped) and was created again is logged as a warning (once per
    interval: the points written to it before are gone) and counted in
    ``stats()["<name>"]["events"]["database_recreated"]``.
    Credentials over plain HTTP to another host are refused unless
    ``allow_plain_credentials=True``.

    :param host: the server's host name or address
    :param port: the server's HTTP port
    :param database: the database written to (LUNA's default ``luna_monitoring``)
    :param username: user for Basic auth; none sends no credentials
    :param password: that user's password (a secret: never shown)
    :param ssl: HTTPS instead of HTTP
    :param verify_ssl: verify the server's certificate and host name
    :param timeout: seconds for one HTTP request, connect to answer
    :param create_database: create the database at start and after a 404
    :param ca_file: a PEM file of CAs trusted besides the system's
    :param retention_policy: the retention policy written to (``rp=``)
    :param gzip: send bodies gzip-compressed
    :param compression_level: gzip level, 1 (fastest, the default) to 9 (smallest bodies)
    :param name: the sink's name in ``stats()`` and logs
    :param allow_plain_credentials: allow credentials over plain HTTP to another host
    :param client: an ``aioinflux.InfluxDBClient`` to carry the bodies (code only)
    """

    def __init__(
        self,
        host: str = "localhost",
        port: int = 8086,
        database: str = "luna_monitoring",
        username: str | None = None,
        password: str | None = None,
        ssl: bool = False,
        verify_ssl: bool = True,
        timeout: float = 10.0,
        create_database: bool = True,
        *,
        ca_file: str | None = None,
        retention_policy: str | None = None,
        gzip: bool = False,
        compression_level: int = DEFAULT_COMPRESSION_LEVEL,
        name: str | None = None,
        allow_plain_credentials: bool = False,
        client: Any = None,
    ) -> None:
        if not host:
            raise ValueError("host must not be empty")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"port must be an int in 1..65535, not {port!r}")
        if not isinstance(database, str) or not database:
            raise ValueError("database must be a non-empty string")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, not {timeout!r}")
        if password is not None and not username:
            raise ValueError("a password needs a username")
        if client is not None and not callable(getattr(client, "write", None)):
            raise TypeError("client= takes an aioinflux.InfluxDBClient (it has no write())")
        if client is not None and gzip:
            raise ValueError("gzip=True needs lunamon's own transport: aioinflux cannot send it")
        plain = refuse_plain_credentials(bool(username), ssl, host, allow_plain_credentials)
        self.name = name or "influxdb"
        self.host = host
        self.port = port
        self.database = database
        self.username = username
        self.ssl = ssl
        self.verify_ssl = verify_ssl
        self.ca_file = ca_file
        self.timeout = float(timeout)
        self.create_database = create_database
        self.retention_policy = retention_policy
        self.gzip = gzip
        self.compression_level = check_compression_level(compression_level)
        self.client = client
        self._password = Secret(password or "")
        authorization: Secret | None = None
        if username:
            token = base64.b64encode(f"{username}:{password or ''}".encode()).decode("ascii")
            authorization = Secret(f"Basic {token}")
        base = URL.build(scheme="https" if ssl else "http", host=host, port=port)
        self.url = str(base)
        params = {"db": database, "precision": "ns"}
        if retention_policy:
            params["rp"] = retention_policy
        self._query_url = base.with_path("/query")
        self._configure(
            write_url=base.with_path("/write").with_query(params),
            what=f"influxdb write to {self.url} db={database}",
            timeout=self.timeout,
            tls=ssl,
            verify_ssl=verify_ssl,
            ca_file=ca_file,
            authorization=authorization,
            secrets=(self._password, authorization),
            plain_credentials=plain,
        )
        self._need_database = create_database
        self._database_lock = asyncio.Lock()
        # Successful creations so far: a write answered 404 after one that another part
        # of the batch made since it was sent needs no creation of its own.
        self._creations = 0
        self._vanished = False  # a write found the database gone; not created again yet
        # Counted in stats() (the flusher reads `events`).
        self.events: dict[str, int] = {"database_recreated": 0}
        self._log = RateLimitedLogger()

    def __repr__(self) -> str:
        password = "'***'" if self._password else "None"
        via = ", client=aioinflux" if self.client is not None else ""
        return (
            f"InfluxDBSink(name={self.name!r}, url={self.url!r}, database={self.database!r},"
            f" username={self.username!r}, password={password}{via})"
        )

    __str__ = __repr__

    async def start(self) -> None:
        """Open the HTTP session and create the database when configured.

        A server that is down or refuses the creation is logged, not raised:
        the database is created before the first write instead.
        """
        await super().start()
        if not self._need_database:
            return
        try:
            await self._ensure_database()
        except SinkError as exc:
            logger.warning(
                "influxdb_create_database_failed",
                sink=self.name,
                database=self.database,
                error=str(exc),
                will_retry=exc.retryable,
            )

    async def send(self, body: bytes) -> None:
        """POST the batch, creating the database first (or after a 404) when allowed."""
        tried_create = self._need_database
        if tried_create:
            try:
                await self._ensure_database()
            except SinkError as exc:
                if exc.retryable:
                    raise
                # Not allowed to create it (a user without admin rights): write
                # anyway, the database may well exist.
        creations = self._creations
        try:
            await self._post(body)
        except SinkError as exc:
            if tried_create or not (self.create_database and _database_not_found(exc)):
                raise
            self._need_database = self._vanished = True
            try:
                await self._ensure_database(creations)
            except SinkError as create_error:
                # The server went away meanwhile: retry the batch later; refused: the 404 stands.
                raise (create_error if create_error.retryable else exc) from None
            await self._post(body)

    async def _post(self, body: bytes) -> None:
        if self.client is None:
            await super().send(body)
        else:
            await self._post_with_client(body)

    async def _post_with_client(self, body: bytes) -> None:
        """The body through the user's aioinflux client, its errors classified like ours."""
        try:
            async with _timeout(self.timeout):
                await self.client.write(body, db=self.database, rp=self.retention_policy)
            return
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise classify_exception(exc, what=self._what, secrets=self._secrets) from None
        except Exception as exc:
            status = getattr(exc, "status", None)
            if not isinstance(status, int):
                raise
            headers = getattr(exc, "headers", None) or {}
            text = headers.get("X-Influxdb-Error", "") or str(getattr(exc, "reason", "") or "")
            error = classify_response(status, text, headers, what=self._what, secrets=self._secrets)
        raise error from None

    async def _ensure_database(self, seen: int | None = None) -> None:
        """``CREATE DATABASE`` once; raises the classified :class:`SinkError` on failure.

        After a retryable failure it is tried again before the next write; after
        any other only when a write answers ``404 database not found``. ``seen``: the
        creations made when that write was sent; one made since answers it.
        """
        async with self._database_lock:
            if seen is not None and seen != self._creations:
                self._need_database = self._vanished = False
            if not self._need_database:
                return
            try:
                await self._create_database()
            except SinkError as exc:
                if not exc.retryable:
                    self._need_database = self._vanished = False
                raise
            self._need_database = False
            self._creations += 1
            if self._vanished:
                self._vanished = False
                self._database_recreated()

    def _database_recreated(self) -> None:
        self.events["database_recreated"] += 1
        self._log.log(
            "warning",
            "influxdb_database_recreated",
            key=self.database,
            sink=self.name,
            database=self.database,
            consequence="the database was gone (dropped?) and is created again:"
            " the points written to it before are lost",
            times=self.events["database_recreated"],
        )

    async def _create_database(self) -> None:
        what = f"influxdb create database {self.database!r} at {self.url}"
        name = self.database.replace("\\", "\\\\").replace('"', '\\"')
        statement = f'CREATE DATABASE "{name}"'
        if self.client is not None:
            try:
                async with _timeout(self.timeout):
                    await self.client.query(statement)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                raise classify_exception(exc, what=what, secrets=self._secrets) from None
            except Exception as exc:
                detail = f"{type(exc).__name__}: {exc}"
                raise SinkError(f"{what} failed", retryable=False, server_text=detail) from None
            return
        session = self._http.open()
        headers = {}
        if self._authorization is not None:
            headers["Authorization"] = self._authorization.reveal()
        try:
            async with session.post(
                self._query_url, data={"q": statement}, headers=headers, allow_redirects=False
            ) as resp:
                status, answer_headers = resp.status, resp.headers
                raw = await (resp.read() if status == 200 else read_error_body(resp))
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise classify_exception(exc, what=what, secrets=self._secrets) from None
        if status != 200:
            raise classify_response(
                status,
                error_text(raw, answer_headers),
                answer_headers,
                what=what,
                secrets=self._secrets,
            )
        statement_error = _statement_error(raw)
        if statement_error:
            raise SinkError(f"{what} failed", retryable=False, server_text=statement_error)


def _database_not_found(exc: SinkError) -> bool:
    return exc.status == 404 and "database not found" in exc.server_text.lower()


def _statement_error(raw: bytes) -> str:
    """The first statement error of a 200 ``/query`` answer, ``""`` when none."""
    try:
        data = json.loads(raw)
    except ValueError:
        return ""
    if not isinstance(data, dict):
        return ""
    for result in data.get("results") or []:
        if isinstance(result, dict) and result.get("error"):
            return str(result["error"])
    return str(data.get("error") or "")
