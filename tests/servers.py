"""Private servers for the tests and the benchmarks: one launcher, one shape.

Every server here is used the same way::

    with InfluxServer() as server:    # start(): free 127.0.0.1 ports, a temporary data
        ...server.url...              #   directory, polled until it answers (with a deadline)
                                      # close(): SIGTERM, SIGKILL after a timeout, reaped,
                                      #   the temporary directory removed

``start()`` / ``stop()`` / ``close()`` can also be called by hand; ``stop()`` or
``kill()`` (a crash), then ``start()``, brings the same server back on the same
port and data; ``pause()`` / ``resume()`` (SIGSTOP / SIGCONT) freeze it with its
sockets open, as a hung server. Readiness is always polled against a deadline, never waited for
with a fixed sleep; a server that exits or does not answer in time fails with
the end of its log.

- :class:`InfluxServer`: ``influxd`` 1.x, optionally with auth or a small body limit.
- :class:`VictoriaMetricsServer`: single-node ``victoria-metrics``.
- :class:`ServerProcess`: what both are made of; a new kind of server subclasses it.
- :class:`FakeInfluxServer`: an aiohttp server in the test's own event loop answering
  from a programmed list, for faults a real server cannot be made to produce (429 with
  ``Retry-After``, a socket that never answers). Same shape, asynchronous:
  ``async with``, or ``await start()`` / ``await stop()``.
- :func:`self_signed_certificate`: a certificate for 127.0.0.1 made by ``openssl``.

The binaries come from PATH (Debian packages that ``make servers`` installs);
:func:`missing_binary` says what to install. The pytest fixtures built on this
module are in ``conftest.py``. The benchmarks use it too (``benchmarks/_common.py``),
which is why it does not import pytest.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
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
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Final, Literal, TypeVar

from aiohttp import web

__all__ = [
    "HANG",
    "FakeInfluxServer",
    "FakeResponse",
    "InfluxServer",
    "MissingBinaryError",
    "RecordedRequest",
    "ServerError",
    "ServerProcess",
    "TlsFiles",
    "VictoriaMetricsServer",
    "free_port",
    "missing_binary",
    "self_signed_certificate",
]

STARTUP_TIMEOUT: Final = 30.0
STOP_TIMEOUT: Final = 10.0
POLL_INTERVAL: Final = 0.02
_START_ATTEMPTS: Final = 3

ADMIN_USER: Final = "admin"
ADMIN_PASSWORD: Final = "adm1n-s3cret-pw"
READER_USER: Final = "reader"
READER_PASSWORD: Final = "r3ader-s3cret-pw"
AUTH_DB: Final = "lunamon_auth"

# The Debian package of each binary the tests and benchmarks run (`make servers`).
_PACKAGES: Final = {
    "influxd": "influxdb",
    "victoria-metrics": "victoria-metrics",
    "vmagent": "victoria-metrics",
    "openssl": "openssl",
    "wrk": "wrk",
}


_S = TypeVar("_S", bound="ServerProcess")


class ServerError(RuntimeError):
    """A server did not start, or answered a helper request with an error."""


class MissingBinaryError(ServerError):
    """The server's binary is not on PATH."""


def missing_binary(binary: str) -> str | None:
    """Why ``binary`` cannot run (it is not on PATH, and what installs it), or None.

    The fixtures and tests turn this into a failure, never into a skip.
    """
    if shutil.which(binary) is not None:
        return None
    package = _PACKAGES.get(binary, binary)
    return f"{binary} is not installed: `make servers` installs it (or: apt-get install {package})"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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


# --------------------------------------------------------------------------- the launcher


