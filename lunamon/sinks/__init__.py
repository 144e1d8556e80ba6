"""Sinks: where finished points go."""

from lunamon.sinks.base import BatchTooLarge, Sink, SinkError, sink_name
from lunamon.sinks.memory import MemorySink

__all__ = ["BatchTooLarge", "MemorySink", "Sink", "SinkError", "sink_name"]
