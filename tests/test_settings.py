"""MonitoringSettings: loading TOML and JSON, environment overrides, validation, secrets."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs
from structlog.tracebacks import ExceptionDictTransformer

from lunamon._secrets import is_secret_key, mask_secrets, redact_secrets
from lunamon.errors import SettingsError
from lunamon.settings import DEFAULT_FAILED_STATUS_CODES, MonitoringSettings, SinkSettings
from lunamon.sinks.memory import MemorySink

# The DESIGN.md section 2 example, plus every other setting and a second sink.
EXAMPLE_TOML = """\
title = "luna-handlers"   # keys outside [monitoring] belong to the application

[monitoring]
enabled = true
service = "luna-handlers"
flush_interval = 1.0          # seconds
batch_size = 5000
buffer_size = 100000          # per sink
shutdown_timeout = 5.0
request_id_header = "Luna-Request-Id"
exclude = ["GET:/healthcheck"]
failed_status_codes = [404, "500-599"]
path_tags = { handlerId = "handler_id" }
max_retries = 3
retry_base_delay = 0.25
retry_max_delay = 10

[[monitoring.sinks]]
type = "influxdb"             # influxdb | influxdb_v2 | file | log | "pkg.module:Class"
host = "127.0.0.1"
port = 8086
database = "luna_monitoring"
username = "luna"
password = "toml-password-0f3a"

[[monitoring.sinks]]
type = "memory"
name = "spare"
"""

EXAMPLE_JSON: dict[str, Any] = {
    "title": "luna-handlers",
    "monitoring": {
        "enabled": True,
        "service": "luna-handlers",
        "flush_interval": 1.0,
        "batch_size": 5000,
        "buffer_size": 100000,
        "shutdown_timeout": 5.0,
        "request_id_header": "Luna-Request-Id",
        "exclude": ["GET:/healthcheck"],
        "failed_status_codes": [404, "500-599"],
        "path_tags": {"handlerId": "handler_id"},
        "max_retries": 3,
        "retry_base_delay": 0.25,
        "retry_max_delay": 10,
        "sinks": [
            {
                "type": "influxdb",
                "host": "127.0.0.1",
                "port": 8086,
                "database": "luna_monitoring",
                "username": "luna",
                "password": "toml-password-0f3a",
            },
            {"type": "memory", "name": "spare"},
        ],
    },
}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def write_json(tmp_path: Path, monitoring: object, name: str = "lunamon.json") -> Path:
    return write(tmp_path, name, json.dumps({"monitoring": monitoring}))


def settings_error(call: Callable[[], object]) -> SettingsError:
    """The SettingsError ``call`` raises (caught here, so the test's frame holds no secret)."""
    try:
        call()
    except SettingsError as exc:
        return exc
    raise AssertionError("no SettingsError was raised")


# --------------------------------------------------------------------------- defaults and loading


def test_defaults() -> None:
    settings = MonitoringSettings()
    assert settings.enabled is True
    assert settings.service == "luna-handlers"
    assert settings.flush_interval == 1.0
    assert settings.batch_size == 5000
    assert settings.buffer_size == 100_000
    assert settings.shutdown_timeout == 5.0
    assert settings.request_id_header == "Luna-Request-Id"
    assert settings.exclude == ()
    assert settings.failed_status_codes == frozenset(range(400, 600))
    assert dict(settings.path_tags) == {"handlerId": "handler_id", "verifierId": "verifier_id"}
    assert settings.max_retries == 10
    assert settings.retry_base_delay == 0.5
    assert settings.retry_max_delay == 30.0
    assert settings.sinks == ()
    assert settings.build_sinks() == []


def test_settings_are_frozen_and_hashable() -> None:
    settings = MonitoringSettings()
    with pytest.raises(AttributeError):
        settings.batch_size = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        settings.path_tags["x"] = "y"  # type: ignore[index]
    assert hash(settings) == hash(MonitoringSettings())
    assert MonitoringSettings() == settings


def test_load_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "lunamon.toml", EXAMPLE_TOML)
    settings = MonitoringSettings.load(path, env={})
    assert settings.source == str(path)
    assert settings.exclude == ("GET:/healthcheck",)
    assert settings.failed_status_codes == frozenset({404, *range(500, 600)})
    assert dict(settings.path_tags) == {"handlerId": "handler_id"}
    assert (settings.max_retries, settings.retry_base_delay) == (3, 0.25)
    assert settings.retry_max_delay == 10.0
    assert isinstance(settings.retry_max_delay, float)
    influx, spare = settings.sinks
    assert influx.type == "influxdb"
    assert dict(influx.options) == {
        "host": "127.0.0.1",
        "port": 8086,
        "database": "luna_monitoring",
        "username": "luna",
        "password": "toml-password-0f3a",
    }
    assert spare == SinkSettings("memory", {"name": "spare"})


def test_load_json_equals_toml(tmp_path: Path) -> None:
    toml = MonitoringSettings.load(write(tmp_path, "a.toml", EXAMPLE_TOML), env={})
    from_json = MonitoringSettings.load(write(tmp_path, "a.JSON", json.dumps(EXAMPLE_JSON)), env={})
    assert from_json == toml
    assert from_json.source.endswith("a.JSON")


def test_from_mapping_takes_the_section_or_the_document() -> None:
    section = EXAMPLE_JSON["monitoring"]
    assert MonitoringSettings.from_mapping(section) == MonitoringSettings.from_mapping(EXAMPLE_JSON)
    assert MonitoringSettings.from_mapping({}) == MonitoringSettings()
    assert MonitoringSettings.from_mapping({}).source == "<mapping>"


def test_normalisation() -> None:
    settings = MonitoringSettings(
        exclude=["get:/healthcheck", "GET:/healthcheck", "post:<unmatched>"],  # type: ignore[arg-type]
        failed_status_codes=[404, " 500 - 502 ", "418"],  # type: ignore[arg-type]
        path_tags={},
        flush_interval=2,
    )
    assert settings.exclude == ("GET:/healthcheck", "POST:<unmatched>")
    assert settings.failed_status_codes == frozenset({404, 418, 500, 501, 502})
    assert dict(settings.path_tags) == {}
    assert settings.flush_interval == 2.0
    assert isinstance(settings.flush_interval, float)


def test_flush_policy_carries_the_batching_settings() -> None:
    pytest.importorskip("lunamon.flusher")
    settings = MonitoringSettings(
        flush_interval=0.5,
        batch_size=10,
        buffer_size=20,
        shutdown_timeout=2,
        max_retries=4,
        retry_base_delay=0.1,
        retry_max_delay=3,
    )
    policy = settings.flush_policy()
    assert (policy.flush_interval, policy.batch_size, policy.buffer_size) == (0.5, 10, 20)
    assert (policy.shutdown_timeout, policy.max_retries) == (2.0, 4)
    assert (policy.retry_base_delay, policy.retry_max_delay) == (0.1, 3.0)


def test_disabled_is_just_a_flag(tmp_path: Path) -> None:
    path = write_json(tmp_path, {"enabled": False, "sinks": [{"type": "memory"}]})
    settings = MonitoringSettings.load(path, env={})
    assert settings.enabled is False
    assert len(settings.sinks) == 1


# --------------------------------------------------------------------------- environment


