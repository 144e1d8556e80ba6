"""The private servers of ``servers.py`` as pytest fixtures, all in one shape.

Each fixture checks that its binary is on PATH (a missing one fails the test with
what to install, never skips it), enters the launcher's ``with`` (free loopback
ports, temporary data directory, readiness polled against a deadline), yields
the server and leaves the ``with`` (stopped, reaped, directory removed). The
session fixtures are shared: a test uses its own database or series.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

import pytest
from servers import (
    ClickHouseServer,
    FakeInfluxServer,
    InfluxServer,
    ServerProcess,
    TlsFiles,
    VictoriaMetricsServer,
    VmAgentServer,
    missing_binary,
    self_signed_certificate,
)

_S = TypeVar("_S", bound=ServerProcess)


def require(binary: str) -> None:
    """Fail (never skip) the test when ``binary`` is not on PATH."""
    why = missing_binary(binary)
    if why is not None:
        pytest.fail(why, pytrace=False)


def _running(server: _S) -> Iterator[_S]:
    """The one fixture shape: require the binary, start, hand over, close."""
    why = missing_binary(server.binary)
    if why is not None:
        server.close()  # its temporary directory
        pytest.fail(why, pytrace=False)
    with server:
        yield server


@pytest.fixture(scope="session")
def influxd() -> Iterator[InfluxServer]:
    """A plain influxd 1.x (no auth), shared by the whole session: use your own database."""
    yield from _running(InfluxServer())


@pytest.fixture(scope="session")
def influxd_auth() -> Iterator[InfluxServer]:
    """influxd with ``auth-enabled``: an admin (``admin_user``/``admin_password``) and a
    read-only user (``reader_user``/``reader_password``, READ on ``auth_db``)."""
    yield from _running(InfluxServer(auth=True))


@pytest.fixture(scope="session")
def influxd_small_body() -> Iterator[InfluxServer]:
    """influxd with ``max-body-size = 2000``: bigger write bodies get 413."""
    yield from _running(InfluxServer(max_body_size=2000))


@pytest.fixture(scope="session")
def influxd_factory() -> Iterator[Callable[..., InfluxServer]]:
    """Start extra private influxd instances (``factory(auth=..., max_body_size=...)``),
    for tests that kill or restart theirs; all are closed at the end of the session."""
    require(InfluxServer.binary)
    with contextlib.ExitStack() as stack:

        def factory(*, auth: bool = False, max_body_size: int = 25_000_000) -> InfluxServer:
            return stack.enter_context(InfluxServer(auth=auth, max_body_size=max_body_size))

        yield factory


@pytest.fixture(scope="session")
def victoria_metrics() -> Iterator[VictoriaMetricsServer]:
    """A private victoria-metrics, shared by the session: use distinct series or labels."""
    yield from _running(VictoriaMetricsServer())


@pytest.fixture
def vmagent(victoria_metrics: VictoriaMetricsServer) -> Iterator[VmAgentServer]:
    """A private vmagent relaying to the session's victoria-metrics (its own queue)."""
    yield from _running(VmAgentServer(victoria_metrics))


@pytest.fixture(scope="session")
def tls_cert() -> Iterator[TlsFiles]:
    """A self-signed certificate for 127.0.0.1 made with ``openssl``, for the session."""
    require("openssl")
    with self_signed_certificate() as files:
        yield files


@pytest.fixture
async def fake_influx() -> AsyncIterator[FakeInfluxServer]:
    """A started :class:`FakeInfluxServer` answering 204 until programmed otherwise."""
    async with FakeInfluxServer() as server:
        yield server


@pytest.fixture(scope="session")
def clickhouse() -> Iterator[ClickHouseServer]:
    """A private clickhouse-server (no password), shared by the session: use your own database."""
    yield from _running(ClickHouseServer())


@pytest.fixture(scope="session")
def clickhouse_auth() -> Iterator[ClickHouseServer]:
    """clickhouse-server whose ``default`` user needs ``password``."""
    yield from _running(ClickHouseServer(auth=True))


@pytest.fixture(scope="session")
def clickhouse_factory() -> Iterator[Callable[..., ClickHouseServer]]:
    """Start extra private clickhouse-servers (``factory(auth=...)``), for tests that kill or
    restart theirs; all are closed at the end of the session."""
    require(ClickHouseServer.binary)
    with contextlib.ExitStack() as stack:

        def factory(*, auth: bool = False) -> ClickHouseServer:
            return stack.enter_context(ClickHouseServer(auth=auth))

        yield factory


@pytest.fixture(params=["orjson", "templates"])
def row_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """ClickHouse rows written through orjson (the test extra installs it: a missing
    orjson fails, never skips), or from the standard library's templates, as without it."""
    import orjson

    from lunamon.sinks import clickhouse

    monkeypatch.setattr(clickhouse, "_orjson", orjson if request.param == "orjson" else None)
    return str(request.param)
