"""One source of options: a value is accepted or refused alike from a file,
from ``LUNAMON_*`` variables and from ``setup()`` keyword arguments."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from aiohttp import web

import lunamon
from lunamon import MonitoringSettings, SettingsError
from lunamon._reference import example, render
from lunamon.settings import _SPECS, MetricsSettings


class Case(NamedTuple):
    name: str
    toml: str  # the value as a file writes it
    env: str | None  # as a variable writes it (None: text cannot express it)
    python: Any  # as setup() takes it
    expected: Any  # the stored value (for a good case); unused for a bad one


GOOD = [
    Case("enabled", "false", "false", False, False),
    Case("service", '"luna-events"', "luna-events", "luna-events", "luna-events"),
    Case("flush_interval", "0.25", "0.25", 0.25, 0.25),
    Case("batch_size", "7", "7", 7, 7),
    Case("buffer_size", "70000", "70000", 70000, 70000),
    Case("shutdown_timeout", "2", "2", 2, 2.0),
    Case("write_timeout", "3.5", "3.5", 3.5, 3.5),
    Case("request_id_header", '"X-Request-Id"', "X-Request-Id", "X-Request-Id", "X-Request-Id"),
    # The first release's setup() kept 'get:/x' as given; a file upper-cased it.
    Case("exclude", '["get:/x", "GET:/x"]', "get:/x,GET:/x", ["get:/x", "GET:/x"], ("GET:/x",)),
    Case(
        "failed_status_codes",
        '[404, "500-502"]',
        "404,500-502",
        [404, "500-502"],
        frozenset({404, 500, 501, 502}),
    ),
    Case("path_tags", '{p = "param"}', "p=param", {"p": "param"}, {"p": "param"}),
    Case("max_retries", "0", "0", 0, 0),
    Case("retry_base_delay", "0.1", "0.1", 0.1, 0.1),
    Case("retry_max_delay", "60", "60", 60, 60.0),
    Case("server_timing", "true", "true", True, True),
    Case(
        "server_timing_when",
        '"X-Debug-Timing:0123456789abcdef"',
        "X-Debug-Timing:0123456789abcdef",
        "X-Debug-Timing:0123456789abcdef",
        "X-Debug-Timing: 0123456789abcdef",
    ),
    Case("server_timing_secret_file", '" /run/s "', "/run/s", "/run/s", "/run/s"),
    Case("gc_freeze", "false", "false", False, False),
    Case("slot_dir", '" /run/slots "', "/run/slots", "/run/slots", "/run/slots"),
    Case("instance", "7", "7", 7, 7),
    Case("spool_dir", '" /var/spool/x "', "/var/spool/x", "/var/spool/x", "/var/spool/x"),
    Case("spool_max_bytes", "1048576", "1048576", 1 << 20, 1 << 20),
    # A table: variables set its keys one by one (LUNAMON_METRICS_PORT, test_metrics.py).
    Case(
        "metrics",
        "{enabled = true, port = 9100}",
        None,
        {"enabled": True, "port": 9100},
        MetricsSettings(enabled=True, port=9100),
    ),
]

BAD = [
    Case("enabled", '"yes"', None, "yes", None),
    Case("service", '"svc\\\\"', "svc\\", "svc\\", None),
    Case("flush_interval", "-1.5", "-1.5", -1.5, None),
    Case("batch_size", "0", "0", 0, None),
    Case("buffer_size", "-3", "-3", -3, None),
    Case("shutdown_timeout", "0.0", "0.0", 0.0, None),
    Case("write_timeout", "-2.0", "-2.0", -2.0, None),
    Case("request_id_header", '"Bad Header"', "Bad Header", "Bad Header", None),
    Case("exclude", '["get"]', "get", ["get"], None),
    Case("failed_status_codes", "[700]", "700", [700], None),
    # The first release's setup() let a path parameter overwrite the service tag.
    Case("path_tags", '{p = "service"}', "p=service", {"p": "service"}, None),
    Case("max_retries", "-1", "-1", -1, None),
    Case("retry_base_delay", "-0.5", "-0.5", -0.5, None),
    Case("retry_max_delay", "-9.0", "-9.0", -9.0, None),
    Case("server_timing", '"yes"', None, "yes", None),
    Case("server_timing_when", '"Bad Header: 1"', "Bad Header: 1", "Bad Header: 1", None),
    Case(
        "server_timing_when", '"X-Debug-Timing: 1"', "X-Debug-Timing: 1", "X-Debug-Timing: 1", None
    ),
    Case("server_timing_secret_file", "3", None, 3, None),
    Case("gc_freeze", '"no"', None, "no", None),
    Case("slot_dir", "3", None, 3, None),
    Case("instance", "100", "100", 100, None),
    Case("spool_dir", "3", None, 3, None),
    Case("spool_max_bytes", "4096", "4096", 4096, None),
    Case("metrics", "{port = 70000}", None, {"port": 70000}, None),
]


def _from_file(tmp_path: Path, case: Case) -> MonitoringSettings:
    path = tmp_path / "service.toml"
    service = "" if case.name == "service" else 'service = "svc"\n'
    path.write_text(f"[monitoring]\n{service}{case.name} = {case.toml}\n")
    return MonitoringSettings.load(path, env={})


def _from_env(case: Case) -> MonitoringSettings:
    assert case.env is not None
    env = {"LUNAMON_SERVICE": "svc", f"LUNAMON_{case.name.upper()}": case.env}
    return MonitoringSettings.from_env(env)


def _from_setup(case: Case) -> MonitoringSettings:
    options = {"service": "svc", case.name: case.python}
    return lunamon.setup(web.Application(), sinks=[], **options).settings


def test_every_setting_has_a_case() -> None:
    settable = {name for name in _SPECS if name != "sinks"}
    assert {c.name for c in GOOD} == settable
    assert {c.name for c in BAD} == settable


@pytest.mark.parametrize("case", GOOD, ids=lambda c: c.name)
def test_a_good_value_is_taken_alike_three_ways(tmp_path: Path, case: Case) -> None:
    values = [getattr(_from_file(tmp_path, case), case.name), getattr(_from_setup(case), case.name)]
    if case.env is not None:
        values.append(getattr(_from_env(case), case.name))
    for value in values:
        assert value == case.expected
    assert getattr(MonitoringSettings(), case.name) != case.expected  # not the default


@pytest.mark.parametrize("case", BAD, ids=lambda c: c.name)
def test_a_bad_value_is_refused_alike_three_ways(tmp_path: Path, case: Case) -> None:
    ways: list[Callable[[], MonitoringSettings]] = [
        lambda: _from_file(tmp_path, case),
        lambda: _from_setup(case),
    ]
    if case.env is not None:
        ways.append(lambda: _from_env(case))
    problems = []
    for way in ways:
        with pytest.raises(SettingsError) as caught:
            way()
        problems.append(caught.value.problem)
    assert len(set(problems)) == 1, problems
    # Each says where the value came from.
    with pytest.raises(SettingsError, match=r"service\.toml: monitoring\."):
        _from_file(tmp_path, case)
    with pytest.raises(SettingsError, match=r"^setup\(\): "):
        _from_setup(case)


def test_setup_refuses_an_unknown_option_with_a_hint() -> None:
    with pytest.raises(SettingsError, match=r"unknown setting \(did you mean 'flush_interval'\?\)"):
        lunamon.setup(web.Application(), service="svc", sinks=[], flush_intervall=2.0)


def test_setup_takes_a_mapping_as_a_file_section() -> None:
    monitoring = lunamon.setup(
        web.Application(), settings={"service": "from-mapping", "batch_size": 3}, sinks=[]
    )
    assert (monitoring.settings.service, monitoring.settings.batch_size) == ("from-mapping", 3)
    with pytest.raises(SettingsError, match="batch_size: expected an integer"):
        lunamon.setup(web.Application(), settings={"service": "x", "batch_size": "3"}, sinks=[])


def test_setup_refuses_other_settings_objects_with_what_to_pass() -> None:
    with pytest.raises(TypeError, match=r"MonitoringSettings.*mapping"):
        lunamon.setup(web.Application(), settings=["service"], sinks=[])  # type: ignore[arg-type]


def test_setup_arguments_win_over_the_settings_they_are_given() -> None:
    base = MonitoringSettings(service="a", batch_size=10, buffer_size=10)
    monitoring = lunamon.setup(web.Application(), settings=base, sinks=[], batch_size=5)
    assert (monitoring.settings.service, monitoring.settings.batch_size) == ("a", 5)
    assert monitoring.policy.batch_size == 5  # the flusher runs on the same values


def test_unknown_variable_is_warned_with_a_suggestion() -> None:
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        settings = MonitoringSettings.from_env({"LUNAMON_FLUSH_INTERVALL": "9"})
    assert settings.flush_interval == 1.0
    warned = [e for e in logs if e["event"] == "unknown_environment_variable"]
    assert warned
    assert warned[0]["hint"] == "did you mean LUNAMON_FLUSH_INTERVAL?"


def test_the_pure_python_switch_is_not_an_unknown_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from structlog.testing import capture_logs

    import lunamon.settings

    monkeypatch.setattr(lunamon.settings, "_warned_env", set())
    with capture_logs() as logs:
        MonitoringSettings.from_env({"LUNAMON_PURE_PYTHON": "1", "LUNAMON_PURE_PYTHONN": "1"})
    warned = [e["variable"] for e in logs if e["event"] == "unknown_environment_variable"]
    assert warned == ["LUNAMON_PURE_PYTHONN"]


def test_metrics_variables_without_metrics_on_are_warned_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from structlog.testing import capture_logs

    import lunamon.settings

    monkeypatch.setattr(lunamon.settings, "_warned_env", set())
    env = {"LUNAMON_METRICS_PORT": "9100", "LUNAMON_METRICS_STEPS": "true"}
    with capture_logs() as logs:
        MonitoringSettings.from_env(env)
        MonitoringSettings.from_env(env)
        on = MonitoringSettings.from_env({**env, "LUNAMON_METRICS_ENABLED": "true"})
        MonitoringSettings.from_env({"LUNAMON_METRICS_ENABLED": "false"})
    assert on.metrics.port == 9100
    warned = [e for e in logs if e["event"] == "metrics_variables_ignored"]
    assert len(warned) == 1
    assert warned[0]["variables"] == ["LUNAMON_METRICS_PORT", "LUNAMON_METRICS_STEPS"]
    assert "LUNAMON_METRICS_ENABLED=true" in warned[0]["detail"]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "LUNAMON_METRICS_EXTRA_LABELS",
            "expected 'label=value' pairs separated by commas ('datacenter' has no '='),"
            " got 'datacenter'",
        ),
        (
            "LUNAMON_PATH_TAGS",
            "expected 'parameter=tag' pairs separated by commas ('datacenter' has no '='),"
            " got 'datacenter'",
        ),
    ],
)
def test_a_pair_variable_without_equals_says_so_once(name: str, message: str) -> None:
    with pytest.raises(SettingsError) as refused:
        MonitoringSettings.from_env({name: "datacenter"})
    assert refused.value.problem == message


def test_signatures_show_no_environment() -> None:
    import inspect

    assert "<process environment>" in str(inspect.signature(MonitoringSettings.load))
    assert "PATH" not in str(inspect.signature(MonitoringSettings.load))


def test_the_reference_page_is_generated_from_the_code() -> None:
    page = Path(__file__).parent.parent / "docs" / "configuration.md"
    assert page.read_text() == render(), "run: python -m lunamon._reference > docs/configuration.md"


def test_the_reference_example_loads(tmp_path: Path) -> None:
    path = tmp_path / "example.toml"
    path.write_text(example())
    settings = MonitoringSettings.load(path, env={})
    assert settings.exclude == ("GET:/healthcheck",)
    assert [s.type for s in settings.sinks] == ["influxdb"]


def test_help_shows_no_environment_value(monkeypatch: pytest.MonkeyPatch) -> None:
    import pydoc

    monkeypatch.setenv("INFLUX_PW", "s3cr3t-in-the-environment")
    text = pydoc.render_doc(lunamon) + pydoc.render_doc(lunamon.settings)
    assert "s3cr3t-in-the-environment" not in text
    assert "InfluxDBSink" in text  # every sink is part of the public face


def test_sink_tables_are_taken_and_refused_alike_by_a_file_and_setup(tmp_path: Path) -> None:
    log = tmp_path / "points.lp"
    path = tmp_path / "service.toml"
    path.write_text(
        f'[monitoring]\nservice = "svc"\n[[monitoring.sinks]]\ntype = "file"\npath = "{log}"\n'
    )
    table = {"type": "file", "path": str(log)}
    from_file = MonitoringSettings.load(path, env={}).sinks
    from_setup = lunamon.setup(web.Application(), service="svc", sinks=[table])
    assert from_setup.settings.sinks == from_file
    # Built from the table, as a file's would be.
    assert [type(sink).__name__ for sink in from_setup.sinks] == ["LineProtocolFileSink"]

    path.write_text(
        '[monitoring]\nservice = "svc"\n[[monitoring.sinks]]\ntype = "file"\nmode = 1\n'
    )
    with pytest.raises(SettingsError) as from_file_error:
        MonitoringSettings.load(path, env={})
    with pytest.raises(SettingsError, match=r"^setup\(\): sinks\[0\]") as from_setup_error:
        lunamon.setup(web.Application(), service="svc", sinks=[{"type": "file", "mode": 1}])
    assert from_setup_error.value.problem == from_file_error.value.problem


def test_setup_refuses_sink_objects_mixed_with_tables() -> None:
    with pytest.raises(
        TypeError, match=r"^sinks= takes sink objects or sink tables \(mappings\), not both$"
    ):
        lunamon.setup(
            web.Application(), service="svc", sinks=[lunamon.MemorySink(), {"type": "memory"}]
        )


def test_every_setting_has_a_spec_and_the_reverse() -> None:
    from dataclasses import fields

    assert list(_SPECS) == [f.name for f in fields(MonitoringSettings) if f.init]


PUBLIC = (
    "InfluxDBSink",
    "InfluxDBV2Sink",
    "ClickHouseSink",
    "LineProtocolFileSink",
    "LogSink",
    "MemorySink",
    "BaseRequestMonitoringPlugin",
)
INTERNAL = (
    "RequestRecorder",
    "validate_key",
    "validate_tag_value",
    "mask_secrets",
    "redact",
    "Secret",
)


def test_the_public_face_has_every_sink_and_no_internals() -> None:
    import pydoc

    text = pydoc.render_doc(lunamon, renderer=pydoc.plaintext)  # type: ignore[attr-defined]
    for name in PUBLIC:
        assert name in lunamon.__all__
        assert f"class {name}" in text
    for name in INTERNAL:
        assert not hasattr(lunamon, name), name
    import lunamon.sinks._http as http

    assert not hasattr(http, "__all__")  # a private module lists no API


def test_every_sink_example_of_the_reference_loads_and_builds(tmp_path: Path) -> None:
    from lunamon._reference import SINK_EXAMPLES, _sink_example
    from lunamon.sinks.registry import BUILTIN_SINKS

    assert set(SINK_EXAMPLES) == set(BUILTIN_SINKS)
    env = {"CLICKHOUSE_PASSWORD": "pw", "INFLUX_PASSWORD": "pw", "INFLUX_TOKEN": "tok"}
    for type_name, options in SINK_EXAMPLES.items():
        text = "\n".join(_sink_example(type_name, "Sink"))
        table = text.split("```toml\n", 1)[1].split("```", 1)[0]
        path = tmp_path / f"{type_name}.toml"
        here = str(tmp_path)
        path.write_text(f'[monitoring]\nservice = "svc"\n{table}'.replace("/var/log/luna", here))
        settings = MonitoringSettings.load(path, env=env)
        assert [s.type for s in settings.sinks] == [type_name]
        (sink,) = settings.build_sinks(web.Application())
        # The code example gives the same sink as the table (the sinks' reprs show their options).
        code = text.split("```python\n", 1)[1].split("```", 1)[0]
        namespace: dict[str, Any] = {"os": type("os", (), {"environ": env}), "lunamon": lunamon}
        code = code.split("\nlunamon.setup", 1)[0].replace("/var/log/luna", here)
        exec(code.replace("lunamon.Sink(", f"lunamon.{type(sink).__name__}("), namespace)
        assert repr(namespace["sink"]) == repr(sink), type_name
        assert options  # each example shows at least one option


def test_a_sink_table_given_to_setup_that_cannot_be_built_names_setup() -> None:
    table = {"type": "influxdb", "host": "influx.internal", "ssl": True, "password": "pw"}
    with pytest.raises(SettingsError) as caught:
        lunamon.setup(web.Application(), service="svc", sinks=[table])
    assert str(caught.value).startswith("setup(): sinks[0].password: ")
    assert "a password needs a username" in str(caught.value)
    assert "pw" not in str(caught.value).replace("password", "")