@pytest.mark.parametrize(
    ("variable", "text", "attribute", "expected"),
    [
        ("LUNAMON_ENABLED", "0", "enabled", False),
        ("LUNAMON_ENABLED", "no", "enabled", False),
        ("LUNAMON_ENABLED", "FALSE", "enabled", False),
        ("LUNAMON_ENABLED", "1", "enabled", True),
        ("LUNAMON_ENABLED", " yes ", "enabled", True),
        ("LUNAMON_ENABLED", "true", "enabled", True),
        ("LUNAMON_SERVICE", "luna-faces", "service", "luna-faces"),
        ("LUNAMON_FLUSH_INTERVAL", "0.25", "flush_interval", 0.25),
        ("LUNAMON_FLUSH_INTERVAL", "2", "flush_interval", 2.0),
        ("LUNAMON_BATCH_SIZE", "100", "batch_size", 100),
        ("LUNAMON_BUFFER_SIZE", "200000", "buffer_size", 200_000),
        ("LUNAMON_SHUTDOWN_TIMEOUT", "9.5", "shutdown_timeout", 9.5),
        ("LUNAMON_REQUEST_ID_HEADER", "X-Request-Id", "request_id_header", "X-Request-Id"),
        (
            "LUNAMON_EXCLUDE",
            "GET:/healthcheck, get:/version,",
            "exclude",
            ("GET:/healthcheck", "GET:/version"),
        ),
        ("LUNAMON_EXCLUDE", "", "exclude", ()),
        (
            "LUNAMON_FAILED_STATUS_CODES",
            "404,500-502",
            "failed_status_codes",
            frozenset({404, 500, 501, 502}),
        ),
        (
            "LUNAMON_PATH_TAGS",
            "handlerId=handler, listId = list_id",
            "path_tags",
            {"handlerId": "handler", "listId": "list_id"},
        ),
        ("LUNAMON_MAX_RETRIES", "0", "max_retries", 0),
        ("LUNAMON_RETRY_BASE_DELAY", "1", "retry_base_delay", 1.0),
        ("LUNAMON_RETRY_MAX_DELAY", "60", "retry_max_delay", 60.0),
    ],
)
def test_environment_overrides(
    tmp_path: Path, variable: str, text: str, attribute: str, expected: object
) -> None:
    path = write(tmp_path, "lunamon.toml", EXAMPLE_TOML)
    settings = MonitoringSettings.load(path, env={variable: text})
    value = getattr(settings, attribute)
    assert (dict(value) if attribute == "path_tags" else value) == expected
    assert type(value) is type(getattr(MonitoringSettings(), attribute))


def test_load_reads_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUNAMON_BATCH_SIZE", "7")
    path = write(tmp_path, "lunamon.toml", EXAMPLE_TOML)
    assert MonitoringSettings.load(path).batch_size == 7
    assert MonitoringSettings.load(path, env=None).batch_size == 5000
    assert MonitoringSettings.from_mapping({}).batch_size == 5000  # no environment by default


def test_unknown_and_lowercase_variables_are_ignored() -> None:
    env = {"LUNAMON_BATCH_SIZ": "abc", "lunamon_batch_size": "abc", "LUNAMON_SINKS": "x"}
    assert MonitoringSettings.from_mapping({}, env=env) == MonitoringSettings()


def test_environment_is_checked_against_the_file(tmp_path: Path) -> None:
    path = write_json(tmp_path, {"buffer_size": 100})
    error = settings_error(lambda: MonitoringSettings.load(path, env={"LUNAMON_BATCH_SIZE": "500"}))
    assert str(error).startswith(f"{path}: environment variable LUNAMON_BATCH_SIZE: ")
    assert "must not exceed buffer_size (100)" in str(error)


@pytest.mark.parametrize(
    ("variable", "text", "fragment"),
    [
        ("LUNAMON_ENABLED", "maybe", "expected one of 1, 0, true, false, yes, no"),
        ("LUNAMON_BATCH_SIZE", "5k", "expected an integer, got '5k'"),
        ("LUNAMON_BATCH_SIZE", "1.5", "expected an integer"),
        ("LUNAMON_FLUSH_INTERVAL", "soon", "expected a number"),
        ("LUNAMON_FLUSH_INTERVAL", "0", "must be a finite number of seconds > 0"),
        ("LUNAMON_SHUTDOWN_TIMEOUT", "-1", "must be a finite number of seconds > 0"),
        ("LUNAMON_FLUSH_INTERVAL", "nan", "must be a finite number of seconds > 0"),
        ("LUNAMON_SERVICE", " ", "must not be empty"),
        ("LUNAMON_FAILED_STATUS_CODES", "4xx", "expected a status code or a range"),
        ("LUNAMON_PATH_TAGS", "handlerId", "expected 'parameter=tag' pairs"),
        ("LUNAMON_EXCLUDE", "/healthcheck", "expected 'METHOD:/route'"),
    ],
)
def test_environment_errors_name_the_variable(
    tmp_path: Path, variable: str, text: str, fragment: str
) -> None:
    path = write(tmp_path, "lunamon.toml", EXAMPLE_TOML)
    error = settings_error(lambda: MonitoringSettings.load(path, env={variable: text}))
    assert str(error).startswith(f"{path}: environment variable {variable}")
    assert fragment in str(error)
    assert error.source == str(path)


def test_sink_option_from_environment() -> None:
    table = {"type": "memory", "name_env": "SINK_NAME"}
    settings = MonitoringSettings.from_mapping({"sinks": [table]}, env={"SINK_NAME": "primary"})
    assert dict(settings.sinks[0].options) == {"name": "primary"}
    missing = settings_error(lambda: MonitoringSettings.from_mapping({"sinks": [table]}))
    assert str(missing) == (
        "<mapping>: monitoring.sinks[0].name_env: environment variable 'SINK_NAME' is not set"
    )
    both = settings_error(
        lambda: MonitoringSettings.from_mapping(
            {"sinks": [{**table, "name": "x"}]}, env={"SINK_NAME": "y"}
        )
    )
    assert "monitoring.sinks[0].name_env: both 'name' and 'name_env' are set" in str(both)
    wrong = settings_error(
        lambda: MonitoringSettings.from_mapping({"sinks": [{"type": "memory", "name_env": 3}]})
    )
    assert "monitoring.sinks[0].name_env: expected the name of an environment variable" in str(
        wrong
    )


# --------------------------------------------------------------------------- validation

