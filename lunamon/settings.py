"""``MonitoringSettings``: the ``monitoring`` section of a TOML or JSON config file.

Loading reads and validates only: sink modules are imported, and sinks built,
by :meth:`MonitoringSettings.build_sinks`. ``LUNAMON_*`` environment variables
override the scalar settings. Secrets (sink options whose name contains
``password``, ``token``, ``secret``, ...) never appear in a ``repr``, an error
message or a log event: they are shown as ``***``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote

from lunamon._log import logger
from lunamon.point import sanitize_tag_value, validate_key

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    # tomli is only installed on 3.10 (setup.cfg); mypy may check for 3.10 without it.
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

if TYPE_CHECKING:
    from lunamon.flusher import FlushPolicy
    from lunamon.sinks.base import Sink

__all__ = [
    "DEFAULT_FAILED_STATUS_CODES",
    "DEFAULT_PATH_TAGS",
    "ENV_PREFIX",
    "MonitoringSettings",
    "SettingsError",
    "SinkOptions",
    "SinkSettings",
    "is_secret_key",
    "mask_secrets",
    "redact_secrets",
]

ENV_PREFIX: Final = "LUNAMON_"
DEFAULT_FAILED_STATUS_CODES: Final = frozenset(range(400, 600))
DEFAULT_PATH_TAGS: Final[Mapping[str, str]] = MappingProxyType(
    {"handlerId": "handler_id", "verifierId": "verifier_id"}
)
MASK: Final = "***"

# Tags every point already has: a path parameter must not overwrite them.
_RESERVED_TAGS: Final = frozenset({"service", "route", "status_code", "error_code"})
_SECRET_WORDS: Final = ("password", "passwd", "token", "secret", "authorization", "api_key")
_HTTP_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# `scheme://user:password@host`, and `?token=...` style query parameters.
_URL_USERINFO: Final = re.compile(
    r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^/@:\s]*:)(?P<pw>[^/@\s]+)@"
)
_URL_QUERY_SECRET: Final = re.compile(r"(?P<head>[?&](?P<key>[^=&#\s]+)=)(?P<value>[^&#\s]*)")
_ENV_SUFFIX: Final = "_env"


class SettingsError(ValueError):
    """Invalid monitoring settings. The message names the file and the key, never a secret."""

    def __init__(self, problem: str, *, key: str | None = None, source: str | None = None) -> None:
        self.problem = problem
        self.key = key
        self.source = source
        super().__init__(": ".join(part for part in (source, key, problem) if part))

    def relabel(self, *, key: str | None, source: str | None) -> SettingsError:
        """The same problem, reported for another key path and source."""
        return SettingsError(self.problem, key=key, source=source)


def _scrubbed(error: SettingsError) -> SettingsError:
    # Frames below a public entry point hold the raw configuration (and so its
    # secrets): tracebacks rendered with locals (structlog's dict_tracebacks
    # default) would show them. The message says all a user needs.
    error.__traceback__ = None
    error.__context__ = None
    error.__cause__ = None
    return error


# --------------------------------------------------------------------------- secrets


def is_secret_key(key: object) -> bool:
    """Whether an option named ``key`` holds a secret (its value is never shown)."""
    if not isinstance(key, str):
        return False
    lowered = key.lower()
    return any(word in lowered for word in _SECRET_WORDS)


def mask_secrets(options: Mapping[Any, Any]) -> dict[Any, Any]:
    """A copy of ``options`` safe to show: secret values and URL passwords become ``***``."""
    return {key: _mask_value(key, value) for key, value in options.items()}


def _mask_value(key: object, value: Any) -> Any:
    if value is None:
        return None
    if is_secret_key(key):
        return MASK
    if isinstance(value, str):
        return _mask_url(value)
    if isinstance(value, Mapping):
        return mask_secrets(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_mask_value(None, item) for item in value)
    return value


def _mask_url(text: str) -> str:
    if "://" in text:
        text = _URL_USERINFO.sub(lambda m: m["head"] + MASK + "@", text)
    if "=" in text:
        text = _URL_QUERY_SECRET.sub(
            lambda m: m["head"] + MASK if is_secret_key(m["key"]) else m[0], text
        )
    return text


def _secret_values(key: object, value: Any, secret: bool = False) -> Iterator[str]:
    secret = secret or is_secret_key(key)
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, Mapping):
        for sub_key, sub_value in value.items():
            yield from _secret_values(sub_key, sub_value, secret)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _secret_values(None, item, secret)
    elif secret:
        yield str(value)
    elif isinstance(value, str):
        found = [m["pw"] for m in _URL_USERINFO.finditer(value)]
        found += [m["value"] for m in _URL_QUERY_SECRET.finditer(value) if is_secret_key(m["key"])]
        for text in found:
            yield text
            yield unquote(text)  # as the sink may show it, decoded


def redact_secrets(text: str, options: Mapping[Any, Any]) -> str:
    """``text`` with every secret value of ``options`` replaced by ``***``."""
    secrets = sorted({s for s in _secret_values(None, options) if s}, key=len, reverse=True)
    for secret in secrets:
        text = text.replace(secret, MASK)
    return text


class SinkOptions(Mapping[str, Any]):
    """A read-only mapping of sink options whose ``repr`` masks secrets."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = dict(data)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return repr(mask_secrets(self._data))