class ServerProcess:
    """One server binary on 127.0.0.1, with its ports, data directory, log and process.

    A subclass names its ``binary`` and says how to run it (``_argv``), what to
    prepare before each start (``_prepare``: a configuration file), when it is
    ready (``_ready``, polled) and what to do once after the first start
    (``_after_first_start``: create users). ``root`` is the data directory; without
    one, a temporary directory is made, and removed by ``close()`` (or at exit).
    """

    binary: ClassVar[str]

    def __init__(self, root: Path | None = None) -> None:
        if root is None:
            root = Path(tempfile.mkdtemp(prefix=f"lunamon-{self.binary}-"))
            self._remove_root: weakref.finalize[Any, Any] | None = weakref.finalize(
                self, shutil.rmtree, root, ignore_errors=True
            )
        else:
            self._remove_root = None
        self.root = root
        self.host = "127.0.0.1"
        self.port = 0
        self.log_path = root / f"{self.binary}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._started_once = False
        self._choose_ports()

    # ----- what a subclass says

    def _choose_ports(self) -> None:
        """Pick free ports (again, when another process took them meanwhile)."""
        self.port = free_port()

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Before every start, e.g. write the configuration file."""

    def _ready(self) -> bool:
        raise NotImplementedError

    def _after_first_start(self) -> None:
        """Once, after the first successful start."""

    # ----- the shape every server shares

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.url!r})"

    def start(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Start the server and return once it answers; nothing if it already runs.

        The first start tries fresh ports when another process took them
        meanwhile; a start after ``stop()`` or ``kill()`` comes back on the same
        ports and data. Raises :class:`MissingBinaryError` when the binary is not
        on PATH, :class:`ServerError` when it exits or does not answer in time.
        """
        if self.running:
            return
        why = missing_binary(self.binary)
        if why is not None:
            raise MissingBinaryError(why)
        if self._started_once:
            self._launch(timeout)
            return
        for attempt in range(_START_ATTEMPTS):
            try:
                self._launch(timeout)
                break
            except ServerError:
                if attempt == _START_ATTEMPTS - 1:
                    raise
                self._choose_ports()
        self._started_once = True
        self._after_first_start()

    def _launch(self, timeout: float) -> None:
        self._prepare()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                self.proc = None
                raise ServerError(
                    f"{self.binary} exited with {code} while starting:\n{self.log_tail()}"
                )
            if self._answers():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(
                    f"{self.binary} did not answer within {timeout} s:\n{self.log_tail()}"
                )
            time.sleep(POLL_INTERVAL)

    def _answers(self) -> bool:
        try:
            return self._ready()
        except (OSError, http.client.HTTPException):
            return False

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL when still running after ``timeout`` seconds; reaped.

        The data directory stays: ``start()`` brings the same server back.
        """
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash would; reaped. ``start()`` brings it back on the same port."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing until :meth:`resume`."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause` (harmless when the server is not paused)."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGCONT)

    def restart(self, *, hard: bool = True) -> None:
        """Kill (``hard``) or stop the server, then start it again on the same port and data."""
        if hard:
            self.kill()
        else:
            self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove the temporary directory made for it (not a given root)."""
        self.stop()
        if self._remove_root is not None:
            self._remove_root()

    def __enter__(self: _S) -> _S:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- influxd