VALIDATION_CASES = [
    (
        {"flush_intervall": 1},
        "monitoring.flush_intervall",
        "unknown setting (did you mean 'flush_interval'?)",
    ),
    ({"password": "x"}, "monitoring.password", "unknown setting"),
    ({"enabled": 1}, "monitoring.enabled", "expected a boolean (true or false), got integer 1"),
    ({"enabled": "yes"}, "monitoring.enabled", "expected a boolean"),
    ({"service": 5}, "monitoring.service", "expected a string, got integer 5"),
    ({"service": ""}, "monitoring.service", "must not be empty"),
    ({"service": "luna\nhandlers"}, "monitoring.service", "cannot be stored as an InfluxDB tag"),
    ({"batch_size": True}, "monitoring.batch_size", "expected an integer, got boolean True"),
    ({"batch_size": 10.0}, "monitoring.batch_size", "expected an integer, got float 10.0"),
    ({"batch_size": "10"}, "monitoring.batch_size", "expected an integer, got string '10'"),
    ({"batch_size": 0}, "monitoring.batch_size", "must be >= 1, got 0"),
    ({"buffer_size": -5}, "monitoring.buffer_size", "must be >= 1, got -5"),
    (
        {"batch_size": 10, "buffer_size": 5},
        "monitoring.batch_size",
        "batch_size (10) must not exceed buffer_size (5)",
    ),
    ({"max_retries": -1}, "monitoring.max_retries", "must be >= 0, got -1"),
    ({"max_retries": False}, "monitoring.max_retries", "expected an integer, got boolean"),
    (
        {"flush_interval": 0},
        "monitoring.flush_interval",
        "must be a finite number of seconds > 0, got 0",
    ),
    (
        {"flush_interval": -1.5},
        "monitoring.flush_interval",
        "must be a finite number of seconds > 0",
    ),
    (
        {"flush_interval": True},
        "monitoring.flush_interval",
        "expected a number of seconds, got boolean",
    ),
    (
        {"flush_interval": "1s"},
        "monitoring.flush_interval",
        "expected a number of seconds, got string",
    ),
    ({"shutdown_timeout": 0}, "monitoring.shutdown_timeout", "> 0"),
    ({"retry_base_delay": -0.5}, "monitoring.retry_base_delay", "> 0"),
    ({"retry_max_delay": 0}, "monitoring.retry_max_delay", "> 0"),
    (
        {"retry_base_delay": 5, "retry_max_delay": 1},
        "monitoring.retry_base_delay",
        "must not exceed retry_max_delay (1.0)",
    ),
    (
        {"request_id_header": "Request Id"},
        "monitoring.request_id_header",
        "is not a valid HTTP header name",
    ),
    ({"request_id_header": ""}, "monitoring.request_id_header", "must not be empty"),
    (
        {"exclude": "GET:/healthcheck"},
        "monitoring.exclude",
        "expected an array of 'METHOD:/route' strings",
    ),
    ({"exclude": ["GET:/a", "healthcheck"]}, "monitoring.exclude[1]", "expected 'METHOD:/route'"),
    ({"exclude": ["GET healthcheck:/x"]}, "monitoring.exclude[0]", "expected 'METHOD:/route'"),
    ({"exclude": ["GET:<other>"]}, "monitoring.exclude[0]", "or 'GET:<unmatched>'"),
    ({"exclude": [1]}, "monitoring.exclude[0]", "expected a 'METHOD:/route' string, got integer 1"),
    (
        {"failed_status_codes": "400-599"},
        "monitoring.failed_status_codes",
        "expected an array of status codes",
    ),
    ({"failed_status_codes": [404, 700]}, "monitoring.failed_status_codes[1]", "within 100-599"),
    ({"failed_status_codes": ["599-500"]}, "monitoring.failed_status_codes[0]", "low <= high"),
    (
        {"failed_status_codes": ["4xx"]},
        "monitoring.failed_status_codes[0]",
        "expected a status code or a range such as '500-599'",
    ),
    ({"failed_status_codes": [True]}, "monitoring.failed_status_codes[0]", "got boolean True"),
    (
        {"path_tags": ["handlerId"]},
        "monitoring.path_tags",
        "expected a table of path parameter = tag name",
    ),
    (
        {"path_tags": {"handlerId": 1}},
        "monitoring.path_tags.handlerId",
        "expected a tag name, got integer 1",
    ),
    (
        {"path_tags": {"handlerId": "route"}},
        "monitoring.path_tags.handlerId",
        "tag 'route' is set by lunamon itself",
    ),
    (
        {"path_tags": {"handlerId": "time"}},
        "monitoring.path_tags.handlerId",
        "reserved by InfluxDB",
    ),
    (
        {"path_tags": {"{handlerId}": "handler_id"}},
        "monitoring.path_tags",
        "is not a path parameter name",
    ),
    (
        {"sinks": {"type": "memory"}},
        "monitoring.sinks",
        "expected an array of tables ([[monitoring.sinks]]), got a single table",
    ),
    ({"sinks": "memory"}, "monitoring.sinks", "expected an array of sink tables, got string"),
    (
        {"sinks": ["memory"]},
        "monitoring.sinks[0]",
        'expected a table of sink options with a "type", got string',
    ),
    ({"sinks": [{"type": "memory"}, 3]}, "monitoring.sinks[1]", "got integer"),
    (
        {"sinks": [{"host": "h", "port": 1}]},
        "monitoring.sinks[0].type",
        "missing: every sink needs a type (options given: host, port)",
    ),
    ({"sinks": [{"type": 1}]}, "monitoring.sinks[0].type", "expected a sink type name, got int"),
    (
        {"sinks": [{"type": ""}]},
        "monitoring.sinks[0].type",
        "expected a sink type name, got an empty string",
    ),
    (
        {"sinks": [{"type": "influx"}]},
        "monitoring.sinks[0].type",
        "unknown sink type 'influx' (did you mean 'influxdb'?)",
    ),
    (
        {"sinks": [{"type": "prometheus"}]},
        "monitoring.sinks[0].type",
        "known: clickhouse, file, influxdb, influxdb_v2, log, memory",
    ),
    (
        {"sinks": [{"type": "mypkg.sinks.Custom"}]},
        "monitoring.sinks[0].type",
        "(for a class, write mypkg.sinks:Custom)",
    ),
    (
        {"sinks": [{"type": "my pkg:Custom"}]},
        "monitoring.sinks[0].type",
        "is not a 'package.module:Class' path",
    ),
    (
        {"sinks": [{"type": "mypkg:"}]},
        "monitoring.sinks[0].type",
        "is not a 'package.module:Class' path",
    ),
]


@pytest.mark.parametrize(("section", "key", "fragment"), VALIDATION_CASES)
def test_validation_errors_name_the_file_and_key(
    tmp_path: Path, section: dict[str, Any], key: str, fragment: str
) -> None:
    path = write_json(tmp_path, section)
    error = settings_error(lambda: MonitoringSettings.load(path, env={}))
    assert isinstance(error, ValueError)
    assert (error.source, error.key) == (str(path), key)
    assert str(error).startswith(f"{path}: {key}: ")
    assert fragment in str(error)


def test_toml_errors_name_the_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "lunamon.toml", EXAMPLE_TOML.replace("batch_size", "batchsize"))
    error = settings_error(lambda: MonitoringSettings.load(path, env={}))
    assert str(error) == (
        f"{path}: monitoring.batchsize: unknown setting (did you mean 'batch_size'?)"
    )
    path = write(tmp_path, "sinks.toml", '[monitoring]\n[[monitoring.sinks]]\nhost = "h"\n')
    error = settings_error(lambda: MonitoringSettings.load(path, env={}))
    assert str(error).startswith(f"{path}: monitoring.sinks[0].type: missing")


@pytest.mark.parametrize(
    ("name", "text", "fragment"),
    [
        ("bad.toml", "[monitoring\nenabled = true\n", "invalid TOML: "),
        ("bad.toml", "[monitoring]\nbatch_size = 1\nbatch_size = 2\n", "invalid TOML: "),
        ("bad.json", '{"monitoring": {', "invalid JSON: "),
        (
            "dup.json",
            '{"monitoring": {"batch_size": 1, "batch_size": 2}}',
            "duplicate key 'batch_size'",
        ),
        ("none.toml", 'title = "x"\n', "monitoring: missing: the file needs a [monitoring] table"),
        ("none.json", "[1, 2]", 'monitoring: missing: the file needs a "monitoring" object'),
        ("list.json", '{"monitoring": [1]}', "monitoring: expected a table, got array"),
        (
            "lunamon.yaml",
            "monitoring: {}",
            "unsupported file type '.yaml': expected .toml or .json",
        ),
    ],
)
def test_file_errors(tmp_path: Path, name: str, text: str, fragment: str) -> None:
    path = write(tmp_path, name, text)
    error = settings_error(lambda: MonitoringSettings.load(path, env={}))
    assert str(error).startswith(f"{path}: ")
    assert fragment in str(error)


