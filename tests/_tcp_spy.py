"""A plain TCP listener that records every byte clients send and relays it to a backend:
the spy of the TLS tests (RELIABILITY.md 27, 31). In front of a TLS-only server it sees
what a sink sends on the wire, ClientHello or clear text, which the server itself cannot."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

# The first byte of a TLS record carrying a handshake message (the ClientHello).
TLS_HANDSHAKE = 0x16
# What a plain HTTP request carries and a TLS record never shows in clear.
HTTP_MARKERS = (b"HTTP/1.", b"POST ", b"GET ", b"Authorization")


class TcpSpy:
    """A plain TCP listener in front of ``backend_port``: records what clients send on each
    connection (``connections``), relays it both ways, understands nothing of it."""

    def __init__(self, backend_port: int) -> None:
        self.backend_port = backend_port
        self.connections: list[bytearray] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._relays: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> TcpSpy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._relays, return_exceptions=True)
        for writer in self._writers:
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received = bytearray()
        self.connections.append(received)
        self._writers.append(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.backend_port)
        except OSError:
            writer.close()
            return
        self._writers.append(up_writer)
        relays = [
            asyncio.create_task(self._pipe(reader, up_writer, received)),
            asyncio.create_task(self._pipe(up_reader, writer, None)),
        ]
        self._relays += relays
        await asyncio.gather(*relays, return_exceptions=True)

    @staticmethod
    async def _pipe(
        source: asyncio.StreamReader, target: asyncio.StreamWriter, record: bytearray | None
    ) -> None:
        try:
            while data := await source.read(65536):
                if record is not None:
                    record += data
                target.write(data)
                await target.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            target.close()


def assert_tls_only(spy: TcpSpy, secrets: Iterable[str | bytes] = ()) -> None:
    """Every connection to ``spy`` began with a TLS handshake, and nothing in clear text
    (an HTTP request line or header, any of ``secrets``) went through it. At least one
    connection was made: a sink that never reached the spy proves nothing."""
    markers = [*HTTP_MARKERS, *(s.encode() if isinstance(s, str) else s for s in secrets)]
    assert spy.connections, "nothing reached the listener: the test proves nothing"
    for received in spy.connections:
        assert received, "a connection without a ClientHello"
        assert received[0] == TLS_HANDSHAKE, bytes(received[:80])
        for marker in markers:
            assert marker not in received, marker