_INFLUXD_CONFIG: Final = """\
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


class InfluxServer(ServerProcess):
    """A private influxd 1.x: ``url``, ``host``, ``port``, query and write helpers.

    With ``auth`` the first start creates an admin (``admin_user`` /
    ``admin_password``, used by the helpers) and a read-only user
    (``reader_user`` / ``reader_password``, READ on ``auth_db``). Write bodies
    beyond ``max_body_size`` bytes get 413.

    The helpers block (urllib): call them from async tests only while nothing
    in the test's own event loop has to answer meanwhile (the fake server does).
    """

    binary = "influxd"

    def __init__(
        self, root: Path | None = None, *, auth: bool = False, max_body_size: int = 25_000_000
    ) -> None:
        self.rpc_port = 0  # backup/restore; must be free too
        super().__init__(root)
        self.auth = auth
        self.max_body_size = max_body_size
        self.admin_user = ADMIN_USER if auth else None
        self.admin_password = ADMIN_PASSWORD if auth else None
        self.reader_user = READER_USER if auth else None
        self.reader_password = READER_PASSWORD if auth else None
        self.auth_db = AUTH_DB if auth else None
        self.config_path = self.root / "influxd.conf"

    def __repr__(self) -> str:
        return f"InfluxServer(url={self.url!r}, auth={self.auth})"

    def _choose_ports(self) -> None:
        self.port, self.rpc_port = free_port(), free_port()

    def _argv(self) -> list[str]:
        return [self.binary, "-config", str(self.config_path)]

    def _prepare(self) -> None:
        self._write_config()

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

    def _ready(self) -> bool:
        return self._ping()

    def _ping(self) -> bool:
        status, _ = _http("GET", f"{self.url}/ping", timeout=1.0)
        return status == 204

    def _after_first_start(self) -> None:
        if self.auth:
            self._create_users()

    def first_start(self) -> None:
        """The same as :meth:`start` (which now retries fresh ports itself)."""
        self.start()

    def _create_users(self) -> None:
        # With auth on and no user yet, influxd accepts exactly this statement unauthenticated.
        self.query(
            f"CREATE USER {ADMIN_USER} WITH PASSWORD '{ADMIN_PASSWORD}' WITH ALL PRIVILEGES",
            auth=None,
        )
        self.query(f'CREATE DATABASE "{AUTH_DB}"')
        self.query(f"CREATE USER {READER_USER} WITH PASSWORD '{READER_PASSWORD}'")
        self.query(f'GRANT READ ON "{AUTH_DB}" TO {READER_USER}')

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
        timeout: float = 30.0,
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
        status, raw = _http(
            "POST", f"{self.url}/query", data=body, headers=headers, timeout=timeout
        )
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

    def count(self, db: str, measurement: str = "request", field: str = "execution_time") -> int:
        """How many points of ``measurement`` (with ``field``) the database holds."""
        rows = self.rows(f'SELECT count("{field}") FROM "{measurement}"', db)
        return int(rows[0]["count"]) if rows else 0

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
        result = self.query("SHOW DATABASES")
        return [
            values[0]
            for statement in result.get("results", [])
            for series in statement.get("series", [])
            for values in series.get("values", [])
        ]


# --------------------------------------------------------------------------- victoria-metrics


class VictoriaMetricsServer(ServerProcess):
    """A private single-node victoria-metrics: ``url``, ``host``, ``port``, ``export()``."""

    binary = "victoria-metrics"

    def _argv(self) -> list[str]:
        return [
            self.binary,
            f"-httpListenAddr=127.0.0.1:{self.port}",
            f"-storageDataPath={self.root / 'data'}",
            "-retentionPeriod=100y",
            "-loggerLevel=ERROR",
            "-search.disableCache",
        ]

    def _ready(self) -> bool:
        status, body = _http("GET", f"{self.url}/health", timeout=1.0)
        return status == 200 and body.strip() == b"OK"

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


class VmAgentServer(ServerProcess):
    """A private vmagent relaying to ``target`` (a victoria-metrics): ``stop()`` and
    ``start()`` bring it back on the same port and on-disk queue."""

    binary = "vmagent"

    def __init__(self, target: VictoriaMetricsServer, root: Path | None = None) -> None:
        self.target = target
        super().__init__(root)

    def _argv(self) -> list[str]:
        return [
            self.binary,
            f"-httpListenAddr=127.0.0.1:{self.port}",
            f"-remoteWrite.url={self.target.url}/api/v1/write",
            f"-remoteWrite.tmpDataPath={self.root / 'queue'}",
            "-remoteWrite.flushInterval=200ms",
            "-loggerLevel=ERROR",
        ]

    def _ready(self) -> bool:
        status, _ = _http("GET", f"{self.url}/health", timeout=1.0)
        return status == 200


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


@contextlib.contextmanager
def self_signed_certificate() -> Iterator[TlsFiles]:
    """``with self_signed_certificate() as tls:`` a fresh certificate made with ``openssl``,
    in a temporary directory removed afterwards."""
    why = missing_binary("openssl")
    if why is not None:
        raise MissingBinaryError(why)
    with tempfile.TemporaryDirectory(prefix="lunamon-tls-") as tmp:
        cert, key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
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
        yield TlsFiles(str(cert), str(key))


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
    HTTPS. Use as ``async with``, or ``await start()`` / ``await stop()``.
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

    async def stop(self) -> None:
        if self._release is not None:
            self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeInfluxServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class PrometheusServer(ServerProcess):
    """A private Prometheus scraping ``targets`` (``host:port``) every second, exemplars on.

    ``query(promql)`` and ``exemplars(promql)`` read its HTTP API.
    """

    binary = "prometheus"

    def __init__(self, targets: list[str], root: Path | None = None) -> None:
        self.targets = targets
        super().__init__(root)

    def _prepare(self) -> None:
        listed = ", ".join(f'"{target}"' for target in self.targets)
        (self.root / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: service\n"
            f"    static_configs: [{{targets: [{listed}]}}]\n"
        )

    def _argv(self) -> list[str]:
        return [
            self.binary,
            f"--config.file={self.root / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.root / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--enable-feature=exemplar-storage",
            "--log.level=warn",
        ]

    def _ready(self) -> bool:
        status, _ = _http("GET", f"{self.url}/-/ready", timeout=1.0)
        return status == 200

    def api(self, path: str, **params: str) -> Any:
        """``GET /api/v1/<path>``; the ``data`` of a successful answer."""
        query = urllib.parse.urlencode(params)
        status, body = _http("GET", f"{self.url}/api/v1/{path}?{query}", timeout=10.0)
        if status != 200:
            raise ServerError(f"{path} answered {status}: {body[:300]!r}")
        return json.loads(body)["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant vector of ``promql``: ``[{"metric": {...}, "value": [t, "v"]}]``."""
        result: list[dict[str, Any]] = self.api("query", query=promql)["result"]
        return result

    def value(self, promql: str) -> float | None:
        """The single value of ``promql``, ``None`` when the vector is empty."""
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def exemplars(self, promql: str, since: float) -> list[dict[str, Any]]:
        """The exemplars stored for ``promql`` since the unix time ``since``."""
        data: list[dict[str, Any]] = self.api(
            "query_exemplars", query=promql, start=str(since), end=str(time.time() + 60)
        )
        return data


