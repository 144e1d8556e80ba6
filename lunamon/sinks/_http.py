"""What the HTTP sinks share: :class:`HTTPSink`, error classification, ``Retry-After``, TLS.

Every failed write becomes one :class:`~lunamon.errors.SinkError` that says
whether the flusher may retry it (RELIABILITY.md, "InfluxDB 1.x behaviour"), with
the server's text truncated to 1 KB and no credential anywhere in it.
"""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import io
import ipaddress
import json
import re
import ssl
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from datetime import timezone
from typing import Final

import aiohttp
from yarl import URL

from lunamon._log import logger
from lunamon._secrets import Secret, redact
from lunamon.errors import MAX_SERVER_TEXT, BatchTooLarge, SinkError
from lunamon.point import Point, encode_lines_async

# Bodies up to this size are gzipped on the loop; bigger ones in a worker thread.
_INLINE_GZIP_BYTES: Final = 64 * 1024
# gzip's fastest level: on loopback and LAN links the CPU, not the bytes, is what a
# write costs (level 6 took 4x the CPU for 15 % fewer bytes on the seed's rows).
DEFAULT_COMPRESSION_LEVEL: Final = 1
# A streamed body is encoded in slices of about this many seconds, one loop turn apart,
_SLICE_SECONDS: Final = 0.002
# looking at the clock every this many points.
_SLICE_STEP: Final = 25
# Bytes of the encoded text kept back from each chunk for the next one, so that every
# chunk but the last ends inside a row: a body cut off at a chunk boundary (a write
# cancelled mid-stream) is then a parse error to the server, never a shorter insert.
_HELD_BACK: Final = 2
# delay-seconds (RFC 9110 allows digits only; a sign or fraction is tolerated).
_SECONDS: Final = re.compile(r"[+-]?[0-9]+(\.[0-9]+)?")
# How much of an error body is read: InfluxDB echoes whole offending lines.
_ERROR_BODY_BYTES: Final = 8 * MAX_SERVER_TEXT


def truncate(text: str, limit: int = MAX_SERVER_TEXT) -> str:
    """``text`` cut to ``limit`` characters, marked when cut."""
    return text if len(text) <= limit else text[:limit] + "...(truncated)"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header, ``None`` when absent or unreadable.

    Accepts delay-seconds (int or float) and an HTTP date (the delay from
    ``now``, default the wall clock). A negative or past value means "now" (0.0).
    No upper cap: capping is the flusher's decision.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if _SECONDS.fullmatch(text):
        return max(float(text), 0.0)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": no zone given; HTTP dates are always GMT
        when = when.replace(tzinfo=timezone.utc)
    reference = time.time() if now is None else now
    return max(when.timestamp() - reference, 0.0)


def error_text(body: bytes, headers: Mapping[str, str] | None = None) -> str:
    """The server's explanation of an error: the ``error``/``message`` of a JSON body
    (InfluxDB 1.x / 2.x), else the body as text, else the ``X-Influxdb-Error`` header."""
    text = body.decode("utf-8", errors="replace").strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            pass
        else:
            if isinstance(data, dict):
                for key in ("error", "message"):
                    value = data.get(key)
                    if isinstance(value, str) and value:
                        return value
    if not text and headers is not None:
        text = headers.get("X-Influxdb-Error", "")
    return text


async def read_error_body(response: aiohttp.ClientResponse) -> bytes:
    """At most a few KB of an error response (enough for the 1 KB excerpt)."""
    try:
        return await response.content.read(_ERROR_BODY_BYTES)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return b""


def classify_response(
    status: int,
    text: str,
    headers: Mapping[str, str] | None = None,
    *,
    what: str = "write",
    secrets: Iterable[str | Secret | None] = (),
) -> SinkError:
    """The :class:`SinkError` for a write answered with a non-2xx ``status``.

    Retryable: 408, 429, 5xx (``Retry-After`` honoured), except a 500 for an
    unknown retention policy (a configuration error). Not retryable: 400
    (partial write, type conflict, bad line: the good lines were stored),
    401, 403, 404 and other 4xx and 3xx. 413 is :class:`BatchTooLarge`.
    """
    server_text = redact(text, secrets)  # SinkError truncates it to 1 KB
    if status == 413:
        return BatchTooLarge(f"{what} failed: HTTP 413 body too large", server_text=server_text)
    reason, retryable = _reason(status, text.lower())
    retry_after = None
    if retryable and headers is not None:
        retry_after = parse_retry_after(headers.get("Retry-After"))
    return SinkError(
        f"{what} failed: HTTP {status} {reason}".rstrip(),
        retryable=retryable,
        status=status,
        retry_after=retry_after,
        server_text=server_text,
    )