def test_non_utf8_and_missing_files(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('[monitoring]\nservice = "caf\xe9"\n'.encode("latin-1"))
    assert "not UTF-8 text" in str(settings_error(lambda: MonitoringSettings.load(path)))
    with pytest.raises(FileNotFoundError):
        MonitoringSettings.load(tmp_path / "absent.toml")


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"monitoring": {"batch_size": 9}}).encode())
    assert MonitoringSettings.load(path, env={}).batch_size == 9


def test_constructor_validates_too() -> None:
    error = settings_error(lambda: MonitoringSettings(batch_size=0))
    assert (error.key, str(error)) == ("batch_size", "batch_size: must be >= 1, got 0")
    error = settings_error(
        lambda: MonitoringSettings(sinks=[{"type": "memory"}])  # type: ignore[arg-type]
    )
    assert error.key == "sinks[0]"
    assert "expected SinkSettings, got dict" in str(error)
    assert "options" in str(settings_error(lambda: SinkSettings("memory", "name=x")))  # type: ignore[arg-type]
    assert "'type' is not an option" in str(
        settings_error(lambda: SinkSettings("memory", {"type": "file"}))
    )
    assert "unknown sink type" in str(settings_error(lambda: SinkSettings("nope")))


def test_sink_types_are_checked_when_loading(tmp_path: Path) -> None:
    """Loading imports the sink type to check its options: a bad path fails there."""
    path = write_json(tmp_path, {"sinks": [{"type": "lunamon_no_such_module:Sink"}]})
    error = settings_error(lambda: MonitoringSettings.load(path, env={}))
    assert str(error).startswith(f"{path}: monitoring.sinks[0].type: sink ")
    assert "cannot import 'lunamon_no_such_module'" in str(error)


# --------------------------------------------------------------------------- build_sinks


def test_build_sinks_memory_file_log(tmp_path: Path) -> None:
    file_module = pytest.importorskip("lunamon.sinks.file")
    log_module = pytest.importorskip("lunamon.sinks.log")
    path = write_json(
        tmp_path,
        {
            "sinks": [
                {"type": "memory", "name": "mem"},
                {"type": "file", "path": str(tmp_path / "points.lp"), "fsync": False},
                {"type": "log", "event": "monitoring_point", "level": "debug"},
            ]
        },
    )
    memory, file, log = MonitoringSettings.load(path, env={}).build_sinks()
    assert isinstance(memory, MemorySink)
    assert memory.name == "mem"
    assert isinstance(file, file_module.LineProtocolFileSink)
    assert (file.path, file.fsync) == (tmp_path / "points.lp", False)
    assert isinstance(log, log_module.LogSink)
    assert (log.event, log.level) == ("monitoring_point", "debug")


def test_build_sinks_influxdb(tmp_path: Path) -> None:
    module = pytest.importorskip("lunamon.sinks.influxdb")
    path = write(tmp_path, "lunamon.toml", EXAMPLE_TOML)
    influx, spare = MonitoringSettings.load(path, env={}).build_sinks()
    assert isinstance(influx, module.InfluxDBSink)
    assert (influx.host, influx.port, influx.database) == ("127.0.0.1", 8086, "luna_monitoring")
    assert influx.username == "luna"
    assert "toml-password-0f3a" not in repr(influx)
    assert spare.name == "spare"  # type: ignore[attr-defined]


def test_build_sinks_influxdb_v2() -> None:
    module = pytest.importorskip("lunamon.sinks.influxdb_v2")
    table = {
        "type": "influxdb_v2",
        "url": "http://127.0.0.1:8428",
        "org": "luna",
        "bucket": "monitoring",
        "token_env": "INFLUX_TOKEN",
        "precision": "ms",
    }
    settings = MonitoringSettings.from_mapping(
        {"sinks": [table]}, env={"INFLUX_TOKEN": "env-token-77c1"}
    )
    assert "env-token-77c1" not in repr(settings)
    (sink,) = settings.build_sinks()
    assert isinstance(sink, module.InfluxDBV2Sink)
    assert (sink.url, sink.org, sink.bucket) == ("http://127.0.0.1:8428", "luna", "monitoring")
    assert sink.precision == "ms"
    assert "env-token-77c1" not in repr(sink)


def test_build_sinks_errors_name_the_sink_and_option(tmp_path: Path) -> None:
    path = write_json(tmp_path, {"sinks": [{"type": "memory"}, {"type": "memory", "nmae": "x"}]})
    error = settings_error(lambda: MonitoringSettings.load(path, env={}))  # at load already
    assert str(error) == (
        f"{path}: monitoring.sinks[1].nmae: sink 'memory': unknown option 'nmae'"
        " (did you mean 'name'?); accepted: name"
    )


# --------------------------------------------------------------------------- secrets

# Every one of these must stay out of repr, str, errors and logs.
SECRETS = (
    "s3cr3t-pass-91",
    "s3cr3t-token-92",
    "s3cr3t-client-93",
    "s3cr3t-api-94",
    "s3cr3t-url-95",
    "s3cr3t-query-96",
    "s3cr3t-bearer-97",
    "s3cr3t-env-98",
)


class LeakySink:
    """Its constructor error quotes every option it was given."""

    def __init__(self, **options: Any) -> None:
        raise ValueError(f"cannot connect with {options}")

    async def start(self) -> None: ...

    async def write(self, points: Any) -> None: ...

    async def close(self) -> None: ...


def secret_section() -> dict[str, Any]:
    return {
        "sinks": [
            {
                "type": f"{__name__}:LeakySink",
                "password": SECRETS[0],
                "token": SECRETS[1],
                "client_secret": SECRETS[2],
                "API_Token": SECRETS[3],
                "dsn": f"https://luna:{SECRETS[4]}@influx.example/db?auth_token={SECRETS[5]}",
                "headers": {"Authorization": f"Bearer {SECRETS[6]}"},
                "session_token_env": "LEAKY_TOKEN",
            }
        ]
    }


SECRET_ENV = {"LEAKY_TOKEN": SECRETS[7]}


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


