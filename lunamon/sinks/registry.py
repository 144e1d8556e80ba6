"""Sink types by name: built-ins, ``"pkg.module:Class"`` paths, ``lunamon.sinks`` entry points.

Nothing is imported until a sink is built: :func:`validate_sink_type` checks a
name without importing, :func:`create_sink` imports and constructs. A subclass
of LUNA's ``BaseRequestMonitoringPlugin`` is constructed with the application
and wrapped in a ``PluginSink``; any other class must be a :class:`Sink`.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import EntryPoint, entry_points
from types import MappingProxyType
from typing import Any, Final

from lunamon._log import logger
from lunamon._secrets import SinkOptions, is_secret_key, redact_secrets
from lunamon.errors import SettingsError
from lunamon.sinks.base import Sink, sink_name

__all__ = [
    "BUILTIN_SINKS",
    "ENTRY_POINT_GROUP",
    "available_sink_types",
    "check_options",
    "create_sink",
    "load_sink_type",
    "validate_sink_type",
]

ENTRY_POINT_GROUP: Final = "lunamon.sinks"

BUILTIN_SINKS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "clickhouse": "lunamon.sinks.clickhouse:ClickHouseSink",
        "file": "lunamon.sinks.file:LineProtocolFileSink",
        "influxdb": "lunamon.sinks.influxdb:InfluxDBSink",
        "influxdb_v2": "lunamon.sinks.influxdb_v2:InfluxDBV2Sink",
        "log": "lunamon.sinks.log:LogSink",
        "memory": "lunamon.sinks.memory:MemorySink",
    }
)

_PLUGIN_MODULE: Final = "lunamon.sinks.plugin"
_UNIONS: Final = (typing.Union, types.UnionType)
_SINK_METHODS: Final = ("start", "write", "close")


def _error(type_name: str, problem: str, *, key: str | None = None) -> SettingsError:
    return SettingsError(f"sink {type_name!r}: {problem}", key=key)


def _entry_points(name: str) -> list[EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP, name=name):
        found.setdefault(ep.value, ep)
    return list(found.values())


def available_sink_types() -> list[str]:
    """The built-in sink names and the names registered under ``lunamon.sinks``, sorted."""
    names = set(BUILTIN_SINKS)
    names.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def _split_path(type_name: str) -> tuple[str, str]:
    module, _, qualname = type_name.partition(":")
    if not (
        module
        and qualname
        and all(part.isidentifier() for part in module.split("."))
        and all(part.isidentifier() for part in qualname.split("."))
    ):
        raise SettingsError(f"{type_name!r} is not a 'package.module:Class' path", key="type")
    return module, qualname


def validate_sink_type(type_name: object) -> str:
    """Return ``type_name`` if it names a sink type lunamon can look up, else raise.

    Imports nothing: a ``"pkg.module:Class"`` path is checked for its form only.
    """
    if not isinstance(type_name, str) or not type_name.strip():
        shown = type(type_name).__name__ if not isinstance(type_name, str) else "an empty string"
        raise SettingsError(f"expected a sink type name, got {shown}", key="type")
    if type_name in BUILTIN_SINKS:
        return type_name
    if ":" in type_name:
        _split_path(type_name)
        return type_name
    if _entry_points(type_name):
        return type_name
    known = available_sink_types()
    hint = difflib.get_close_matches(type_name, known, n=1)
    problem = (
        f"unknown sink type {type_name!r}"
        + (f" (did you mean {hint[0]!r}?)" if hint else "")
        + f"; known: {', '.join(known)}, a 'package.module:Class' path,"
        f" or a name registered under the {ENTRY_POINT_GROUP!r} entry point group"
    )
    if "." in type_name:
        problem += (
            f" (for a class, write {type_name.rpartition('.')[0]}:{type_name.rpartition('.')[2]})"
        )
    raise SettingsError(problem, key="type")


def _import_path(path: str, type_name: str) -> Any:
    module_name, qualname = _split_path(path)
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise _error(
            type_name, f"cannot import {module_name!r}: {type(exc).__name__}: {exc}", key="type"
        ) from exc
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise _error(
                type_name, f"{module_name!r} has no attribute {qualname!r}", key="type"
            ) from None
    return obj


def load_sink_type(type_name: str) -> Callable[..., Any]:
    """Import the class (or factory) that ``type_name`` names."""
    validate_sink_type(type_name)
    target = BUILTIN_SINKS.get(type_name)
    if target is not None:
        obj = _import_path(target, type_name)
    elif ":" in type_name:
        obj = _import_path(type_name, type_name)
    else:
        found = _entry_points(type_name)
        if len(found) > 1:
            where = ", ".join(f"{ep.value} ({getattr(ep.dist, 'name', '?')})" for ep in found)
            raise _error(
                type_name, f"registered more than once under {ENTRY_POINT_GROUP!r}: {where}"
            )
        try:
            obj = found[0].load()
        except Exception as exc:
            raise _error(
                type_name,
                f"entry point {found[0].value!r} cannot be loaded: {type(exc).__name__}: {exc}",
                key="type",
            ) from exc
    if not callable(obj):
        raise _error(type_name, f"{obj!r} is not a class", key="type")
    return obj  # type: ignore[no-any-return]


def _plugin_classes() -> tuple[type, Any] | None:
    # A class can only subclass lunamon's BaseRequestMonitoringPlugin if its module
    # was imported: when it is not in sys.modules, no loaded class is a plugin.
    module = sys.modules.get(_PLUGIN_MODULE)
    base = getattr(module, "BaseRequestMonitoringPlugin", None)
    if not isinstance(base, type):
        return None
    return base, module.PluginSink  # type: ignore[union-attr]


def _missing_methods(obj: object) -> list[str]:
    return [
        name for name in _SINK_METHODS if not inspect.iscoroutinefunction(getattr(obj, name, None))
    ]


def _not_a_sink(type_name: str, obj: object, missing: Sequence[str]) -> SettingsError:
    what = obj.__qualname__ if isinstance(obj, type) else type(obj).__qualname__
    problem = (
        f"{what} is not a Sink: it needs async methods start(), write(points) and close()"
        f" (missing or not async: {', '.join(missing)})"
    )
    if hasattr(obj, "flushPointToMonitoring"):
        problem += (
            f"; a LUNA monitoring plugin must subclass {_PLUGIN_MODULE}.BaseRequestMonitoringPlugin"
        )
    return _error(type_name, problem, key="type")


def _check_options(
    factory: Callable[..., Any], args: tuple[Any, ...], options: Mapping[str, Any], type_name: str
) -> None:
    """Name the unknown or missing option before calling, instead of Python's TypeError."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*args, **options)
    except TypeError:
        pass
    else:
        return
    params = list(signature.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    taken = {p.name for p in positional[: len(args)]}
    accepted = [
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in taken
    ]
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        unknown = [name for name in options if name not in accepted]
        if unknown:
            hint = _suggest(unknown[0], accepted)
            raise _error(
                type_name,
                f"unknown option {unknown[0]!r}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; accepted: {', '.join(accepted) or 'none'}",
                key=unknown[0],
            )
    missing = [
        p.name
        for p in params
        if p.default is p.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in taken
        and p.name not in options
    ]
    if missing:
        raise _error(type_name, f"missing required option {missing[0]!r}", key=missing[0])


def _suggest(unknown: str, accepted: Sequence[str]) -> list[str]:
    """The accepted option ``unknown`` most likely meant: one it contains or that
    contains it (``hostname`` -> ``host``), else the closest spelling."""
    lowered = unknown.lower()
    within = [a for a in accepted if len(a) > 2 and (a in lowered or lowered in a)]
    if within:
        return [max(within, key=len)]
    return difflib.get_close_matches(unknown, accepted, n=1)


_SIMPLE: Final = (str, int, float, bool, type(None))
_KIND_NAMES: Final = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    type(None): "none",
}


