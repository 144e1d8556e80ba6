"""Private server processes for tests: influxd and victoria-metrics on free loopback ports.

Every server gets its own temporary data directory and free 127.0.0.1 ports,
is polled until it answers (with a deadline, never a fixed sleep), and is
stopped with SIGTERM, then SIGKILL after a timeout. The session fixtures start
each kind once; :func:`influxd_factory` starts extra private instances for
tests that kill or restart one.

:class:`FakeInfluxServer` is an aiohttp server with a programmable list of
answers, for faults a real server cannot be made to produce (429 with
``Retry-After``, a socket that never answers).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import pytest
from aiohttp import web

__all__ = [
    "HANG",
    "FakeInfluxServer",
    "FakeResponse",
    "InfluxServer",
    "RecordedRequest",
    "ServerError",
    "TlsFiles",
    "VictoriaMetricsServer",
    "fake_influx",
    "free_port",
    "influxd",
    "influxd_auth",
    "influxd_factory",
    "influxd_small_body",
    "tls_cert",
    "victoria_metrics",
    "wait_until",
    "wait_until_async",
]

STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
_START_ATTEMPTS = 3

ADMIN_USER = "admin"
ADMIN_PASSWORD = "adm1n-s3cret-pw"
READER_USER = "reader"
READER_PASSWORD = "r3ader-s3cret-pw"
AUTH_DB = "lunamon_auth"


class ServerError(RuntimeError):
    """A server did not start, or answered a helper request with an error."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


async def wait_until_async(
    predicate: Callable[[], Awaitable[Any]],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "",
) -> Any:
    """:func:`wait_until` for an async predicate, without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while True:
        result = await predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(interval)


# No proxy from the environment: every server here is on 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http(
    method: str,
    url: str,
    *,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, bytes]:
    """One blocking HTTP request; returns (status, body) for any status."""
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as err:
        with err:
            return int(err.code), bytes(err.read())


# --------------------------------------------------------------------------- processes


class _Process:
    """A server binary with its log file, started and stopped by the rules above."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.argv = argv
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, ready: Callable[[], bool], timeout: float = STARTUP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                code = self.proc.returncode if self.proc is not None else None
                raise ServerError(
                    f"{self.argv[0]} exited with {code} while starting:\n{self.log_tail()}"
                )
            try:
                if ready():
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"{self.argv[0]} not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL when it is still running after ``timeout`` seconds."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait()
        self.proc = None


# --------------------------------------------------------------------------- influxd


_INFLUXD_CONFIG = """\
reporting-disabled = true
bind-address = "127.0.0.1:{rpc_port}"
[meta]
  dir = "{root}/meta"
[data]
  dir = "{root}/data"
  wal-dir = "{root}/wal"
  query-log-enabled = false
[coordinator]
  log-queries-after = "0s"
[http]
  bind-address = "127.0.0.1:{port}"
  log-enabled = false
  auth-enabled = {auth}
  max-body-size = {max_body_size}
[monitor]
  store-enabled = false
[logging]
  level = "warn"
[continuous_queries]
  enabled = false
"""