# --------------------------------------------------------------------------- clickhouse-server


_CLICKHOUSE_CONFIG: Final = """\
<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><log>{root}/log/server.log</log>
          <errorlog>{root}/log/err.log</errorlog><console>0</console></logger>
  <http_port>{port}</http_port>
  <tcp_port>{tcp_port}</tcp_port>
  <listen_host>127.0.0.1</listen_host>
  <listen_host>127.0.0.2</listen_host>
  <path>{root}/data/</path>
  <tmp_path>{root}/tmp/</tmp_path>
  <users_config>users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <mark_cache_size>5368709</mark_cache_size>
  <remote_servers><one_shard><shard><replica>
    <host>127.0.0.2</host><port>{tcp_port}</port>
  </replica></shard></one_shard></remote_servers>
</yandex>
"""

_CLICKHOUSE_USERS: Final = """\
<?xml version="1.0"?>
<yandex>
  <profiles><default>
      <distributed_directory_monitor_sleep_time_ms>2000</distributed_directory_monitor_sleep_time_ms>
      <poll_interval>1</poll_interval>
    </default><readonly><readonly>1</readonly></readonly></profiles>
  <users>
    <default><password>{password}</password>
      <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
      <profile>default</profile><quota>default</quota></default>
    <reader><password>{reader_password}</password>
      <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
      <profile>readonly</profile><quota>default</quota></reader>
  </users>
  <quotas><default></default></quotas>
</yandex>
"""

CLICKHOUSE_PASSWORD: Final = "cl1ckh0use-s3cret-pw"


