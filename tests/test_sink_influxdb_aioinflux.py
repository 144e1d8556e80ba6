"""InfluxDBSink with a user's aioinflux client as its transport, against real influxd:
lunamon's encoder decides what is stored, aioinflux only carries the bytes."""

from __future__ import annotations

import uuid
from typing import Any

import aioinflux
import pytest
from servers import InfluxServer
from test_sink_influxdb import escaping_matrix, typed

from lunamon import InfluxDBSink, Point, SinkError


async def test_aioinflux_client_carries_lunamon_encoded_points(influxd: InfluxServer) -> None:
    db = f"t_{uuid.uuid4().hex[:12]}"
    client: Any = aioinflux.InfluxDBClient(host=influxd.host, port=influxd.port, db=db)
    sink = InfluxDBSink(influxd.host, influxd.port, db, client=client)
    try:
        await sink.start()  # creates the database through the client
        points = escaping_matrix()
        await sink.write(points)
        # aioinflux's own encoder would double backslashes and strip newlines:
        # what is stored is exactly what lunamon's encoder wrote.
        assert typed(influxd.stored(db)) == typed(points)
    finally:
        await sink.close()
        await client.close()


async def test_aioinflux_errors_are_classified(influxd: InfluxServer) -> None:
    db = f"t_{uuid.uuid4().hex[:12]}"
    client: Any = aioinflux.InfluxDBClient(host=influxd.host, port=influxd.port, db=db)
    sink = InfluxDBSink(influxd.host, influxd.port, db, client=client, create_database=False)
    try:
        point = Point("request", 1, {"service": "s"}, {"execution_time": 0.1})
        with pytest.raises(SinkError) as caught:
            await sink.write([point])
        assert caught.value.status == 404
        assert not caught.value.retryable
        assert "database not found" in str(caught.value)
    finally:
        await sink.close()
        await client.close()


def test_gzip_needs_lunamon_transport() -> None:
    class Client:
        async def write(self, data: bytes, **options: Any) -> None: ...

    with pytest.raises(ValueError, match="gzip"):
        InfluxDBSink(client=Client(), gzip=True)
    with pytest.raises(TypeError, match="aioinflux"):
        InfluxDBSink(client=object())
