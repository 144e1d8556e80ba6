"""The demo service with ``spool_dir`` set and one InfluxDB sink (tests/test_spool.py).

Configured by the environment: ``SPOOL_DIR``, ``SPOOL_PORT`` (its own), ``SPOOL_INFLUX_PORT``
(a closed port for a sink that is down), ``SPOOL_DB``. Serves until SIGTERM or SIGINT,
then prints ``{"stats": ..., "spool": ...}`` as JSON on its last line.
"""

from __future__ import annotations

import json
import os

from aiohttp import web

from lunamon import MONITORING_KEY
from lunamon.demo.service import create_app
from lunamon.sinks.influxdb import InfluxDBSink

app = create_app(
    sinks=[InfluxDBSink("127.0.0.1", int(os.environ["SPOOL_INFLUX_PORT"]), os.environ["SPOOL_DB"])],
    spool_dir=os.environ["SPOOL_DIR"],
    flush_interval=0.2,
    retry_base_delay=0.05,
    retry_max_delay=0.2,
    max_retries=1_000_000,
    shutdown_timeout=2.0,
    gc_freeze=False,
)


def main() -> None:
    web.run_app(
        app, host="127.0.0.1", port=int(os.environ["SPOOL_PORT"]), print=None, access_log=None
    )
    monitoring = app[MONITORING_KEY]
    print(json.dumps({"stats": monitoring.stats(), "spool": monitoring.spool_stats()}), flush=True)


if __name__ == "__main__":
    main()