@pytest.fixture
def stdlib_structlog() -> Iterator[None]:
    """Route structlog through stdlib logging (so caplog sees lunamon's events), then restore."""
    saved = structlog.get_config()
    structlog.configure(
        processors=[
            structlog.stdlib.add_log_level,
            structlog.processors.format_exc_info,
            structlog.processors.KeyValueRenderer(),
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    yield
    structlog.configure(**saved)


def rendered(error: BaseException) -> str:
    """Everything a log could show of ``error``: messages, traceback, lunamon's frame locals."""
    text = "\n".join(traceback.format_exception(error)) + repr(error) + repr(error.args)
    for exception in ExceptionDictTransformer(show_locals=True)(
        (type(error), error, error.__traceback__)
    ):
        text += exception["exc_type"] + exception["exc_value"]
        for frame in exception["frames"]:
            if "/lunamon/" in frame["filename"]:
                text += json.dumps(frame, default=repr)
    return text


def test_secrets_are_masked_in_repr_and_str(tmp_path: Path) -> None:
    path = write_json(tmp_path, secret_section())
    settings = MonitoringSettings.load(path, env=SECRET_ENV)
    (sink,) = settings.sinks
    assert sink.options["session_token"] == SECRETS[7]  # the real values are there ...
    for text in (repr(settings), str(settings), repr(sink), str(sink), repr(sink.options)):
        assert_no_secret(text)  # ... but never shown
    assert "'password': '***'" in repr(sink)
    assert "https://luna:***@influx.example/db?auth_token=***" in repr(sink)
    assert "{'Authorization': '***'}" in repr(sink)


def test_secrets_stay_out_of_errors_and_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, stdlib_structlog: None
) -> None:
    caplog.set_level(logging.DEBUG)
    path = write_json(tmp_path, secret_section())
    settings = MonitoringSettings.load(path, env=SECRET_ENV)
    build_error = settings_error(settings.build_sinks)
    assert str(build_error).startswith(f"{path}: monitoring.sinks[0]")
    assert f"sink '{__name__}:LeakySink': cannot be created: ValueError:" in str(build_error)
    assert "'password': '***'" in str(build_error)
    assert build_error.__cause__ is None  # the constructor's own exception held the secrets

    # A validation error elsewhere in a file that holds secrets.
    bad_path = write_json(tmp_path, {**secret_section(), "batch_size": 0}, "bad.json")
    load_error = settings_error(lambda: MonitoringSettings.load(bad_path, env=SECRET_ENV))
    assert str(load_error) == f"{bad_path}: monitoring.batch_size: must be >= 1, got 0"
    # A sink given as a string (a URL with credentials) is not echoed.
    url_error = settings_error(
        lambda: MonitoringSettings.from_mapping({"sinks": [secret_section()["sinks"][0]["dsn"]]})
    )
    # An unknown option of a sink that has secrets.
    option_error = settings_error(
        lambda: MonitoringSettings.from_mapping(
            {"sinks": [{"type": "memory", "password": SECRETS[0]}]}
        ).build_sinks()
    )
    assert "unknown option 'password'" in str(option_error)

    for error in (build_error, load_error, url_error, option_error):
        assert_no_secret(rendered(error))
        logging.getLogger("app").error("monitoring setup failed", exc_info=error)
        structlog.get_logger("app").error("monitoring setup failed", exc_info=error)

    assert any(r.name == "lunamon" and "settings_loaded" in r.getMessage() for r in caplog.records)
    assert "monitoring setup failed" in caplog.text
    assert_no_secret(caplog.text)


def test_secrets_stay_out_of_captured_structlog_events(tmp_path: Path) -> None:
    path = write_json(tmp_path, secret_section())
    with capture_logs() as events:
        settings = MonitoringSettings.load(path, env=SECRET_ENV)
        error = settings_error(settings.build_sinks)
        structlog.get_logger("app").error("setup failed", error=str(error), settings=settings)
        MonitoringSettings.from_mapping({"sinks": [{"type": "log", "name": "m", "event": "e"}]})
    assert [e["event"] for e in events] == ["settings_loaded", "setup failed", "settings_loaded"]
    assert events[0]["sinks"] == [f"{__name__}:LeakySink"]
    assert_no_secret(repr(events))


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("password", True),
        ("db_password", True),
        ("PASSWORD", True),
        ("token", True),
        ("refresh_token", True),
        ("client_secret", True),
        ("Authorization", True),
        ("api_key", True),
        ("passwd", True),
        ("username", False),
        ("host", False),
        ("allow_plain_credentials", False),
        (3, False),
    ],
)
def test_is_secret_key(key: object, secret: bool) -> None:
    assert is_secret_key(key) is secret


def test_mask_and_redact_helpers() -> None:
    options = {
        "password": "pw-1234",
        "token": None,
        "url": "http://u:p%40ss-5678@h:8086/?db=x&token=tk-9012",
        "list": [{"secret": 1234567}],
        "flag": True,
    }
    assert mask_secrets(options) == {
        "password": "***",
        "token": None,
        "url": "http://u:***@h:8086/?db=x&token=***",
        "list": [{"secret": "***"}],
        "flag": True,
    }
    text = "pw-1234 p%40ss-5678 p@ss-5678 tk-9012 1234567 db=x True"
    assert redact_secrets(text, options) == "*** *** *** *** *** db=x True"


def test_default_failed_status_codes_constant() -> None:
    assert frozenset(range(400, 600)) == DEFAULT_FAILED_STATUS_CODES
    assert "failed_status_codes='400-599'" in repr(MonitoringSettings())
    assert "failed_status_codes='404,500-502'" in repr(
        MonitoringSettings(failed_status_codes=frozenset({404, 500, 501, 502}))
    )


def test_module_exports() -> None:
    module: ModuleType = sys.modules["lunamon.settings"]
    assert sorted(module.__all__) == module.__all__
    for name in module.__all__:
        assert hasattr(module, name)


# --------------------------------------------------------------------------- exact messages
# (docs/mutation.md: each test below kills mutants of lunamon/settings.py the tests above
# let through: a refused value must say exactly what was wrong, and where.)


def problem(call: Callable[[], object]) -> tuple[str | None, str]:
    error = settings_error(call)
    return error.key, error.problem


@pytest.mark.parametrize(
    ("value", "described"),
    [
        (5, "integer 5"),
        (1.5, "float 1.5"),
        (("a",), "array ('a',)"),
        (["a"], "array ['a']"),
        ({"a": 1}, "table {'a': 1}"),
        ({1}, "set {1}"),
        (b"x", "bytes b'x'"),
        ("x" * 58, "string '" + "x" * 58 + "'"),  # a repr of 60 characters: shown whole
        ("x" * 59, "string '" + "x" * 56 + "..."),  # 61: cut to 57 and marked
    ],
)
def test_a_refused_value_is_described_by_its_kind_and_value(value: object, described: str) -> None:
    assert problem(lambda: MonitoringSettings(enabled=value)) == (  # type: ignore[arg-type]
        "enabled",
        f"expected a boolean (true or false), got {described}",
    )


def test_the_kind_alone_is_said_where_the_value_may_be_secret() -> None:
    error = settings_error(lambda: MonitoringSettings.from_mapping({"sinks": ["http://u:pw@x"]}))
    assert (error.key, error.problem) == (
        "monitoring.sinks[0]",
        'expected a table of sink options with a "type", got string',
    )
    for value, kind in [("a b", "string"), (5, "integer"), (("a b",), None)]:
        if kind is None:
            continue
        assert problem(lambda v=value: MonitoringSettings(sinks=v)) == (  # type: ignore[misc]
            "sinks",
            f"expected an array of sink tables, got {kind}",
        )