class ClickHouseServer(ServerProcess):
    """A private clickhouse-server (SERVERS.md's recipe): ``url``, ``query()``, ``rows()``.

    Its configuration names a cluster ``one_shard`` (itself, one shard, one replica),
    for ``Distributed`` tables. It names the server as 127.0.0.2 (where it listens too),
    which it does not take for itself: inserts go through the network as to another
    server and, unless synchronous, reach it up to 2 s later
    (``distributed_directory_monitor_sleep_time_ms``): late enough to be seen.
    ``poll_interval`` 1 s: the connections it keeps to itself for them would hold its
    shutdown for 10 s otherwise.

    With ``auth`` the ``default`` user needs ``password`` (the helpers send it);
    without, its password is empty. Either way a read-only user ``reader``
    (``reader_password``) exists. The helpers block (urllib), like InfluxServer's.
    """

    binary = "clickhouse-server"

    def __init__(self, root: Path | None = None, *, auth: bool = False) -> None:
        self.tcp_port = 0
        super().__init__(root)
        self.auth = auth
        self.user = "default"
        self.password = CLICKHOUSE_PASSWORD if auth else ""
        self.reader_user = READER_USER
        self.reader_password = READER_PASSWORD
        self.config_path = self.root / "config.xml"

    def __repr__(self) -> str:
        return f"ClickHouseServer(url={self.url!r}, auth={self.auth})"

    def _choose_ports(self) -> None:
        self.port, self.tcp_port = free_port(), free_port()

    def _argv(self) -> list[str]:
        return [self.binary, f"--config-file={self.config_path}"]

    def _prepare(self) -> None:
        for sub in ("log", "data", "tmp"):
            (self.root / sub).mkdir(exist_ok=True)
        self.config_path.write_text(
            _CLICKHOUSE_CONFIG.format(root=self.root, port=self.port, tcp_port=self.tcp_port)
        )
        (self.root / "users.xml").write_text(
            _CLICKHOUSE_USERS.format(password=self.password, reader_password=self.reader_password)
        )

    def _ready(self) -> bool:
        status, body = _http("GET", f"{self.url}/ping", timeout=1.0)
        return status == 200 and body.strip() == b"Ok."

    def log_tail(self, lines: int = 30) -> str:
        parts = [super().log_tail(lines)]
        for name in ("server.log", "err.log"):
            try:
                text = (self.root / "log" / name).read_text(errors="replace")
            except OSError:
                continue
            parts.append("\n".join(text.splitlines()[-lines:]))
        return "\n".join(part for part in parts if part)

    def _auth_headers(self, auth: tuple[str, str] | None) -> dict[str, str]:
        if auth is None:
            auth = (self.user, self.password)
        return {"X-ClickHouse-User": auth[0], "X-ClickHouse-Key": auth[1]}

    def request(
        self,
        sql: str,
        data: bytes | None = None,
        *,
        auth: tuple[str, str] | None = None,
        params: dict[str, str] | None = None,
        timeout: float = 30.0,
    ) -> tuple[int, bytes, str]:
        """Run ``sql`` (with ``data`` as the body of an INSERT; ``params``: settings in the
        URL): (status, body, exception code header) whatever the status. The default user's
        credentials unless ``auth``."""
        query = dict(params or {})
        if data is None:
            body = sql.encode()
        else:
            query["query"], body = sql, data
        url = f"{self.url}/?{urllib.parse.urlencode(query)}"
        request = urllib.request.Request(
            url, data=body, method="POST", headers=self._auth_headers(auth)
        )
        try:
            with _OPENER.open(request, timeout=timeout) as response:
                code = response.headers.get("X-ClickHouse-Exception-Code", "")
                return int(response.status), bytes(response.read()), code
        except urllib.error.HTTPError as err:
            with err:
                code = err.headers.get("X-ClickHouse-Exception-Code", "")
                return int(err.code), bytes(err.read()), code

    def query(self, sql: str, data: bytes | None = None) -> str:
        """Run ``sql`` as the default user; the answer as text. :class:`ServerError` unless 200."""
        status, body, _ = self.request(sql, data)
        if status != 200:
            raise ServerError(f"{sql[:200]!r} answered {status}: {body[:500]!r}")
        return body.decode()

    def rows(self, sql: str) -> list[dict[str, Any]]:
        """The rows of a SELECT, read as ``FORMAT JSONEachRow``."""
        text = self.query(f"{sql} FORMAT JSONEachRow")
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def data(self, database: str, table: str) -> list[tuple[int, dict[str, Any]]]:
        """Every row of ``database.table`` as (time in ns, the parsed ``data`` object),
        in time order; duplicates kept."""
        rows = self.rows(f"SELECT time, data FROM `{database}`.`{table}` ORDER BY time")
        return [(int(row["time"]), json.loads(row["data"])) for row in rows]

    def count(self, database: str, table: str) -> int:
        return int(self.query(f"SELECT count() FROM `{database}`.`{table}`").strip())

    def drop_database(self, database: str) -> None:
        self.query(f"DROP DATABASE IF EXISTS `{database}`")
