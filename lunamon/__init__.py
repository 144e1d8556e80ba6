"""lunamon: exact per-request monitoring for aiohttp services, delivered to InfluxDB.

``lunamon.setup(app, service="luna-handlers")`` records every request as a point
of series ``request`` (and a failed one also in ``error``); ``@timed("x_time")``
adds sub-step times to the request being served.
"""

from lunamon.aiohttp import MONITORING_KEY, RequestRecorder, monitor_request, new_request_id, setup
from lunamon.collector import RequestCollector, add_field, add_tag, current_request
from lunamon.flusher import FlushPolicy
from lunamon.monitoring import Monitoring
from lunamon.point import Point, encode_lines, parse_line_protocol
from lunamon.settings import MonitoringSettings, SettingsError, SinkSettings
from lunamon.sinks.base import BatchTooLarge, Sink, SinkError
from lunamon.sinks.memory import MemorySink
from lunamon.timing import measure, timed

__version__ = "0.1.0.dev0"

__all__ = [
    # set up
    "setup",
    "monitor_request",
    "Monitoring",
    "FlushPolicy",
    "MONITORING_KEY",
    "MonitoringSettings",
    "SinkSettings",
    "SettingsError",
    # record
    "timed",
    "measure",
    "add_tag",
    "add_field",
    "current_request",
    "RequestCollector",
    "RequestRecorder",
    "new_request_id",
    # points
    "Point",
    "encode_lines",
    "parse_line_protocol",
    # sinks
    "Sink",
    "SinkError",
    "BatchTooLarge",
    "MemorySink",
]