@pytest.mark.parametrize(
    ("options", "key", "message"),
    [
        ({"service": "  "}, "service", "must not be empty"),
        ({"service": " svc"}, "service",
         "' svc' cannot be stored as an InfluxDB tag as given (surrounding spaces, a newline"
         " or a trailing backslash)"),
        ({"exclude": 5}, "exclude", "expected an array of 'METHOD:/route' strings, got integer 5"),
        ({"failed_status_codes": 5}, "failed_status_codes",
         "expected an array of status codes and 'low-high' ranges, got integer 5"),
        ({"failed_status_codes": [99]}, "failed_status_codes[0]",
         "expected status codes within 100-599, low <= high, got 99"),
        ({"failed_status_codes": ["500-600"]}, "failed_status_codes[0]",
         "expected status codes within 100-599, low <= high, got '500-600'"),
        ({"path_tags": 5}, "path_tags",
         "expected a table of path parameter = tag name, got integer 5"),
        ({"path_tags": {5: "x"}}, "path_tags", "5 is not a path parameter name"),
        ({"path_tags": {"a/b": "x"}}, "path_tags", "'a/b' is not a path parameter name"),
        ({"path_tags": {"p": "time"}}, "path_tags.p", "tag name 'time' is reserved by InfluxDB"),
        ({"batch_size": 0}, "batch_size", "must be >= 1, got 0"),
        ({"buffer_size": "x"}, "buffer_size", "expected an integer, got string 'x'"),
        ({"max_retries": -1}, "max_retries", "must be >= 0, got -1"),
        ({"sinks": {"type": "memory"}}, "sinks",
         "expected an array of tables ([[monitoring.sinks]]), got a single table"),
        ({"sinks": [{"type": "memory"}]}, "sinks[0]",
         "expected SinkSettings, got dict (config tables go through"
         " MonitoringSettings.from_mapping)"),
        ({"sinks": "memory"}, "sinks", "expected an array of sink tables, got string"),
    ],
)  # fmt: skip
def test_refusals_name_the_key_and_say_exactly_why(
    options: dict[str, Any], key: str, message: str
) -> None:
    assert problem(lambda: MonitoringSettings(**options)) == (key, message)


@pytest.mark.parametrize(
    ("codes", "expected"),
    [([100], {100}), ([599], {599}), (["100-101"], {100, 101}), (["598-599"], {598, 599})],
)
def test_status_code_bounds_are_inclusive(codes: list[object], expected: set[int]) -> None:
    assert MonitoringSettings(failed_status_codes=codes).failed_status_codes == expected  # type: ignore[arg-type]


def test_route_templates_may_hold_colons_and_parameters_may_hold_an_x() -> None:
    settings = MonitoringSettings(exclude=("get:/a:b",), path_tags={"userX": "user_x"})
    assert settings.exclude == ("GET:/a:b",)
    assert dict(settings.path_tags) == {"userX": "user_x"}


@pytest.mark.parametrize(
    ("options", "key", "message"),
    [
        ([1], "options", "expected a table of sink options, got list"),
        ({"": 1}, "options", "option names must be non-empty strings, got ''"),
        ({5: 1}, "options", "option names must be non-empty strings, got 5"),
        ({"type": "memory"}, "options", "'type' is not an option: it names the sink type"),
    ],
)
def test_sink_settings_refusals(options: Any, key: str, message: str) -> None:
    assert problem(lambda: SinkSettings("memory", options)) == (key, message)


@pytest.mark.parametrize(
    ("table", "key", "message"),
    [
        ({}, "monitoring.sinks[0].type", "missing: every sink needs a type (options given: none)"),
        ({"type": "memory", 5: "x"}, "monitoring.sinks[0]",
         "option names must be non-empty strings, got 5"),
        ({"type": "memory", "name_env": 5}, "monitoring.sinks[0].name_env",
         "expected the name of an environment variable, got integer 5"),
    ],
)  # fmt: skip
def test_sink_table_refusals_name_the_table(table: dict[Any, Any], key: str, message: str) -> None:
    assert problem(lambda: MonitoringSettings.from_mapping({"sinks": [table]})) == (key, message)


def test_an_option_named_just_env_is_an_option_not_a_variable_reference() -> None:
    key, message = problem(
        lambda: MonitoringSettings.from_mapping(
            {"sinks": [{"type": "memory", "_env": "X"}]}, env={"X": "y"}
        )
    )
    assert key == "monitoring.sinks[0]._env"
    assert "_env" in message
    assert "environment variable" not in message


def test_a_single_sink_table_in_a_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "one.toml", '[monitoring.sinks]\ntype = "memory"\n')
    assert problem(lambda: MonitoringSettings.load(path, env={})) == (
        "monitoring.sinks",
        "expected an array of tables ([[monitoring.sinks]]), got a single table",
    )


@pytest.mark.parametrize(
    ("variable", "text", "value"),
    [
        ("LUNAMON_ENABLED", "on", True),
        ("LUNAMON_ENABLED", " OFF ", False),
        ("LUNAMON_ENABLED", "Yes", True),
        ("LUNAMON_ENABLED", "0", False),
        ("LUNAMON_PATH_TAGS", "handlerId=handler=id", {"handlerId": "handler=id"}),
    ],
)
def test_environment_values(variable: str, text: str, value: object) -> None:
    settings = MonitoringSettings.from_env({variable: text})
    got = settings.enabled if variable == "LUNAMON_ENABLED" else dict(settings.path_tags)
    assert got == value


@pytest.mark.parametrize(
    ("variable", "text", "message"),
    [
        ("LUNAMON_ENABLED", "maybe",
         "expected one of 1, 0, true, false, yes, no, on, off, got 'maybe'"),
        ("LUNAMON_FLUSH_INTERVAL", "soon", "expected a number, got 'soon'"),
        ("LUNAMON_BATCH_SIZE", "x", "expected an integer, got 'x'"),
    ],
)  # fmt: skip
def test_environment_refusals_are_exact(variable: str, text: str, message: str) -> None:
    error = settings_error(lambda: MonitoringSettings.from_env({variable: text}))
    assert (error.source, error.key, error.problem) == (
        "<environment>",
        f"environment variable {variable}",
        message,
    )


def test_only_upper_case_lunamon_variables_are_read_and_others_not_warned_about() -> None:
    env = {"LUNAMON_flush_interval": "9", "PATH": "/bin", "HOME_LUNAMON_BATCH_SIZE": "1"}
    with capture_logs() as logs:
        settings = MonitoringSettings.from_env(env)
    assert settings == MonitoringSettings()
    assert [e for e in logs if e["event"] == "unknown_environment_variable"] == []


def test_an_unknown_variable_is_warned_about_once_with_the_known_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import lunamon.settings

    monkeypatch.setattr(lunamon.settings, "_warned_env", set())
    with capture_logs() as logs:
        MonitoringSettings.from_env({"LUNAMON_BATCH_SIZZE": "9"})
        settings = MonitoringSettings.from_env(
            {"LUNAMON_BATCH_SIZZE": "9", "LUNAMON_BATCH_SIZE": "7"}
        )
    assert settings.batch_size == 7  # the variables after an unknown one are read too
    (warned,) = [e for e in logs if e["event"] == "unknown_environment_variable"]
    assert warned["variable"] == "LUNAMON_BATCH_SIZZE"
    assert warned["hint"] == "did you mean LUNAMON_BATCH_SIZE?"
    assert "LUNAMON_FLUSH_INTERVAL" in warned["known"]
    assert "LUNAMON_SINKS" not in warned["known"]  # no variable for the sink tables
    assert all(name == name.upper() for name in warned["known"])
    assert warned["log_level"] == "warning"


def test_an_unknown_setting_is_refused_with_a_suggestion_when_there_is_one() -> None:
    assert problem(lambda: MonitoringSettings.from_mapping({"zzzzzz": 1})) == (
        "monitoring.zzzzzz",
        "unknown setting",
    )
    assert problem(lambda: MonitoringSettings.from_mapping({"batch_sise": 1})) == (
        "monitoring.batch_sise",
        "unknown setting (did you mean 'batch_size'?)",
    )
    error = settings_error(lambda: MonitoringSettings().replace(batch_sise=1))
    assert (error.source, error.key, error.problem) == (
        "setup()",
        "batch_sise",
        "unknown setting (did you mean 'batch_size'?)",
    )


