"""The InfluxDB 2.x/3.x write API sink (``POST /api/v2/write``), also VictoriaMetrics'.

Same transport and error classification as the 1.x sink (see
:mod:`lunamon.sinks.influxdb` for why it is aiohttp directly); the token goes
in an ``Authorization: Token ...`` header.
"""

from __future__ import annotations

from typing import Final

from yarl import URL

from lunamon._secrets import Secret
from lunamon.point import Point
from lunamon.sinks._http import (
    DEFAULT_COMPRESSION_LEVEL,
    HTTPSink,
    check_compression_level,
    refuse_plain_credentials,
)

__all__ = ["InfluxDBV2Sink"]

# Nanoseconds per unit of each precision the v2 API accepts.
_PRECISION_NS: Final = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000}


class InfluxDBV2Sink(HTTPSink):
    """Writes batches to ``{url}/api/v2/write?org=..&bucket=..&precision=..``.

    Points carry nanoseconds; another ``precision`` truncates the timestamps
    (two points of one series in the same unit then overwrite each other).
    An empty ``token`` sends no ``Authorization`` header (VictoriaMetrics
    without auth).

    :param url: the server's base URL, ``http://`` or ``https://``
    :param org: the organisation (may be empty for VictoriaMetrics)
    :param bucket: the bucket (InfluxDB 3.x: the database) written to
    :param token: the API token (a secret: never shown); empty sends none
    :param precision: timestamp unit on the wire: ``ns``, ``us``, ``ms`` or ``s``
    :param gzip: send bodies gzip-compressed
    :param compression_level: gzip level, 1 (fastest, the default) to 9 (smallest bodies)
    :param timeout: seconds for one HTTP request, connect to answer
    :param verify_ssl: verify the server's certificate and host name
    :param ca_file: a PEM file of CAs trusted besides the system's
    :param name: the sink's name in ``stats()`` and logs
    :param allow_plain_credentials: allow a token over plain HTTP to another host
    """

    def __init__(
        self,
        url: str,
        org: str,
        bucket: str,
        token: str,
        *,
        precision: str = "ns",
        gzip: bool = False,
        compression_level: int = DEFAULT_COMPRESSION_LEVEL,
        timeout: float = 10.0,
        verify_ssl: bool = True,
        ca_file: str | None = None,
        name: str | None = None,
        allow_plain_credentials: bool = False,
    ) -> None:
        base = URL(url)
        if base.scheme not in ("http", "https") or not base.host:
            raise ValueError(f"url must be http:// or https:// with a host, not {url!r}")
        if base.user or base.password:
            raise ValueError("credentials do not belong in the url: pass token=")
        if precision not in _PRECISION_NS:
            raise ValueError(f"precision must be one of {sorted(_PRECISION_NS)}, not {precision!r}")
        if not bucket:
            raise ValueError("bucket must not be empty")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, not {timeout!r}")
        self.name = name or "influxdb_v2"
        self.url = str(base.with_query(None).with_fragment(None)).rstrip("/")
        self.org = org
        self.bucket = bucket
        self.precision = precision
        self.gzip = gzip
        self.compression_level = check_compression_level(compression_level)
        self.timeout = float(timeout)
        self.verify_ssl = verify_ssl
        self.ca_file = ca_file
        self._token = Secret(token)
        authorization = Secret(f"Token {token}") if token else None
        tls = base.scheme == "https"
        plain = refuse_plain_credentials(bool(token), tls, base.host, allow_plain_credentials)
        params = {"bucket": bucket, "precision": precision}
        if org:
            params["org"] = org
        path = base.path.rstrip("/") + "/api/v2/write"
        self._configure(
            write_url=base.with_path(path).with_query(params),
            what=f"influxdb v2 write to {self.url} org={org} bucket={bucket}",
            timeout=self.timeout,
            tls=tls,
            verify_ssl=verify_ssl,
            ca_file=ca_file,
            authorization=authorization,
            secrets=(self._token, authorization),
            plain_credentials=plain,
        )
        self._unit = _PRECISION_NS[precision]

    def __repr__(self) -> str:
        token = "'***'" if self._token else "''"
        return (
            f"InfluxDBV2Sink(name={self.name!r}, url={self.url!r}, org={self.org!r},"
            f" bucket={self.bucket!r}, token={token})"
        )

    __str__ = __repr__

    async def encode(self, batch: list[Point]) -> bytes:
        """Line protocol, with the timestamps in ``precision`` units."""
        if self._unit != 1:
            batch = [_rescaled(p, self._unit) for p in batch]
        return await super().encode(batch)


def _rescaled(point: Point, unit: int) -> Point:
    """``point`` with its timestamp in ``unit`` ns instead of ns (for the encoder only)."""
    series, time_ns, tags, fields = point
    return Point.trusted(series, time_ns // unit, tags, fields)
