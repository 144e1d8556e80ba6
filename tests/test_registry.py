"""The sink registry: built-ins, dotted paths, entry points, LUNA plugins, and its errors."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from lunamon.errors import SettingsError
from lunamon.point import Point
from lunamon.sinks.base import Sink
from lunamon.sinks.memory import MemorySink
from lunamon.sinks.registry import (
    BUILTIN_SINKS,
    ENTRY_POINT_GROUP,
    available_sink_types,
    create_sink,
    load_sink_type,
    validate_sink_type,
)

# --------------------------------------------------------------------------- sinks of this module


class RecordingSink:
    """A user sink with a required option and a keyword-only one."""

    def __init__(self, target: str, *, batch: int = 1, name: str | None = None) -> None:
        self.target = target
        self.batch = batch
        self.name = name
        self.points: list[Point] = []

    async def start(self) -> None: ...

    async def write(self, points: Sequence[Point]) -> None:
        self.points.extend(points)

    async def close(self) -> None: ...


class SyncSink:
    """Looks like a sink but its methods are not coroutines."""

    def start(self) -> None: ...

    def write(self, points: Sequence[Point]) -> None: ...

    async def close(self) -> None: ...


class LunaStylePlugin:
    """A LUNA plugin that does not subclass lunamon's base."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def flushPointToMonitoring(self, point: Point, logger: Any) -> None: ...


class BrokenSink(RecordingSink):
    def __init__(self, **options: Any) -> None:
        raise RuntimeError("driver not initialised")


class FlexibleSink(RecordingSink):
    def __init__(self, **options: Any) -> None:
        super().__init__("flexible")
        self.options = options


def make_sink(prefix: str = "m") -> MemorySink:
    """A factory function instead of a class."""
    return MemorySink(name=f"{prefix}-made")


def make_nothing() -> object:
    return object()


NOT_CALLABLE = 42
HERE = __name__


def settings_error(call: Callable[[], object]) -> SettingsError:
    try:
        call()
    except SettingsError as exc:
        return exc
    raise AssertionError("no SettingsError was raised")


# --------------------------------------------------------------------------- built-ins


def test_builtin_names() -> None:
    assert set(BUILTIN_SINKS) == {"clickhouse", "influxdb", "influxdb_v2", "file", "log", "memory"}
    assert set(BUILTIN_SINKS) <= set(available_sink_types())
    for name in BUILTIN_SINKS:
        assert validate_sink_type(name) == name


def test_memory() -> None:
    sink = create_sink("memory", {"name": "captured"})
    assert isinstance(sink, MemorySink)
    assert sink.name == "captured"
    assert create_sink("memory", {}).name == "memory"  # type: ignore[attr-defined]


def test_file_and_log(tmp_path: Path) -> None:
    file_module = pytest.importorskip("lunamon.sinks.file")
    log_module = pytest.importorskip("lunamon.sinks.log")
    file = create_sink("file", {"path": str(tmp_path / "p.lp"), "name": "lp"})
    assert isinstance(file, file_module.LineProtocolFileSink)
    assert (file.path, file.fsync, file.name) == (tmp_path / "p.lp", True, "lp")
    log = create_sink("log", {"level": "warning"})
    assert isinstance(log, log_module.LogSink)
    assert (log.level, log.event) == ("warning", "point")


def test_influxdb_builds_with_its_options() -> None:
    module = pytest.importorskip("lunamon.sinks.influxdb")
    sink = create_sink(
        "influxdb",
        {"host": "127.0.0.1", "port": 8087, "database": "db", "username": "u", "password": "pw-31"},
    )
    assert isinstance(sink, module.InfluxDBSink)
    assert (sink.host, sink.port, sink.database, sink.username) == ("127.0.0.1", 8087, "db", "u")
    assert "pw-31" not in repr(sink)


def test_builtin_constructor_errors_are_settings_errors() -> None:
    pytest.importorskip("lunamon.sinks.influxdb")
    error = settings_error(lambda: create_sink("influxdb", {"port": 0}))
    assert str(error).startswith("port: sink 'influxdb': cannot be created: ValueError: port")
    assert error.key == "port"
    # Never chained: the constructor's frames hold the options as plain arguments.
    assert error.__cause__ is None
    assert error.__context__ is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"port": "8086"}, "port must be an integer, got str ('8086')"),
        ({"port": True}, "port must be an integer, got bool (True)"),
        ({"timeout": "10"}, "timeout must be a number, got str ('10')"),
        ({"username": "u", "password": 12345678}, "password must be a string or none, got int"),
        ({"gzip": 1}, "gzip must be a boolean, got int (1)"),
    ],
)
def test_mistyped_options_are_refused_by_their_annotation(
    options: dict[str, object], message: str
) -> None:
    error = settings_error(lambda: create_sink("influxdb", options))
    assert message in str(error)
    assert "12345678" not in str(error)  # a secret's value is never shown