def _reason(status: int, lowered: str) -> tuple[str, bool]:
    """A short reason for the log, and whether a retry can succeed."""
    if status == 400:
        return ("partial write" if "partial write" in lowered else "bad request"), False
    if status == 401:
        return "unauthorized (missing or wrong credentials)", False
    if status == 403:
        return "forbidden (the user may not write here)", False
    if status == 404:
        return ("database not found" if "database not found" in lowered else "not found"), False
    if status == 500 and "retention policy not found" in lowered:
        return "retention policy not found", False
    if status == 503 and "throttled" in lowered:
        return "throttled", True
    if status == 429:
        return "too many requests", True
    if status == 408 or 500 <= status <= 599:
        return "", True
    return "", False


def classify_exception(
    exc: BaseException, *, what: str = "write", secrets: Iterable[str | Secret | None] = ()
) -> SinkError:
    """A transport failure (connection refused, DNS, reset, timeout, TLS) as a retryable
    :class:`SinkError`; its message has the failure's type and text, never credentials.

    Raise the result ``from None``: aiohttp exceptions carry ``request_info`` with
    the request headers, Authorization included.
    """
    if isinstance(exc, asyncio.TimeoutError):
        detail = "timed out"
    else:
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return SinkError(f"{what} failed: {redact(detail, secrets)}", retryable=True)


