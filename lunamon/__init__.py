"""lunamon: exact per-request monitoring for aiohttp services.

``lunamon.setup(app, service="luna-handlers")`` records every request as a point
of series ``request`` (and a failed one also in ``error``); ``@timed("x_time")``
adds sub-step times to the request being served. Points go, in batches, to the
sinks below: InfluxDB 1.x, the InfluxDB 2.x/3.x write API (VictoriaMetrics
too), a line-protocol file, a structlog logger, memory, or your own.
"""

from lunamon.aiohttp import MONITORING_KEY, monitor_request, setup
from lunamon.client import client_trace_config
from lunamon.collector import (
    RequestCollector,
    add_field,
    add_tag,
    current_request,
    run_in_executor,
)
from lunamon.errors import BatchTooLarge, LineProtocolError, SettingsError, SinkError
from lunamon.lineprotocol import parse_line_protocol
from lunamon.logs import RequestIdFilter, add_request_id
from lunamon.monitoring import Monitoring
from lunamon.point import Point, encode_lines
from lunamon.settings import MonitoringSettings, SinkSettings
from lunamon.sinks.base import Sink
from lunamon.sinks.clickhouse import ClickHouseSink
from lunamon.sinks.file import LineProtocolFileSink
from lunamon.sinks.influxdb import InfluxDBSink
from lunamon.sinks.influxdb_v2 import InfluxDBV2Sink
from lunamon.sinks.log import LogSink
from lunamon.sinks.memory import MemorySink
from lunamon.sinks.plugin import BaseRequestMonitoringPlugin
from lunamon.timing import measure, timed

__version__ = "0.2.0.dev0"

__all__ = [
    "MONITORING_KEY",
    "BaseRequestMonitoringPlugin",
    "BatchTooLarge",
    "ClickHouseSink",
    "InfluxDBSink",
    "InfluxDBV2Sink",
    "LineProtocolError",
    "LineProtocolFileSink",
    "LogSink",
    "MemorySink",
    "Monitoring",
    "MonitoringSettings",
    "Point",
    "RequestCollector",
    "RequestIdFilter",
    "SettingsError",
    "Sink",
    "SinkError",
    "SinkSettings",
    "add_field",
    "add_request_id",
    "add_tag",
    "client_trace_config",
    "current_request",
    "encode_lines",
    "measure",
    "monitor_request",
    "parse_line_protocol",
    "run_in_executor",
    "setup",
    "timed",
]