def test_replace_checks_values_keeps_the_source_and_takes_sink_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_json(tmp_path, {"service": "svc"})
    loaded = MonitoringSettings.load(path, env={})
    replaced = loaded.replace(batch_size=10, buffer_size=10)
    assert (replaced.source, replaced.batch_size) == (str(path), 10)
    error = settings_error(lambda: loaded.replace(batch_size="x"))
    assert (error.source, error.key) == ("setup()", "batch_size")
    monkeypatch.setenv("SPARE_NAME", "spare")
    kept = SinkSettings("memory", {"name": "kept"})
    with_sinks = loaded.replace(sinks=[kept, {"type": "memory", "name_env": "SPARE_NAME"}])
    assert with_sinks.sinks[0] is kept
    assert with_sinks.sinks[1] == SinkSettings("memory", {"name": "spare"})
    bad = settings_error(lambda: loaded.replace(sinks=[kept, {"name": "x"}]))
    assert (bad.key, bad.problem) == (
        "sinks[1].type",
        "missing: every sink needs a type (options given: name)",
    )


def test_errors_of_a_file_name_it_as_given_normalised(tmp_path: Path) -> None:
    write_json(tmp_path, {"batch_size": "x"}, name="bad.json")
    write(tmp_path, "bad.yaml", "")
    write(tmp_path, "empty.toml", "title = 1\n")
    write(tmp_path, "broken.toml", "[monitoring\n")
    (tmp_path / "latin.toml").write_bytes(b"[monitoring]\nservice = '\xe9'\n")
    for name in ["bad.json", "bad.yaml", "empty.toml", "broken.toml", "latin.toml"]:
        given = f"{tmp_path}/./{name}"
        error = settings_error(lambda g=given: MonitoringSettings.load(g, env={}))  # type: ignore[misc]
        assert error.source == str(tmp_path / name), name
    write_json(tmp_path, [1], name="list.json")
    error = settings_error(lambda: MonitoringSettings.load(f"{tmp_path}/./list.json", env={}))
    assert (error.source, error.key, error.problem) == (
        str(tmp_path / "list.json"),
        "monitoring",
        "expected a table, got array",
    )


def test_an_error_from_a_default_names_the_key_the_file_did_not_set() -> None:
    # batch_size keeps its default (5000), which the given buffer_size cannot hold.
    assert problem(lambda: MonitoringSettings.from_mapping({"buffer_size": 10})) == (
        "monitoring.batch_size",
        "batch_size (5000) must not exceed buffer_size (10)",
    )


def test_an_error_inside_a_variable_names_the_variable_and_the_part() -> None:
    error = settings_error(lambda: MonitoringSettings.from_env({"LUNAMON_PATH_TAGS": "p=time"}))
    assert (error.key, error.problem) == (
        "environment variable LUNAMON_PATH_TAGS.p",
        "tag name 'time' is reserved by InfluxDB",
    )


def test_settings_loaded_is_logged_with_source_sinks_and_overrides() -> None:
    with capture_logs() as logs:
        MonitoringSettings.from_mapping(
            {"sinks": [{"type": "memory"}]},
            env={"LUNAMON_BATCH_SIZE": "10", "LUNAMON_BUFFER_SIZE": "20"},
            source="here",
        )
    assert [e for e in logs if e["event"] == "settings_loaded"] == [
        {
            "event": "settings_loaded",
            "source": "here",
            "enabled": True,
            "sinks": ["memory"],
            "env_overrides": ["LUNAMON_BATCH_SIZE", "LUNAMON_BUFFER_SIZE"],
            "log_level": "debug",
        }
    ]


class RefusingSink:
    """A sink type whose constructor refuses without naming an option."""

    def __init__(self) -> None:
        raise ValueError("refuses to work today")

    async def start(self) -> None: ...

    async def write(self, points: object) -> None: ...

    async def close(self) -> None: ...


def test_build_errors_name_the_sink_and_the_option_when_there_is_one() -> None:
    settings = MonitoringSettings.from_mapping(
        {"sinks": [{"type": "memory"}, {"type": f"{__name__}:RefusingSink"}]}, source="cfg"
    )
    error = settings_error(settings.build_sinks)
    assert (error.source, error.key) == ("cfg", "monitoring.sinks[1]")
    bad_port = MonitoringSettings.from_mapping({"sinks": [{"type": "influxdb", "port": 0}]})
    assert settings_error(bad_port.build_sinks).key == "monitoring.sinks[0].port"


def test_repr_shows_every_setting_readably() -> None:
    codes: Any = [404, "500-599"]
    text = repr(MonitoringSettings(exclude=("GET:/h",), failed_status_codes=codes))
    assert text.startswith("MonitoringSettings(enabled=True, service='luna-handlers', ")
    for part in [
        " exclude=('GET:/h',),",
        " failed_status_codes='404,500-599',",
        " path_tags={'handlerId': 'handler_id', 'verifierId': 'verifier_id'},",
        " max_retries=10,",
        " sinks=(), source='<settings>')",
    ]:
        assert part in text


def test_the_process_environment_default_shows_no_variable() -> None:
    from lunamon.settings import PROCESS_ENV

    assert repr(PROCESS_ENV) == "<process environment>"


@pytest.mark.parametrize(
    ("options", "key", "message"),
    [
        ({"metrics": 5}, "metrics", "expected a table ([monitoring.metrics]), got integer 5"),
        ({"metrics": {"prt": 1}}, "metrics.prt", "unknown setting (did you mean 'port'?)"),
        ({"metrics": {"path": "metrics"}}, "metrics.path",
         "expected a plain URL path such as '/metrics', got 'metrics'"),
        ({"metrics": {"path": "/a b"}}, "metrics.path",
         "expected a plain URL path such as '/metrics', got '/a b'"),
        ({"metrics": {"path": "  "}}, "metrics.path", "must not be empty"),
        ({"metrics": {"port": 65536}}, "metrics.port",
         "must be a port number (0 for none), got 65536"),
        ({"metrics": {"port": -1}}, "metrics.port", "must be >= 0, got -1"),
        ({"metrics": {"buckets": "1"}}, "metrics.buckets",
         "expected an array of bucket bounds in seconds, got string '1'"),
        ({"metrics": {"buckets": [1, "x"]}}, "metrics.buckets[1]",
         "expected a number of seconds, got string 'x'"),
        ({"metrics": {"buckets": []}}, "metrics.buckets", "needs at least one bucket bound"),
        ({"metrics": {"buckets": [2, 1]}}, "metrics.buckets",
         "bounds must increase strictly, got [2.0, 1.0]"),
        ({"metrics": {"extra_labels": 5}}, "metrics.extra_labels",
         "expected a table of label = value, got integer 5"),
        ({"metrics": {"extra_labels": {"1x": "a"}}}, "metrics.extra_labels",
         "'1x' is not a Prometheus label name"),
        ({"metrics": {"extra_labels": {"__x": "a"}}}, "metrics.extra_labels",
         "'__x' is not a Prometheus label name"),
        ({"metrics": {"extra_labels": {5: "a"}}}, "metrics.extra_labels",
         "5 is not a Prometheus label name"),
        ({"metrics": {"extra_labels": {"service": "a"}}}, "metrics.extra_labels.service",
         "label 'service' is set by lunamon itself; choose another name"),
        ({"metrics": {"extra_labels": {"dc": 5}}}, "metrics.extra_labels.dc",
         "expected a string, got integer 5"),
        ({"metrics": {"multiprocess_dir": 5}}, "metrics.multiprocess_dir",
         "expected a string (empty for none), got integer 5"),
        ({"server_timing_when": 5}, "server_timing_when",
         "expected 'Header: secret' (or ''), got integer 5"),
        ({"server_timing_when": "bad header: x"}, "server_timing_when",
         "'bad header' is not a valid HTTP header name"),
    ],
)  # fmt: skip
def test_metrics_and_server_timing_refusals_are_exact(
    options: dict[str, Any], key: str, message: str
) -> None:
    assert problem(lambda: MonitoringSettings(**options)) == (key, message)