def make_ssl_context(verify: bool = True, ca_file: str | None = None) -> ssl.SSLContext:
    """Client TLS context: verification on by default against the system CAs plus
    ``ca_file``; ``verify=False`` (explicit only) turns off certificate and host checks."""
    context = ssl.create_default_context(cafile=ca_file)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (``localhost``, 127.0.0.0/8, ``::1``)."""
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_compression_level(level: int) -> int:
    """``level`` when it is a gzip level (1 fastest .. 9 smallest), else ``ValueError``."""
    if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 9:
        raise ValueError(f"compression_level must be an int in 1..9, not {level!r}")
    return level


async def compress(body: bytes, level: int = DEFAULT_COMPRESSION_LEVEL) -> bytes:
    """gzip ``body`` at ``level``; large bodies are compressed in a worker thread, off the
    event loop."""
    if len(body) <= _INLINE_GZIP_BYTES:
        return gzip.compress(body, compresslevel=level, mtime=0)
    return await asyncio.to_thread(gzip.compress, body, level, mtime=0)


class StreamedBody:
    """A request body encoded while it is sent (chunked transfer encoding), so the server
    reads and parses the first rows while the next ones are encoded.

    Iterating it encodes ``points`` with ``encode`` in slices of about 2 ms, one loop
    turn apart (the loop never stalls on a batch), gzip-compressed at ``level`` unless
    it is None. Every chunk but the last ends inside a row (:data:`_HELD_BACK`). An
    exception of ``encode`` is kept in :attr:`error`: aiohttp reports it as a
    connection error, the sink raises the real one. Iterable once: a retry makes a
    new body.
    """

    def __init__(
        self,
        points: Sequence[Point],
        encode: Callable[[Sequence[Point]], bytes],
        level: int | None = None,
    ) -> None:
        self.points = points
        self.encode = encode
        self.level = level
        self.error: Exception | None = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        try:
            compressor = None
            if self.level is not None:  # wbits 31: a gzip member, mtime 0
                compressor = zlib.compressobj(self.level, zlib.DEFLATED, 31)
            points, encode, clock = self.points, self.encode, time.perf_counter
            held = b""
            start, end = 0, len(points)
            while start < end:
                parts = [held]
                deadline = clock() + _SLICE_SECONDS
                while start < end:
                    parts.append(encode(points[start : start + _SLICE_STEP]))
                    start += _SLICE_STEP
                    if clock() >= deadline:
                        break
                data = b"".join(parts)
                if start < end:
                    data, held = data[:-_HELD_BACK], data[-_HELD_BACK:]
                if compressor is not None:  # flushed: the server can inflate what it has
                    last = start >= end
                    data = compressor.compress(data)
                    data += compressor.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)
                if data:
                    yield data
                if start < end:
                    await asyncio.sleep(0)
        except Exception as exc:
            self.error = exc
            raise


def new_session(timeout: float, ssl_context: ssl.SSLContext | None) -> aiohttp.ClientSession:
    """A session for one sink: ``timeout`` seconds for a whole request (connect, send,
    answer), TLS with ``ssl_context`` when given, no proxy or ``.netrc`` from the environment.

    Call it inside the running loop (``start()``), never at construction.
    """
    connector = aiohttp.TCPConnector(ssl=ssl_context if ssl_context is not None else True)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout),
        headers={"User-Agent": "lunamon"},
        trust_env=False,
    )


async def post_body(
    session: aiohttp.ClientSession,
    url: URL,
    body: bytes | StreamedBody,
    *,
    authorization: Secret | None,
    gzipped: bool,
    what: str,
    secrets: Iterable[str | Secret | None] = (),
    content_type: str = "text/plain; charset=utf-8",
) -> None:
    """POST a body; return on 2xx, else raise the classified :class:`SinkError`.

    Redirects are not followed: a write endpoint that redirects is a
    configuration error, and following one could send the credentials elsewhere.
    """
    headers = {"Content-Type": content_type}
    if authorization is not None:
        headers["Authorization"] = authorization.reveal()
    if gzipped:
        headers["Content-Encoding"] = "gzip"
    try:
        async with session.post(
            url, data=request_data(body), headers=headers, allow_redirects=False
        ) as resp:
            if 200 <= resp.status < 300:
                return
            status, answer_headers = resp.status, resp.headers
            raw = await read_error_body(resp)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        raise transport_error(exc, body, what=what, secrets=secrets) from None
    raise classify_response(
        status, error_text(raw, answer_headers), answer_headers, what=what, secrets=secrets
    )


def request_data(body: bytes | StreamedBody) -> io.BytesIO | StreamedBody:
    """What aiohttp is given to send ``body``: a BytesIO goes out in chunks with yields to
    the loop (raw bytes over 1 MB would be one write, and aiohttp warns with a
    ResourceWarning); a :class:`StreamedBody` as it is encoded."""
    return io.BytesIO(body) if isinstance(body, bytes) else body


def transport_error(
    exc: BaseException,
    body: bytes | StreamedBody,
    *,
    what: str,
    secrets: Iterable[str | Secret | None] = (),
) -> Exception:
    """The exception for a request that failed without an answer: the encoder's own
    when a streamed body could not be encoded, else the classified transport failure."""
    if isinstance(body, StreamedBody) and body.error is not None:
        return body.error
    return classify_exception(exc, what=what, secrets=secrets)


def _stops(task: asyncio.Task[None]) -> bool:
    """Whether a part's failure means the parts after it would fail alike: anything
    but a 400 (its own data refused)."""
    if task.cancelled():
        return True
    failure = task.exception()
    return failure is not None and not (isinstance(failure, SinkError) and failure.status == 400)


def refuse_plain_credentials(
    has_credentials: bool, tls: bool, host: str | None, allow: bool
) -> bool:
    """Whether credentials would go over plain HTTP to another host (``allow`` is needed then).

    Raises ``ValueError`` when they would and ``allow`` is false; the caller logs a
    warning when the session opens with them.
    """
    plain = has_credentials and not tls and not is_loopback(host or "")
    if plain and not allow:
        raise ValueError(
            f"credentials would go to {host} over plain HTTP: use TLS,"
            " or pass allow_plain_credentials=True to accept that"
        )
    return plain


class SinkSession:
    """The aiohttp session of one HTTP sink.

    Opened in the running loop (never at construction, which may happen before
    the loop exists), with the sink's timeout and TLS settings; after
    :meth:`close`, writes fail without retry.
    """

    def __init__(
        self,
        *,
        what: str,
        name: str,
        url: str,
        timeout: float,
        tls: bool,
        verify_ssl: bool,
        ca_file: str | None,
        plain_credentials: bool,
    ) -> None:
        self.what = what
        self.name = name
        self.url = url
        self.timeout = timeout
        self.tls = tls
        self.verify_ssl = verify_ssl
        self.ca_file = ca_file
        self.plain_credentials = plain_credentials
        self.closed = False
        self._session: aiohttp.ClientSession | None = None

    def open(self) -> aiohttp.ClientSession:
        """The session, opened on first use."""
        if self.closed:
            raise SinkError(f"{self.what} failed: the sink is closed", retryable=False)
        if self._session is None:
            context = make_ssl_context(self.verify_ssl, self.ca_file) if self.tls else None
            self._session = new_session(self.timeout, context)
            if self.plain_credentials:
                logger.warning(
                    "influxdb_plain_credentials",
                    sink=self.name,
                    url=self.url,
                    detail="credentials are sent over plain HTTP (allow_plain_credentials=True)",
                )
        return self._session

    def start(self) -> aiohttp.ClientSession:
        """Open (again, after a close) the session."""
        self.closed = False
        return self.open()

    async def close(self) -> None:
        """Close the session; later writes raise a non-retryable :class:`SinkError`."""
        self.closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()


class HTTPSink:
    """The base of the sinks that POST batches over HTTP (InfluxDB 1.x, the v2 API).

    A subclass sets the URL, credentials and TLS in ``__init__`` through
    :meth:`_configure`; ``write`` then sends a batch as requests of up to
    :attr:`part_size` points, each sent as soon as it is encoded (:meth:`encode`:
    line protocol unless overridden) and gzipped, so the server stores one part
    while the next is encoded (:meth:`send`), every failure raised as a classified
    :class:`SinkError`.

    When every part is stored the batch is. A part refused for its data (400)
    does not stop the others. When a part fails, the error says which points are
    not stored (``SinkError.pending``: the parts not stored): the flusher counts
    the others written at once and retries, refuses or (413) splits only those, so
    a stored part is never sent again. A retryable failure of one part makes the
    whole rest retryable (a part refused for its data is refused again then).
    """

    name: str
    url: str
    gzip: bool
    compression_level: int = DEFAULT_COMPRESSION_LEVEL
    content_type = "text/plain; charset=utf-8"
    # Points per request: the server parses one part while the next is encoded.
    part_size = 1000

    def _configure(
        self,
        *,
        write_url: URL,
        what: str,
        timeout: float,
        tls: bool,
        verify_ssl: bool,
        ca_file: str | None,
        authorization: Secret | None,
        secrets: tuple[Secret | None, ...],
        plain_credentials: bool,
    ) -> None:
        self._write_url = write_url
        self._what = what
        self._authorization = authorization
        self._secrets = secrets
        self._http = SinkSession(
            what=what,
            name=self.name,
            url=self.url,
            timeout=timeout,
            tls=tls,
            verify_ssl=verify_ssl,
            ca_file=ca_file,
            plain_credentials=plain_credentials,
        )

    async def start(self) -> None:
        """Open the HTTP session (no request is made: a down server is found at the write)."""
        self._http.start()

    async def write(self, points: Sequence[Point]) -> None:
        """Write one batch; raise a classified :class:`SinkError` when it is not stored."""
        if not points:
            return
        self._http.open()  # a closed sink fails here, before any work
        batch = points if isinstance(points, list) else list(points)
        stored: set[int] = set()
        step = self.part_size
        sent: list[tuple[int, int, asyncio.Task[None]]] = []  # offset, points, request
        try:
            for offset in range(0, len(batch), step):
                if any(task.done() and _stops(task) for _, _, task in sent):
                    break  # the rest would fail alike (server down, credentials)
                part = batch[offset : offset + step]
                body = await self.encode(part)
                if self.gzip:
                    body = await compress(body, self.compression_level)
                sent.append((offset, len(part), asyncio.ensure_future(self.send(body))))
            if sent:
                await asyncio.wait([task for _, _, task in sent])
        finally:
            waiting = [task for _, _, task in sent if not task.done()]
            for task in waiting:  # cancelled (a timeout, the shutdown) or encoding failed
                task.cancel()
            if waiting:
                await asyncio.wait(waiting)
        failures: list[BaseException] = []
        for offset, _, task in sent:
            failure: BaseException | None
            if task.cancelled():  # not by this write, which would have raised above
                failure = SinkError(f"{self._what} failed: cancelled", retryable=True)
            else:
                failure = task.exception()
            if failure is None:
                stored.add(offset)
            else:
                failures.append(failure)
        if not failures:
            return
        pending = [
            point
            for offset in range(0, len(batch), step)
            if offset not in stored
            for point in batch[offset : offset + step]
        ]
        retry = [f for f in failures if isinstance(f, SinkError) and f.retryable]
        final = [f for f in failures if not isinstance(f, SinkError) or not f.retryable]
        error = (
            retry[0]
            if retry
            else next((f for f in final if not isinstance(f, BatchTooLarge)), final[0])
        )
        if isinstance(error, SinkError):
            error.pending = pending
        raise error

    async def encode(self, batch: list[Point]) -> bytes:
        """The request body for ``batch``, yielding to the loop between chunks."""
        return await encode_lines_async(batch)

    async def send(self, body: bytes) -> None:
        """POST an encoded (and maybe gzipped) batch to the write URL."""
        await post_body(
            self._http.open(),
            self._write_url,
            body,
            authorization=self._authorization,
            gzipped=self.gzip,
            what=self._what,
            secrets=self._secrets,
            content_type=self.content_type,
        )

    async def close(self) -> None:
        """Close the HTTP session; later writes raise a non-retryable :class:`SinkError`."""
        await self._http.close()
