"""The InfluxDB 2.x/3.x write API sink (``POST /api/v2/write``), also VictoriaMetrics'.

Same transport and error classification as the 1.x sink (see
:mod:`lunamon.sinks.influxdb` for why it is aiohttp directly); the token goes
in an ``Authorization: Token ...`` header.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from yarl import URL

from lunamon.point import Point, encode_lines_async
from lunamon.sinks._http import (
    Secret,
    SinkSession,
    compress,
    post_lines,
    refuse_plain_credentials,
)

__all__ = ["InfluxDBV2Sink"]

# Nanoseconds per unit of each precision the v2 API accepts.
_PRECISION_NS: Final = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000}


class InfluxDBV2Sink:
    """Writes batches to ``{url}/api/v2/write?org=..&bucket=..&precision=..``.

    Points carry nanoseconds; another ``precision`` truncates the timestamps
    (two points of one series in the same unit then overwrite each other).
    An empty ``token`` sends no ``Authorization`` header (VictoriaMetrics
    without auth).
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
        self.timeout = float(timeout)
        self.verify_ssl = verify_ssl
        self.ca_file = ca_file
        self._token = Secret(token)
        self._authorization = Secret(f"Token {token}") if token else None
        tls = base.scheme == "https"
        plain = refuse_plain_credentials(bool(token), tls, base.host, allow_plain_credentials)
        params = {"bucket": bucket, "precision": precision}
        if org:
            params["org"] = org
        path = base.path.rstrip("/") + "/api/v2/write"
        self._write_url = base.with_path(path).with_query(params)
        self._what = f"influxdb v2 write to {self.url} org={org} bucket={bucket}"
        self._http = SinkSession(
            what=self._what,
            name=self.name,
            url=self.url,
            timeout=self.timeout,
            tls=tls,
            verify_ssl=verify_ssl,
            ca_file=ca_file,
            plain_credentials=plain,
        )

    def __repr__(self) -> str:
        token = "'***'" if self._token else "''"
        return (
            f"InfluxDBV2Sink(name={self.name!r}, url={self.url!r}, org={self.org!r},"
            f" bucket={self.bucket!r}, token={token})"
        )

    __str__ = __repr__

    async def start(self) -> None:
        """Open the HTTP session (no request is made: a down server is found at the write)."""
        self._http.start()

    async def write(self, points: Sequence[Point]) -> None:
        """Write one batch; raise a classified :class:`SinkError` when it is not stored."""
        if not points:
            return
        session = self._http.open()
        batch = points if isinstance(points, (list, tuple)) else list(points)
        unit = _PRECISION_NS[self.precision]
        if unit != 1:
            batch = [_rescaled(p, unit) for p in batch]
        body = await encode_lines_async(batch)
        if self.gzip:
            body = await compress(body)
        await post_lines(
            session,
            self._write_url,
            body,
            authorization=self._authorization,
            gzipped=self.gzip,
            what=self._what,
            secrets=(self._token, self._authorization),
        )

    async def close(self) -> None:
        """Close the HTTP session; later writes raise a non-retryable :class:`SinkError`."""
        await self._http.close()


def _rescaled(point: Point, unit: int) -> Point:
    """``point`` with its timestamp in ``unit`` ns instead of ns (for the encoder only)."""
    series, time_ns, tags, fields = point
    return Point.trusted(series, time_ns // unit, tags, fields)