class InfluxServer:
    """A private influxd 1.x: ``url``, ``host``, ``port``, query and write helpers.

    The helpers block (urllib): call them from async tests only while nothing
    in the test's own event loop has to answer meanwhile (the fake server does).

    ``kill()`` / ``start()`` / ``restart()`` keep the same port and data
    directory, so a sink pointed at it sees a crash and a recovery.
    """

    def __init__(self, root: Path, *, auth: bool = False, max_body_size: int = 25_000_000) -> None:
        self.root = root
        self.host = "127.0.0.1"
        self.port = free_port()
        self.rpc_port = free_port()
        self.auth = auth
        self.max_body_size = max_body_size
        self.admin_user = ADMIN_USER if auth else None
        self.admin_password = ADMIN_PASSWORD if auth else None
        self.reader_user = READER_USER if auth else None
        self.reader_password = READER_PASSWORD if auth else None
        self.auth_db = AUTH_DB if auth else None
        self.config_path = root / "influxd.conf"
        self._process = _Process(
            ["influxd", "-config", str(self.config_path)], root / "influxd.log"
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process.running

    def __repr__(self) -> str:
        return f"InfluxServer(url={self.url!r}, auth={self.auth})"

    def _write_config(self) -> None:
        self.config_path.write_text(
            _INFLUXD_CONFIG.format(
                root=self.root,
                port=self.port,
                rpc_port=self.rpc_port,
                auth="true" if self.auth else "false",
                max_body_size=self.max_body_size,
            )
        )

    def _ping(self) -> bool:
        status, _ = _http("GET", f"{self.url}/ping", timeout=1.0)
        return status == 204

    def start(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Start (again) on the same port and data directory; return once ``/ping`` answers."""
        if self.running:
            return
        self._write_config()
        self._process.spawn()
        self._process.wait_ready(self._ping, timeout)

    def first_start(self) -> None:
        """Start on fresh ports, trying new ones if another process took them meanwhile."""
        for attempt in range(_START_ATTEMPTS):
            try:
                self.start()
                break
            except ServerError:
                if attempt == _START_ATTEMPTS - 1:
                    raise
                self.port, self.rpc_port = free_port(), free_port()
        if self.auth:
            self._create_users()

    def _create_users(self) -> None:
        # With auth on and no user yet, influxd accepts exactly this statement unauthenticated.
        self.query(
            f"CREATE USER {ADMIN_USER} WITH PASSWORD '{ADMIN_PASSWORD}' WITH ALL PRIVILEGES",
            auth=None,
        )
        self.query(f'CREATE DATABASE "{AUTH_DB}"')
        self.query(f"CREATE USER {READER_USER} WITH PASSWORD '{READER_PASSWORD}'")
        self.query(f'GRANT READ ON "{AUTH_DB}" TO {READER_USER}')

    def kill(self) -> None:
        """SIGKILL the server (a crash); ``start()`` brings it back on the same port and data."""
        self._process.kill()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        self._process.stop(timeout)

    def restart(self, *, hard: bool = True) -> None:
        """Kill (``hard``) or stop the server, then start it again on the same port and data."""
        if hard:
            self.kill()
        else:
            self.stop()
        self.start()

    def _auth_header(self, auth: tuple[str, str] | None) -> dict[str, str]:
        if auth is None:
            return {}
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def _default_auth(self) -> tuple[str, str] | None:
        if self.admin_user is not None and self.admin_password is not None:
            return (self.admin_user, self.admin_password)
        return None

    def query(
        self,
        q: str,
        db: str | None = None,
        *,
        epoch: str = "ns",
        auth: tuple[str, str] | Literal["admin"] | None = "admin",
    ) -> Any:
        """Run InfluxQL ``q`` (as admin on the auth server); the parsed JSON answer.

        Raises :class:`ServerError` for an HTTP error or a statement error.
        """
        creds = self._default_auth() if auth == "admin" else auth
        params = {"q": q, "epoch": epoch}
        if db is not None:
            params["db"] = db
        body = urllib.parse.urlencode(params).encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded", **self._auth_header(creds)}
        status, raw = _http("POST", f"{self.url}/query", data=body, headers=headers)
        if status != 200:
            raise ServerError(f"query {q!r} answered {status}: {raw[:500]!r}")
        result = json.loads(raw)
        for statement in result.get("results", []):
            if "error" in statement:
                raise ServerError(f"query {q!r} failed: {statement['error']}")
        return result

    def rows(self, q: str, db: str) -> list[dict[str, Any]]:
        """The rows of a SELECT as dicts (column -> value), over all returned series."""
        out: list[dict[str, Any]] = []
        for statement in self.query(q, db).get("results", []):
            for series in statement.get("series", []):
                columns = series["columns"]
                out.extend(dict(zip(columns, values, strict=True)) for values in series["values"])
        return out

    def column(self, q: str, db: str, name: str = "name") -> list[Any]:
        """One column of a SHOW/SELECT answer (e.g. the names from ``SHOW MEASUREMENTS``)."""
        return [row[name] for row in self.rows(q, db)]

    def field_types(self, measurement: str, db: str) -> dict[str, str]:
        """``SHOW FIELD KEYS``: field key -> stored type (float, integer, string, boolean)."""
        rows = self.rows(f'SHOW FIELD KEYS FROM "{measurement}"', db)
        return {row["fieldKey"]: row["fieldType"] for row in rows}

    def stored(self, db: str) -> list[tuple[str, int, dict[str, str], dict[str, Any]]]:
        """Everything in ``db`` as (measurement, time_ns, tags, fields), sorted.

        Tags and fields are told apart with ``GROUP BY *``; field values get
        their stored type from ``SHOW FIELD KEYS`` (JSON prints the float 1.0 as 1).
        """
        types: dict[tuple[str, str], str] = {}
        for statement in self.query("SHOW FIELD KEYS", db).get("results", []):
            for series in statement.get("series", []):
                for key, kind in series["values"]:
                    types[(series["name"], key)] = kind
        out: list[tuple[str, int, dict[str, str], dict[str, Any]]] = []
        for statement in self.query("SELECT * FROM /.*/ GROUP BY *", db).get("results", []):
            for series in statement.get("series", []):
                name = series["name"]
                tags = {k: v for k, v in (series.get("tags") or {}).items() if v != ""}
                columns = series["columns"]
                for values in series["values"]:
                    row = dict(zip(columns, values, strict=True))
                    time_ns = row.pop("time")
                    fields = {
                        k: float(v) if types.get((name, k)) == "float" else v
                        for k, v in row.items()
                        if v is not None
                    }
                    out.append((name, time_ns, tags, fields))
        out.sort(key=lambda item: (item[0], item[1], sorted(item[2].items())))
        return out

    def write(self, lines: bytes | str, db: str) -> tuple[int, bytes]:
        """POST line protocol as admin; (status, body), whatever the status."""
        data = lines.encode() if isinstance(lines, str) else lines
        query = urllib.parse.urlencode({"db": db, "precision": "ns"})
        headers = self._auth_header(self._default_auth())
        return _http("POST", f"{self.url}/write?{query}", data=data, headers=headers)

    def create_database(self, db: str) -> None:
        self.query(f'CREATE DATABASE "{db}"')

    def drop_database(self, db: str) -> None:
        self.query(f'DROP DATABASE "{db}"')

    def databases(self) -> list[str]:
        return [values[0] for values in _values(self.query("SHOW DATABASES"))]


def _values(result: Any) -> list[list[Any]]:
    out: list[list[Any]] = []
    for statement in result.get("results", []):
        for series in statement.get("series", []):
            out.extend(series.get("values", []))
    return out


@contextlib.contextmanager
def _influxd_instance(
    *, auth: bool = False, max_body_size: int = 25_000_000
) -> Iterator[InfluxServer]:
    root = Path(tempfile.mkdtemp(prefix="lunamon-influxd-"))
    server = InfluxServer(root, auth=auth, max_body_size=max_body_size)
    try:
        server.first_start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def _require(binary: str) -> None:
    if shutil.which(binary) is None:
        pytest.fail(f"{binary} is not installed (see SERVERS.md: apt-get install influxdb ...)")


@pytest.fixture(scope="session")
def influxd() -> Iterator[InfluxServer]:
    """A plain influxd 1.x (no auth), shared by the whole session: use your own database."""
    _require("influxd")
    with _influxd_instance() as server:
        yield server


@pytest.fixture(scope="session")
def influxd_auth() -> Iterator[InfluxServer]:
    """influxd with ``auth-enabled``: an admin (``admin_user``/``admin_password``) and a
    read-only user (``reader_user``/``reader_password``, READ on ``auth_db``)."""
    _require("influxd")
    with _influxd_instance(auth=True) as server:
        yield server


@pytest.fixture(scope="session")
def influxd_small_body() -> Iterator[InfluxServer]:
    """influxd with ``max-body-size = 2000``: bigger write bodies get 413."""
    _require("influxd")
    with _influxd_instance(max_body_size=2000) as server:
        yield server


@pytest.fixture(scope="session")
def influxd_factory() -> Iterator[Callable[..., InfluxServer]]:
    """Start extra private influxd instances (``factory(auth=..., max_body_size=...)``),
    for tests that kill or restart theirs; all are stopped at the end of the session."""
    _require("influxd")
    stack = contextlib.ExitStack()

    def factory(*, auth: bool = False, max_body_size: int = 25_000_000) -> InfluxServer:
        return stack.enter_context(_influxd_instance(auth=auth, max_body_size=max_body_size))

    with stack:
        yield factory


# --------------------------------------------------------------------------- victoria-metrics


class VictoriaMetricsServer:
    """A private single-node victoria-metrics: ``url``, ``host``, ``port``, ``export()``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.host = "127.0.0.1"
        self.port = free_port()
        self._process = _Process(self._argv(), root / "victoria-metrics.log")

    def _argv(self) -> list[str]:
        return [
            "victoria-metrics",
            f"-httpListenAddr=127.0.0.1:{self.port}",
            f"-storageDataPath={self.root / 'data'}",
            "-retentionPeriod=100y",
            "-loggerLevel=ERROR",
            "-search.disableCache",
        ]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"VictoriaMetricsServer(url={self.url!r})"

    def _ready(self) -> bool:
        status, body = _http("GET", f"{self.url}/health", timeout=1.0)
        return status == 200 and body.strip() == b"OK"

    def first_start(self) -> None:
        for attempt in range(_START_ATTEMPTS):
            try:
                self._process.spawn()
                self._process.wait_ready(self._ready)
                return
            except ServerError:
                self._process.stop()
                if attempt == _START_ATTEMPTS - 1:
                    raise
                self.port = free_port()
                self._process.argv = self._argv()

    def stop(self) -> None:
        self._process.stop()

    def force_flush(self) -> None:
        status, body = _http("POST", f"{self.url}/internal/force_flush")
        if status != 200:
            raise ServerError(f"force_flush answered {status}: {body[:300]!r}")

    def export(
        self, match: str = '{__name__=~".+"}', *, expect: int = 0, timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        """Flush, then ``/api/v1/export`` for the series selector ``match``: one dict per series
        (``metric`` labels, ``values``, ``timestamps`` in ms).

        victoria-metrics makes new rows searchable up to a second after it answered
        the write; with ``expect`` this polls until that many series are there.
        """
        deadline = time.monotonic() + timeout
        while True:
            series = self._export_once(match)
            if len(series) >= expect or time.monotonic() > deadline:
                return series
            time.sleep(0.05)

    def _export_once(self, match: str) -> list[dict[str, Any]]:
        self.force_flush()
        body = urllib.parse.urlencode({"match[]": match}).encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        status, raw = _http("POST", f"{self.url}/api/v1/export", data=body, headers=headers)
        if status != 200:
            raise ServerError(f"export {match!r} answered {status}: {raw[:300]!r}")
        return [json.loads(line) for line in raw.splitlines() if line.strip()]


@pytest.fixture(scope="session")
def victoria_metrics() -> Iterator[VictoriaMetricsServer]:
    """A private victoria-metrics, shared by the session: use distinct series or labels."""
    _require("victoria-metrics")
    root = Path(tempfile.mkdtemp(prefix="lunamon-vm-"))
    server = VictoriaMetricsServer(root)
    try:
        server.first_start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TlsFiles:
    """A self-signed certificate for ``127.0.0.1`` / ``localhost`` and its key (PEM files)."""

    cert_file: str
    key_file: str

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


@pytest.fixture(scope="session")
def tls_cert() -> Iterator[TlsFiles]:
    """A self-signed certificate made with the ``openssl`` command, for the session."""
    # `make test` installs Debian's openssl: its absence is a broken setup, not a skip.
    assert shutil.which("openssl"), "the openssl command is not installed (apt-get install openssl)"
    root = Path(tempfile.mkdtemp(prefix="lunamon-tls-"))
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-nodes", "-days", "2",
            "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    try:
        yield TlsFiles(str(cert), str(key))
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- fake server


HANG: Final[str] = "hang"


@dataclass(frozen=True)
class FakeResponse:
    """One programmed answer of :class:`FakeInfluxServer`."""

    status: int = 204
    body: str | bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RecordedRequest:
    """What :class:`FakeInfluxServer` received (``body`` after gzip decoding)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    time: float


class FakeInfluxServer:
    """An aiohttp server on a free loopback port answering from a programmed list.

    Each request takes the next answer: a :class:`FakeResponse` or :data:`HANG`
    (accept the request, never answer). When the list runs out, ``default``
    answers. ``requests`` records what arrived. With ``ssl_context`` it serves
    HTTPS. Use as ``async with``.
    """

    def __init__(
        self,
        responses: list[FakeResponse | str] | None = None,
        *,
        default: FakeResponse | str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.ssl_context = ssl_context
        self.responses: list[FakeResponse | str] = list(responses or [])
        self.default: FakeResponse | str = default if default is not None else FakeResponse()
        self.requests: list[RecordedRequest] = []
        self.host = "127.0.0.1"
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._release: asyncio.Event | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def program(self, *responses: FakeResponse | str) -> None:
        """Replace the remaining answers."""
        self.responses = list(responses)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(
            RecordedRequest(
                method=request.method,
                path=request.path,
                query=dict(request.query),
                headers=dict(request.headers),
                body=body,
                time=time.monotonic(),
            )
        )
        answer = self.responses.pop(0) if self.responses else self.default
        if answer == HANG:
            assert self._release is not None
            await self._release.wait()
            return web.Response(status=503, text="fake server closing")
        assert isinstance(answer, FakeResponse)
        data = answer.body.encode() if isinstance(answer.body, str) else answer.body
        return web.Response(status=answer.status, body=data or None, headers=answer.headers)

    async def start(self) -> FakeInfluxServer:
        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0, ssl_context=self.ssl_context)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def close(self) -> None:
        if self._release is not None:
            self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeInfluxServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


@pytest.fixture
async def fake_influx() -> AsyncIterator[FakeInfluxServer]:
    """A started :class:`FakeInfluxServer` answering 204 until programmed otherwise."""
    async with FakeInfluxServer() as server:
        yield server
