"""Shared fixtures: the private servers of tests/servers.py, available to every test module."""

from servers import (  # noqa: F401  (imported to register the fixtures with pytest)
    fake_influx,
    influxd,
    influxd_auth,
    influxd_factory,
    influxd_small_body,
    tls_cert,
    victoria_metrics,
)