def test_metrics_values_at_their_limits_are_accepted() -> None:
    table: Any = {"port": 65535, "path": "/aX", "extra_labels": {"dc_X": "eu"}}
    metrics = MonitoringSettings(metrics=table).metrics
    assert (metrics.port, metrics.path, dict(metrics.extra_labels)) == (
        65535,
        "/aX",
        {"dc_X": "eu"},
    )


def test_metrics_variables_override_the_file_table_key_by_key() -> None:
    from lunamon.settings import MetricsSettings

    env = {"LUNAMON_METRICS_PORT": "9100", "LUNAMON_BATCH_SIZE": "7"}  # metrics_ first
    for table in ({"enabled": True, "path": "/p"}, MetricsSettings(enabled=True, path="/p")):
        settings = MonitoringSettings.from_mapping({"metrics": table}, env=env)
        metrics = settings.metrics
        assert (metrics.enabled, metrics.path, metrics.port) == (True, "/p", 9100)
        assert settings.batch_size == 7  # and the variables after it are read too
    error = settings_error(lambda: MonitoringSettings.from_env({"LUNAMON_METRICS_BUCKETS": "a,b"}))
    assert (error.key, error.problem) == (
        "environment variable LUNAMON_METRICS_BUCKETS",
        "expected numbers separated by commas, got 'a,b'",
    )


def test_a_bad_bucket_bound_is_named_after_the_list_not_the_table(tmp_path: Path) -> None:
    # The item's index belongs to buckets, not to [monitoring.metrics].
    path = write(tmp_path, "lunamon.toml", "[monitoring.metrics]\nbuckets = [0.1, -1]\n")
    from_file = settings_error(lambda: MonitoringSettings.load(path, env=None))
    assert (from_file.source, from_file.key) == (str(path), "monitoring.metrics.buckets[1]")
    assert str(from_file) == (
        f"{path}: monitoring.metrics.buckets[1]: must be a finite number of seconds > 0, got -1"
    )
    from_mapping = settings_error(
        lambda: MonitoringSettings.from_mapping({"metrics": {"buckets": [0.1, "x"]}})
    )
    assert from_mapping.key == "monitoring.metrics.buckets[1]"
    assert str(from_mapping) == (
        "<mapping>: monitoring.metrics.buckets[1]: expected a number of seconds, got string 'x'"
    )


def test_a_bad_bucket_bound_in_the_variable_names_the_variable_and_the_item() -> None:
    env = {"LUNAMON_METRICS_BUCKETS": "0.1,-1"}
    # Alone, and replacing the buckets of the file's table: the error is the variable's.
    for table in ({}, {"buckets": [1, 2]}):
        error = settings_error(
            lambda t=table: MonitoringSettings.from_mapping({"metrics": t}, env=env)  # type: ignore[misc]
        )
        assert (error.key, error.problem) == (
            "environment variable LUNAMON_METRICS_BUCKETS[1]",
            "must be a finite number of seconds > 0, got -1.0",
        )
    assert str(settings_error(lambda: MonitoringSettings.from_env(env))) == (
        "<environment>: environment variable LUNAMON_METRICS_BUCKETS[1]:"
        " must be a finite number of seconds > 0, got -1.0"
    )


def test_metrics_errors_name_the_variable_only_for_what_it_set() -> None:
    env = {"LUNAMON_METRICS_BUCKETS": "1,0.5", "LUNAMON_METRICS_PATH": "/m"}
    unordered = settings_error(lambda: MonitoringSettings.from_env(env))
    assert (unordered.key, unordered.problem) == (
        "environment variable LUNAMON_METRICS_BUCKETS",
        "bounds must increase strictly, got [1.0, 0.5]",
    )
    table = {"port": -1}  # the file's mistake beside a good variable
    port = settings_error(
        lambda: MonitoringSettings.from_mapping(
            {"metrics": table}, env={"LUNAMON_METRICS_BUCKETS": "0.1,1"}
        )
    )
    assert (port.key, port.problem) == ("monitoring.metrics.port", "must be >= 0, got -1")


def test_only_metrics_variables_reach_the_metrics_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import lunamon.settings

    monkeypatch.setattr(lunamon.settings, "_warned_env", set())
    # "service_" is as long as "metrics_": LUNAMON_SERVICE_PORT is no metrics port.
    with capture_logs() as logs:
        settings = MonitoringSettings.from_env({"LUNAMON_SERVICE_PORT": "9100"})
    assert settings.metrics.port == 0
    assert [e["variable"] for e in logs if e["event"] == "unknown_environment_variable"] == [
        "LUNAMON_SERVICE_PORT"
    ]


def test_an_unknown_metrics_variable_gets_a_metrics_suggestion(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import lunamon.settings

    monkeypatch.setattr(lunamon.settings, "_warned_env", set())
    with capture_logs() as logs:
        MonitoringSettings.from_env({"LUNAMON_METRICS_PROT": "9100"})
    (warned,) = [e for e in logs if e["event"] == "unknown_environment_variable"]
    assert warned["hint"] == "did you mean LUNAMON_METRICS_PORT?"
    assert "LUNAMON_METRICS_PORT" in warned["known"]


def test_errors_of_a_file_and_its_variables_name_the_file_normalised(tmp_path: Path) -> None:
    write_json(tmp_path, {"batch_sise": 1}, name="unknown.json")
    write_json(tmp_path, {}, name="ok.json")
    for name, env in [("unknown.json", {}), ("ok.json", {"LUNAMON_BATCH_SIZE": "x"})]:
        given = f"{tmp_path}/./{name}"
        error = settings_error(lambda g=given, e=env: MonitoringSettings.load(g, env=e))  # type: ignore[misc]
        assert error.source == str(tmp_path / name), name


def test_a_key_splits_at_its_first_dot_or_bracket() -> None:
    from lunamon.settings import _split_key

    assert _split_key("metrics.extra_labels.x") == ("metrics", ".extra_labels.x")
    assert _split_key("sinks[0].url[1]") == ("sinks", "[0].url[1]")
    assert _split_key("metrics.buckets[1]") == ("metrics", ".buckets[1]")
    assert _split_key("port") == ("port", "")
    assert _split_key("") == ("", "")


def test_another_settings_key_named_like_a_metrics_variable_keeps_its_own_name() -> None:
    # path_tags.port is refused; LUNAMON_METRICS_PORT, also set, has nothing to do with it.
    env = {"LUNAMON_METRICS_PORT": "9100"}
    error = settings_error(
        lambda: MonitoringSettings.from_mapping({"path_tags": {"port": "service"}}, env=env)
    )
    assert error.key == "monitoring.path_tags.port"