def test_an_unknown_option_suggests_the_option_it_contains() -> None:
    error = settings_error(lambda: create_sink("influxdb", {"hostname": "h"}))
    assert "unknown option 'hostname' (did you mean 'host'?)" in str(error)


def test_influxdb_v2_secret_in_a_rejected_url_is_masked() -> None:
    pytest.importorskip("lunamon.sinks.influxdb_v2")
    options = {"url": "ftp://luna:url-pw-4411@h", "org": "o", "bucket": "b", "token": "tk-5512"}
    error = settings_error(lambda: create_sink("influxdb_v2", options))
    assert "ftp://luna:***@h" in str(error)
    assert "url-pw-4411" not in str(error)
    assert error.__cause__ is None
    assert error.__context__ is None


# --------------------------------------------------------------------------- dotted paths


def test_dotted_path_class() -> None:
    sink = create_sink(f"{HERE}:RecordingSink", {"target": "t", "batch": 3, "name": "rec"})
    assert isinstance(sink, RecordingSink)
    assert (sink.target, sink.batch, sink.name) == ("t", 3, "rec")
    assert load_sink_type(f"{HERE}:RecordingSink") is RecordingSink


def test_dotted_path_factory_function() -> None:
    sink = create_sink(f"{HERE}:make_sink", {"prefix": "p"})
    assert isinstance(sink, MemorySink)
    assert sink.name == "p-made"


def test_nested_attribute_path() -> None:
    sink = create_sink("lunamon.sinks:memory.MemorySink", {})
    assert isinstance(sink, MemorySink)


def test_options_pass_through_var_keyword() -> None:
    sink = create_sink(f"{HERE}:FlexibleSink", {"anything": 1})
    assert isinstance(sink, FlexibleSink)
    assert sink.options == {"anything": 1}


@pytest.mark.parametrize(
    ("type_name", "options", "key", "fragment"),
    [
        (
            f"{HERE}:RecordingSink",
            {"target": "t", "bacth": 2},
            "bacth",
            "unknown option 'bacth' (did you mean 'batch'?); accepted: target, batch, name",
        ),
        (f"{HERE}:RecordingSink", {"batch": 2}, "target", "missing required option 'target'"),
        (
            f"{HERE}:make_nothing",
            {},
            "type",
            "object is not a Sink: it needs async methods start(), write(points) and close()"
            " (missing or not async: start, write, close)",
        ),
        (
            f"{HERE}:SyncSink",
            {},
            "type",
            "SyncSink is not a Sink: it needs async methods start(), write(points) and close()"
            " (missing or not async: start, write)",
        ),
        (
            f"{HERE}:LunaStylePlugin",
            {},
            "type",
            "a LUNA monitoring plugin must subclass"
            " lunamon.sinks.plugin.BaseRequestMonitoringPlugin",
        ),
        (f"{HERE}:NOT_CALLABLE", {}, "type", "42 is not a class"),
        (f"{HERE}:Missing", {}, "type", f"'{HERE}' has no attribute 'Missing'"),
        (
            "lunamon_no_such_module:Sink",
            {},
            "type",
            "cannot import 'lunamon_no_such_module': ModuleNotFoundError",
        ),
        (
            "memory",
            {"nmae": "x"},
            "nmae",
            "unknown option 'nmae' (did you mean 'name'?); accepted: name",
        ),
        ("nope", {}, "type", "unknown sink type 'nope'"),
    ],
)
def test_errors(type_name: str, options: dict[str, Any], key: str, fragment: str) -> None:
    error = settings_error(lambda: create_sink(type_name, options))
    assert error.key == key
    assert fragment in str(error)
    if type_name != "nope":
        assert f"sink {type_name!r}: " in str(error)


def test_unexpected_constructor_failure_says_where() -> None:
    error = settings_error(lambda: create_sink(f"{HERE}:BrokenSink", {}))
    assert "cannot be created: RuntimeError: driver not initialised (at " in str(error)
    assert f"{Path(__file__).name}:" in str(error)


def test_import_errors_keep_their_cause() -> None:
    error = settings_error(lambda: load_sink_type("lunamon_no_such_module:Sink"))
    assert isinstance(error.__cause__, ModuleNotFoundError)


def test_validate_sink_type_imports_nothing() -> None:
    assert (
        validate_sink_type("lunamon_not_imported_module:Sink") == "lunamon_not_imported_module:Sink"
    )
    assert "lunamon_not_imported_module" not in sys.modules


# --------------------------------------------------------------------------- LUNA plugins


@pytest.fixture
def plugin_class(monkeypatch: pytest.MonkeyPatch) -> type[Any]:
    """A LUNA-style plugin class, reachable as ``<this module>:RecordingPlugin``."""
    plugin_module = pytest.importorskip("lunamon.sinks.plugin")

    class RecordingPlugin(plugin_module.BaseRequestMonitoringPlugin):  # type: ignore[misc, name-defined]
        def __init__(self, app: Any, *, prefix: str = "") -> None:
            super().__init__(app)
            self.prefix = prefix
            self.points: list[Point] = []

        async def flushPointToMonitoring(self, point: Point, logger: Any) -> None:
            self.points.append(point)

    monkeypatch.setattr(sys.modules[__name__], "RecordingPlugin", RecordingPlugin, raising=False)
    return RecordingPlugin