# --------------------------------------------------------------------------- checks


def _describe(value: object) -> str:
    kind = {
        bool: "boolean",
        int: "integer",
        float: "float",
        str: "string",
        list: "array",
        tuple: "array",
        dict: "table",
    }.get(type(value), type(value).__name__)
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{kind} {text}"


def _kind(value: object) -> str:
    """The type of a value, without the value (it may hold a secret)."""
    return _describe(value).split(" ", 1)[0]


def _fail(key: str, problem: str) -> SettingsError:
    return SettingsError(problem, key=key)


def _check_bool(value: object, key: str) -> bool:
    if type(value) is not bool:
        raise _fail(key, f"expected a boolean (true or false), got {_describe(value)}")
    return value


def _check_int(value: object, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(key, f"expected an integer, got {_describe(value)}")
    if value < minimum:
        raise _fail(key, f"must be >= {minimum}, got {value}")
    return int(value)


def _check_seconds(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(key, f"expected a number of seconds, got {_describe(value)}")
    if not math.isfinite(value) or value <= 0:
        raise _fail(key, f"must be a finite number of seconds > 0, got {value!r}")
    return float(value)


def _check_text(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise _fail(key, f"expected a string, got {_describe(value)}")
    if not value.strip():
        raise _fail(key, "must not be empty")
    return str(value)


def _check_service(value: object, key: str) -> str:
    text = _check_text(value, key)
    if text != text.strip() or sanitize_tag_value(text) != text:
        raise _fail(
            key,
            f"{text!r} cannot be stored as an InfluxDB tag as given "
            "(surrounding spaces, a newline or a trailing backslash)",
        )
    return text


def _check_header(value: object, key: str) -> str:
    text = _check_text(value, key)
    if not _HTTP_TOKEN.fullmatch(text):
        raise _fail(key, f"{text!r} is not a valid HTTP header name")
    return text


def _check_exclude(value: object, key: str) -> tuple[str, ...]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise _fail(key, f"expected an array of 'METHOD:/route' strings, got {_describe(value)}")
    routes: dict[str, None] = {}
    for index, item in enumerate(value):
        where = f"{key}[{index}]"
        if not isinstance(item, str):
            raise _fail(where, f"expected a 'METHOD:/route' string, got {_describe(item)}")
        method, sep, route = item.strip().partition(":")
        if (
            not sep
            or not _HTTP_TOKEN.fullmatch(method)
            or not (route.startswith("/") or route == "<unmatched>")
        ):
            raise _fail(
                where,
                f"expected 'METHOD:/route' (a route template such as 'GET:/healthcheck',"
                f" or 'GET:<unmatched>'), got {item!r}",
            )
        routes[f"{method.upper()}:{route}"] = None
    return tuple(routes)


_STATUS_RANGE: Final = re.compile(r"\s*([0-9]{3})\s*(?:-\s*([0-9]{3})\s*)?")


def _check_status_codes(value: object, key: str) -> frozenset[int]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise _fail(
            key, f"expected an array of status codes and 'low-high' ranges, got {_describe(value)}"
        )
    codes: set[int] = set()
    for index, item in enumerate(value):
        where = f"{key}[{index}]"
        if isinstance(item, int) and not isinstance(item, bool):
            low = high = item
        elif isinstance(item, str) and (match := _STATUS_RANGE.fullmatch(item)):
            low = int(match[1])
            high = int(match[2] or match[1])
        else:
            raise _fail(
                where, f"expected a status code or a range such as '500-599', got {_describe(item)}"
            )
        if not 100 <= low <= high <= 599:
            raise _fail(where, f"expected status codes within 100-599, low <= high, got {item!r}")
        codes.update(range(low, high + 1))
    return frozenset(codes)


def _format_status_codes(codes: Iterable[int]) -> str:
    ranges: list[str] = []
    ordered = sorted(codes)
    start = 0
    for i in range(1, len(ordered) + 1):
        if i == len(ordered) or ordered[i] != ordered[i - 1] + 1:
            low, high = ordered[start], ordered[i - 1]
            ranges.append(str(low) if low == high else f"{low}-{high}")
            start = i
    return ",".join(ranges)


def _check_path_tags(value: object, key: str) -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        raise _fail(key, f"expected a table of path parameter = tag name, got {_describe(value)}")
    tags: dict[str, str] = {}
    for param, tag in value.items():
        where = f"{key}.{param}"
        if not isinstance(param, str) or not param or any(c in param for c in "{}/:"):
            raise _fail(key, f"{param!r} is not a path parameter name")
        if not isinstance(tag, str):
            raise _fail(where, f"expected a tag name, got {_describe(tag)}")
        try:
            validate_key(tag, "tag name")
        except (TypeError, ValueError) as exc:
            raise _fail(where, str(exc)) from None
        if tag in _RESERVED_TAGS:
            raise _fail(where, f"tag {tag!r} is set by lunamon itself; choose another name")
        tags[param] = tag
    return MappingProxyType(tags)


# --------------------------------------------------------------------------- sinks


@dataclass(frozen=True, slots=True)
class SinkSettings:
    """One ``[[monitoring.sinks]]`` entry: a sink ``type`` and its constructor ``options``.

    ``type`` is a built-in name (``influxdb``, ``influxdb_v2``, ``file``, ``log``,
    ``memory``), a ``"pkg.module:Class"`` path, or an entry point of the
    ``lunamon.sinks`` group; it is checked now, imported by :meth:`build`.
    """

    type: str
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        from lunamon.sinks.registry import validate_sink_type

        validate_sink_type(self.type)
        if not isinstance(self.options, Mapping):
            raise _fail(
                "options", f"expected a table of sink options, got {type(self.options).__name__}"
            )
        for key in self.options:
            if not isinstance(key, str) or not key:
                raise _fail("options", f"option names must be non-empty strings, got {key!r}")
            if key == "type":
                raise _fail("options", "'type' is not an option: it names the sink type")
        object.__setattr__(self, "options", SinkOptions(self.options))

    def __repr__(self) -> str:
        return f"SinkSettings(type={self.type!r}, options={mask_secrets(self.options)!r})"

    def build(self, app: Any = None) -> Sink:
        """Import the sink type and construct it with the options (``app`` for LUNA plugins)."""
        from lunamon.sinks.registry import create_sink

        return create_sink(self.type, self.options, app=app)


def _sink_from_table(table: object, key: str, env: Mapping[str, str] | None) -> SinkSettings:
    if not isinstance(table, Mapping):
        # The value itself is not shown: it may be a URL with credentials.
        raise _fail(
            key,
            f'expected a table of sink options with a "type", got {_kind(table)}',
        )
    if "type" not in table:
        keys = ", ".join(sorted(str(k) for k in table)) or "none"
        raise _fail(f"{key}.type", f"missing: every sink needs a type (options given: {keys})")
    options: dict[str, Any] = {}
    for name, value in table.items():
        if name == "type":
            continue
        if isinstance(name, str) and name.endswith(_ENV_SUFFIX) and len(name) > len(_ENV_SUFFIX):
            target = name[: -len(_ENV_SUFFIX)]
            if target in table:
                raise _fail(f"{key}.{name}", f"both {target!r} and {name!r} are set; use one")
            if not isinstance(value, str) or not value:
                raise _fail(
                    f"{key}.{name}",
                    f"expected the name of an environment variable, got {_describe(value)}",
                )
            if env is None or value not in env:
                raise _fail(f"{key}.{name}", f"environment variable {value!r} is not set")
            options[target] = env[value]
        else:
            options[name] = value
    try:
        return SinkSettings(table["type"], options)
    except SettingsError as exc:
        where = key if exc.key in (None, "options") else f"{key}.{exc.key}"
        raise exc.relabel(key=where, source=None) from None


def _check_sinks(value: object, key: str) -> tuple[SinkSettings, ...]:
    if isinstance(value, Mapping):
        raise _fail(key, "expected an array of tables ([[monitoring.sinks]]), got a single table")
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise _fail(key, f"expected an array of sink tables, got {_kind(value)}")
    sinks = tuple(value)
    for index, sink in enumerate(sinks):
        if not isinstance(sink, SinkSettings):
            raise _fail(
                f"{key}[{index}]",
                f"expected SinkSettings, got {type(sink).__name__}"
                " (config tables go through MonitoringSettings.from_mapping)",
            )
    return sinks


# --------------------------------------------------------------------------- environment


def _env_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected one of 1, 0, true, false, yes, no, on, off")


def _env_int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError("expected an integer") from None


def _env_float(text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ValueError("expected a number") from None


def _env_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _env_status_codes(text: str) -> list[int | str]:
    return [int(item) if item.isascii() and item.isdigit() else item for item in _env_list(text)]


def _env_path_tags(text: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for item in _env_list(text):
        param, sep, tag = item.partition("=")
        if not sep:
            raise ValueError(f"expected 'parameter=tag' pairs separated by commas, got {item!r}")
        tags[param.strip()] = tag.strip()
    return tags


def _env_text(text: str) -> str:
    return text.strip()


_ENV_PARSERS: Final[Mapping[str, Callable[[str], object]]] = {
    "enabled": _env_bool,
    "service": _env_text,
    "flush_interval": _env_float,
    "batch_size": _env_int,
    "buffer_size": _env_int,
    "shutdown_timeout": _env_float,
    "request_id_header": _env_text,
    "exclude": _env_list,
    "failed_status_codes": _env_status_codes,
    "path_tags": _env_path_tags,
    "max_retries": _env_int,
    "retry_base_delay": _env_float,
    "retry_max_delay": _env_float,
}


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class MonitoringSettings:
    """The ``[monitoring]`` section: what to monitor and where points go.

    Constructing one validates and normalises every value (``SettingsError``
    otherwise); :meth:`load` and :meth:`from_mapping` add the file's name and
    the key path to the error.
    """

    enabled: bool = True
    service: str = "luna-handlers"
    flush_interval: float = 1.0
    batch_size: int = 5000
    buffer_size: int = 100_000
    shutdown_timeout: float = 5.0
    request_id_header: str = "Luna-Request-Id"
    exclude: tuple[str, ...] = ()
    failed_status_codes: frozenset[int] = DEFAULT_FAILED_STATUS_CODES
    path_tags: Mapping[str, str] = field(default_factory=lambda: DEFAULT_PATH_TAGS, hash=False)
    max_retries: int = 10
    retry_base_delay: float = 0.5
    retry_max_delay: float = 30.0
    sinks: tuple[SinkSettings, ...] = ()
    # Where the settings came from (a file name); used in error messages.
    source: str = field(default="<settings>", init=False, compare=False)

    def __post_init__(self) -> None:
        checked: dict[str, object] = {
            "enabled": _check_bool(self.enabled, "enabled"),
            "service": _check_service(self.service, "service"),
            "flush_interval": _check_seconds(self.flush_interval, "flush_interval"),
            "batch_size": _check_int(self.batch_size, "batch_size", 1),
            "buffer_size": _check_int(self.buffer_size, "buffer_size", 1),
            "shutdown_timeout": _check_seconds(self.shutdown_timeout, "shutdown_timeout"),
            "request_id_header": _check_header(self.request_id_header, "request_id_header"),
            "exclude": _check_exclude(self.exclude, "exclude"),
            "failed_status_codes": _check_status_codes(
                self.failed_status_codes, "failed_status_codes"
            ),
            "path_tags": _check_path_tags(self.path_tags, "path_tags"),
            "max_retries": _check_int(self.max_retries, "max_retries", 0),
            "retry_base_delay": _check_seconds(self.retry_base_delay, "retry_base_delay"),
            "retry_max_delay": _check_seconds(self.retry_max_delay, "retry_max_delay"),
            "sinks": _check_sinks(self.sinks, "sinks"),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)
        if self.batch_size > self.buffer_size:
            raise _fail(
                "batch_size",
                f"batch_size ({self.batch_size}) must not exceed buffer_size ({self.buffer_size})",
            )
        if self.retry_base_delay > self.retry_max_delay:
            raise _fail(
                "retry_base_delay",
                f"retry_base_delay ({self.retry_base_delay}) must not exceed"
                f" retry_max_delay ({self.retry_max_delay})",
            )

    def __repr__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "failed_status_codes":
                text = repr(_format_status_codes(value))
            elif f.name == "path_tags":
                text = repr(dict(value))
            else:
                text = repr(value)  # sinks mask their own secrets
            parts.append(f"{f.name}={text}")
        return f"MonitoringSettings({', '.join(parts)})"

    # ----------------------------------------------------------------- loading

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, env: Mapping[str, str] | None = os.environ
    ) -> MonitoringSettings:
        """Read the ``monitoring`` section of a ``.toml`` or ``.json`` file, then ``LUNAMON_*``.

        A missing or unreadable file raises ``OSError``; anything wrong in it,
        ``SettingsError``. Keys of the file outside ``monitoring`` are ignored.
        """
        try:
            return cls._from_mapping(*_read_document(Path(path)), env)
        except SettingsError as exc:
            error = exc if exc.source else exc.relabel(key=exc.key, source=os.fspath(path))
        del env  # this frame stays in the traceback: no environment in it
        raise _scrubbed(error)

    @classmethod
    def from_mapping(
        cls,
        mapping: Mapping[str, Any],
        *,
        env: Mapping[str, str] | None = None,
        source: str = "<mapping>",
    ) -> MonitoringSettings:
        """Settings from the parsed ``monitoring`` section (or a whole document holding one).

        ``env`` supplies ``LUNAMON_*`` overrides and the variables named by
        ``<option>_env`` sink options; ``None`` reads no environment at all.
        """
        try:
            return cls._from_mapping(mapping, source, env)
        except SettingsError as exc:
            error = exc if exc.source else exc.relabel(key=exc.key, source=source)
        del mapping, env  # this frame stays in the traceback: no raw configuration in it
        raise _scrubbed(error)

    @classmethod
    def _from_mapping(
        cls, mapping: Mapping[str, Any], source: str, env: Mapping[str, str] | None
    ) -> MonitoringSettings:
        if isinstance(mapping, Mapping) and isinstance(mapping.get("monitoring"), Mapping):
            mapping = mapping["monitoring"]
        if not isinstance(mapping, Mapping):
            raise SettingsError(
                f"expected a table, got {_kind(mapping)}", key="monitoring", source=source
            )
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        kwargs: dict[str, Any] = {}
        labels: dict[str, str] = {}
        for key, value in mapping.items():
            label = f"monitoring.{key}"
            if key not in names:
                hint = difflib.get_close_matches(str(key), names, n=1)
                problem = "unknown setting" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                raise SettingsError(problem, key=label, source=source)
            kwargs[key] = _parse_sinks(value, label, env) if key == "sinks" else value
            labels[key] = label
        overrides = []
        for name, text in (env or {}).items():
            key = name[len(ENV_PREFIX) :].lower() if name.startswith(ENV_PREFIX) else ""
            parse = _ENV_PARSERS.get(key)
            if parse is None or name != name.upper():
                continue
            label = f"environment variable {name}"
            try:
                kwargs[key] = parse(text)
            except ValueError as exc:
                problem = f"{exc}, got {text!r}"
            else:
                labels[key] = label
                overrides.append(name)
                continue
            raise SettingsError(problem, key=label, source=source)
        try:
            settings = cls(**kwargs)
        except SettingsError as exc:
            error = exc
        else:
            object.__setattr__(settings, "source", source)
            logger.debug(
                "settings_loaded",
                source=source,
                enabled=settings.enabled,
                sinks=[s.type for s in settings.sinks],
                env_overrides=sorted(overrides),
            )
            return settings
        # Name the key as the user wrote it: the file's key path or the variable.
        head, bracket, rest = (error.key or "").partition("[")
        head, dot, tail = head.partition(".")
        where = labels.get(head, f"monitoring.{head}") + bracket + rest + dot + tail
        raise error.relabel(key=where, source=source)

    # ----------------------------------------------------------------- use

    def build_sinks(self, app: Any = None) -> list[Sink]:
        """Construct the configured sinks (not started). ``app`` is passed to LUNA plugins."""
        sinks: list[Sink] = []
        for index, sink_settings in enumerate(self.sinks):
            try:
                sinks.append(sink_settings.build(app))
                continue
            except SettingsError as exc:
                error = exc
            label = f"monitoring.sinks[{index}]" + (f".{error.key}" if error.key else "")
            raise error.relabel(key=label, source=self.source) from error.__cause__
        return sinks

    def flush_policy(self) -> FlushPolicy:
        """The batching, retry and drain settings as the flusher's :class:`FlushPolicy`."""
        from lunamon.flusher import FlushPolicy

        return FlushPolicy(
            flush_interval=self.flush_interval,
            batch_size=self.batch_size,
            buffer_size=self.buffer_size,
            shutdown_timeout=self.shutdown_timeout,
            max_retries=self.max_retries,
            retry_base_delay=self.retry_base_delay,
            retry_max_delay=self.retry_max_delay,
        )


def _read_document(path: Path) -> tuple[Any, str]:
    """The ``monitoring`` section of a config file, and the file's name for messages."""
    source = str(path)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise SettingsError(
            f"unsupported file type {path.suffix!r}: expected .toml or .json", source=source
        )
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        problem = f"not UTF-8 text ({exc.reason} at byte {exc.start})"
    else:
        problem = ""
    if problem:
        raise SettingsError(problem, source=source)
    document: Any = None
    # Parser messages give a position, never the text around it.
    try:
        if suffix == ".toml":
            document = tomllib.loads(text)
        else:
            document = json.loads(text, object_pairs_hook=_json_object)
    except tomllib.TOMLDecodeError as exc:
        problem = f"invalid TOML: {exc}"
    except json.JSONDecodeError as exc:
        problem = f"invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
    except _DuplicateKeyError as exc:
        problem = f"invalid JSON: duplicate key {exc.args[0]!r}"
    if problem:
        raise SettingsError(problem, source=source)
    if not isinstance(document, Mapping) or "monitoring" not in document:
        where = "[monitoring] table" if suffix == ".toml" else '"monitoring" object'
        raise SettingsError(f"missing: the file needs a {where}", key="monitoring", source=source)
    return document["monitoring"], source


def _parse_sinks(
    value: object, label: str, env: Mapping[str, str] | None
) -> tuple[SinkSettings, ...]:
    if isinstance(value, Mapping):
        raise _fail(label, "expected an array of tables ([[monitoring.sinks]]), got a single table")
    if not isinstance(value, (list, tuple)):
        raise _fail(label, f"expected an array of sink tables, got {_kind(value)}")
    return tuple(
        _sink_from_table(table, f"{label}[{index}]", env) for index, table in enumerate(value)
    )


class _DuplicateKeyError(ValueError):
    pass


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(key)
        result[key] = value
    return result