def _check_types(factory: Callable[..., Any], options: Mapping[str, Any], type_name: str) -> None:
    """Refuse an option whose value does not have the annotated simple type
    (``password = 12345678`` for a ``str``); other annotations are not checked."""
    target = factory.__init__ if isinstance(factory, type) else factory  # type: ignore[misc]
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: nothing to check against
        return
    for name, value in options.items():
        hint = hints.get(name)
        if hint is None:
            continue
        members = typing.get_args(hint) if typing.get_origin(hint) in _UNIONS else (hint,)
        simple = [m for m in members if m in _SIMPLE]
        if not simple or len(simple) != len(members):
            continue  # Any, os.PathLike, classes: the sink checks them itself
        if any(_is(value, kind) for kind in simple):
            continue
        shown = "a secret" if is_secret_key(name) else repr(value)[:60]
        expected = " or ".join(_KIND_NAMES[k] for k in simple)
        got = type(value).__name__
        raise _error(type_name, f"{name} must be {expected}, got {got} ({shown})", key=name)


def _is(value: object, kind: type) -> bool:
    if kind is bool or value is None or kind is type(None):
        return type(value) is kind or (kind is type(None) and value is None)
    if isinstance(value, bool):
        return False  # True is an int to Python, not to a config file
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def check_options(type_name: str, options: Mapping[str, Any]) -> None:
    """Check ``options`` against the sink type's constructor, without constructing it:
    unknown, missing and mistyped options raise :class:`SettingsError` now."""
    factory = load_sink_type(type_name)
    plugin = _plugin_classes()
    args: tuple[Any, ...] = ()
    if plugin is not None and isinstance(factory, type) and issubclass(factory, plugin[0]):
        options = {k: v for k, v in options.items() if k != "name"}
        args = (None,)  # the application, given at build time
    _check_options(factory, args, options, type_name)
    _check_types(factory, options, type_name)