async def test_plugin_is_built_with_the_app_and_wrapped(plugin_class: type[Any]) -> None:
    plugin_module = pytest.importorskip("lunamon.sinks.plugin")
    app = web.Application()
    sink = create_sink(f"{HERE}:RecordingPlugin", {"prefix": "p", "name": "luna"}, app=app)
    assert isinstance(sink, Sink)
    assert isinstance(sink, plugin_module.PluginSink)
    assert sink.name == "luna"
    plugin: Any = sink.plugin
    assert isinstance(plugin, plugin_class)
    assert plugin.app is app
    assert plugin.prefix == "p"
    point = Point("request", 1, {"service": "s"}, {"execution_time": 0.5})
    await sink.start()
    await sink.write([point])
    await sink.close()
    assert plugin.points == [point]


def test_plugin_option_errors(plugin_class: type[Any]) -> None:
    error = settings_error(lambda: create_sink(f"{HERE}:RecordingPlugin", {"prefx": "p"}))
    assert error.key == "prefx"
    assert "unknown option 'prefx' (did you mean 'prefix'?); accepted: prefix" in str(error)


def test_plugin_default_name(plugin_class: type[Any]) -> None:
    sink = create_sink(f"{HERE}:RecordingPlugin", {})
    assert sink.name == "RecordingPlugin"  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- entry points


def write_distribution(site: Path, dist: str, entry_points: str, module: str, code: str) -> None:
    """A minimal installed distribution: a module and a dist-info with entry_points.txt."""
    info = site / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(entry_points)
    (site / f"{module}.py").write_text(code)


SINK_MODULE_CODE = """\
from lunamon.sinks.memory import MemorySink


class EntryPointSink(MemorySink):
    def __init__(self, name=None, *, level=1):
        super().__init__(name)
        self.level = level


def broken():
    raise RuntimeError("never called")
"""


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    """A site directory on sys.path holding a distribution that registers sinks."""
    module = f"lunamon_ep_{uuid.uuid4().hex[:8]}"
    directory = tmp_path / "site"
    write_distribution(
        directory,
        f"{module}_dist",
        f"[{ENTRY_POINT_GROUP}]\n"
        f"ep_sink = {module}:EntryPointSink\n"
        f"ep_missing = {module}:Missing\n"
        f"ep_twice = {module}:EntryPointSink\n"
        "[other.group]\n"
        f"other_sink = {module}:EntryPointSink\n",
        module,
        SINK_MODULE_CODE,
    )
    monkeypatch.syspath_prepend(str(directory))
    yield directory, module
    sys.modules.pop(module, None)


def test_entry_point_sink(site: tuple[Path, str]) -> None:
    _, module = site
    assert {"ep_sink", "ep_missing", "ep_twice"} <= set(available_sink_types())
    assert "other_sink" not in available_sink_types()
    assert validate_sink_type("ep_sink") == "ep_sink"
    assert module not in sys.modules  # validating imported nothing
    sink = create_sink("ep_sink", {"name": "from-ep", "level": 3})
    assert type(sink).__module__ == module
    assert (sink.name, sink.level) == ("from-ep", 3)  # type: ignore[attr-defined]


def test_entry_point_errors(site: tuple[Path, str]) -> None:
    directory, module = site
    error = settings_error(lambda: create_sink("ep_missing", {}))
    assert f"entry point '{module}:Missing' cannot be loaded: AttributeError" in str(error)
    assert isinstance(error.__cause__, AttributeError)
    assert "unknown sink type 'other_sink'" in str(
        settings_error(lambda: create_sink("other_sink", {}))
    )
    # A second distribution registering the same name for another object is ambiguous;
    # the same object registered twice is not.
    write_distribution(
        directory,
        f"{module}_other",
        f"[{ENTRY_POINT_GROUP}]\nep_sink = {module}:broken\nep_twice = {module}:EntryPointSink\n",
        f"{module}_unused",
        "",
    )
    error = settings_error(lambda: create_sink("ep_sink", {}))
    assert f"registered more than once under '{ENTRY_POINT_GROUP}'" in str(error)
    assert f"{module}:EntryPointSink" in str(error)
    assert f"{module}:broken" in str(error)
    assert isinstance(create_sink("ep_twice", {}), MemorySink)


def test_builtins_win_over_entry_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = f"lunamon_ep_{uuid.uuid4().hex[:8]}"
    write_distribution(
        tmp_path,
        f"{module}_dist",
        f"[{ENTRY_POINT_GROUP}]\nmemory = {module}:EntryPointSink\n",
        module,
        SINK_MODULE_CODE,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert type(create_sink("memory", {})) is MemorySink
    assert module not in sys.modules