def _construction_error(
    exc: Exception, options: Mapping[str, Any], type_name: str
) -> SettingsError:
    text = redact_secrets(str(exc), options)
    named = [
        (m.start(), name) for name in options if (m := re.search(rf"\b{re.escape(name)}\b", text))
    ]
    key = min(named)[1] if named else None
    where = ""
    if not isinstance(exc, (TypeError, ValueError)):
        # Not a bad option but likely a bug in the sink: say where it happened.
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None:
            where = f" (at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})"
    return _error(type_name, f"cannot be created: {type(exc).__name__}: {text}{where}", key=key)


def _construct(
    factory: Callable[..., Any], args: tuple[Any, ...], options: SinkOptions, type_name: str
) -> Any:
    _check_options(factory, args, options, type_name)
    _check_types(factory, options, type_name)
    try:
        return factory(*args, **options)
    except Exception as exc:
        error = _construction_error(exc, options, type_name)
    # Raised outside the handler and unchained: the constructor's exception and
    # its frames (where the options are plain arguments) are left behind.
    raise error


def create_sink(type_name: str, options: Mapping[str, Any], *, app: Any = None) -> Sink:
    """Import sink type ``type_name`` and construct it with ``options``.

    A ``BaseRequestMonitoringPlugin`` subclass is constructed as ``cls(app, **options)``
    (``name`` goes to the ``PluginSink`` wrapping it). Errors are ``SettingsError``
    naming the sink and the option, with secret values shown as ``***``.
    """
    # Options live in lunamon's frames only as SinkOptions, whose repr masks secrets.
    options = SinkOptions(options)
    factory = load_sink_type(type_name)
    plugin = _plugin_classes()
    if plugin is not None and isinstance(factory, type) and issubclass(factory, plugin[0]):
        name = options.get("name")
        options = SinkOptions({k: v for k, v in options.items() if k != "name"})
        instance = _construct(factory, (app,), options, type_name)
        sink: object = plugin[1](instance, name=name)
    else:
        if isinstance(factory, type) and (missing := _missing_methods(factory)):
            raise _not_a_sink(type_name, factory, missing)
        sink = _construct(factory, (), options, type_name)
    if not isinstance(sink, Sink) or (missing := _missing_methods(sink)):
        raise _not_a_sink(type_name, sink, _missing_methods(sink))
    logger.debug("sink_created", type=type_name, sink=sink_name(sink))
    return sink
