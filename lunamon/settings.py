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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, NamedTuple

from lunamon._log import logger
from lunamon._secrets import SinkOptions, mask_secrets
from lunamon._validation import sanitize_tag_value, validate_key
from lunamon.errors import SettingsError
from lunamon.flusher import FlushPolicy
from lunamon.sinks.base import Sink
from lunamon.sinks.registry import check_options, create_sink, validate_sink_type

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    # tomli is only installed on 3.10 (setup.cfg); mypy may check for 3.10 without it.
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]


__all__ = [
    "DEFAULT_FAILED_STATUS_CODES",
    "DEFAULT_PATH_TAGS",
    "ENV_PREFIX",
    "LUNA_BUCKETS",
    "MetricsSettings",
    "MonitoringSettings",
    "PROCESS_ENV",
    "SettingsError",
    "SinkSettings",
]

ENV_PREFIX: Final = "LUNAMON_"
DEFAULT_FAILED_STATUS_CODES: Final = frozenset(range(400, 600))
DEFAULT_PATH_TAGS: Final[Mapping[str, str]] = MappingProxyType(
    {"handlerId": "handler_id", "verifierId": "verifier_id"}
)

# Tags every point already has: a path parameter must not overwrite them.
_RESERVED_TAGS: Final = frozenset({"service", "route", "status_code", "error_code"})
_HTTP_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_ENV_SUFFIX: Final = "_env"


def _scrubbed(error: SettingsError) -> SettingsError:
    # Frames below a public entry point hold the raw configuration (and so its
    # secrets): tracebacks rendered with locals (structlog's dict_tracebacks
    # default) would show them. The message says all a user needs.
    error.__traceback__ = None
    error.__context__ = None
    error.__cause__ = None
    return error


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


# A Server-Timing gate anyone could guess ("X-Debug-Timing: 1") shows every client the
# service's internals: the expected value must be a real secret.
MIN_TIMING_SECRET: Final = 16
_SECRET_HINT: Final = (
    "use at least 16 random characters, e.g. from"
    " `python -c 'import secrets; print(secrets.token_urlsafe(24))'`"
)


def _check_condition(value: object, key: str) -> str:
    """``""`` (every request), ``"Header: secret"`` (that header with that value), or
    ``"Header"`` alone, whose value then comes from ``server_timing_secret_file``."""
    if not isinstance(value, str):
        raise _fail(key, f"expected 'Header: secret' (or ''), got {_describe(value)}")
    name, _, expected = value.partition(":")
    if value.strip() and not _HTTP_TOKEN.fullmatch(name.strip()):
        raise _fail(key, f"{name.strip()!r} is not a valid HTTP header name")
    if expected.strip() and len(expected.strip()) < MIN_TIMING_SECRET:
        raise _fail(
            key,
            f"the value {name.strip()} must carry is too easy to guess: anyone sending it"
            f" would see the service's step times; {_SECRET_HINT}",
        )
    return f"{name.strip()}: {expected.strip()}" if expected.strip() else name.strip()


def _check_optional_path(value: object, key: str) -> str:
    """A file name, or ``""`` for none."""
    if not isinstance(value, str):
        raise _fail(key, f"expected a file name (or ''), got {_describe(value)}")
    return value.strip()


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
        check_options(self.type, self.options)  # errors now, at load, not at setup()

    def __repr__(self) -> str:
        return f"SinkSettings(type={self.type!r}, options={mask_secrets(self.options)!r})"

    def build(self, app: Any = None) -> Sink:
        """Import the sink type and construct it with the options (``app`` for LUNA plugins)."""
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


def _env_pairs(shape: str) -> Callable[[str], dict[str, str]]:
    """A reader of ``a=b,c=d`` variables; ``shape`` names the pair (``parameter=tag``)."""

    def read(text: str) -> dict[str, str]:
        pairs: dict[str, str] = {}
        for item in _env_list(text):
            left, sep, right = item.partition("=")
            if not sep:
                raise ValueError(
                    f"expected '{shape}' pairs separated by commas ({item!r} has no '=')"
                )
            pairs[left.strip()] = right.strip()
        return pairs

    return read


_env_path_tags = _env_pairs("parameter=tag")
_env_labels = _env_pairs("label=value")


def _env_text(text: str) -> str:
    return text.strip()


class _Spec(NamedTuple):
    """How one setting is checked, read from a ``LUNAMON_*`` variable, and documented."""

    check: Callable[[Any, str], Any]
    from_env: Callable[[str], object] | None
    doc: str
    example: str


def _at_least(minimum: int) -> Callable[[Any, str], int]:
    return lambda value, key: _check_int(value, key, minimum)


# --------------------------------------------------------------------------- metrics

LUNA_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
_LABEL: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# Labels lunamon's metrics set themselves.
_RESERVED_LABELS: Final = frozenset({"service", "path", "status_code", "error_code", "step", "le"})


def _check_path(value: object, key: str) -> str:
    text = _check_text(value, key)
    if not text.startswith("/") or any(c in text for c in "{}?# "):
        raise _fail(key, f"expected a plain URL path such as '/metrics', got {text!r}")
    return text


def _check_port(value: object, key: str) -> int:
    port = _check_int(value, key, 0)
    if port > 65535:
        raise _fail(key, f"must be a port number (0 for none), got {port}")
    return port


def _check_buckets(value: object, key: str) -> tuple[float, ...]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise _fail(key, f"expected an array of bucket bounds in seconds, got {_describe(value)}")
    bounds = tuple(_check_seconds(item, f"{key}[{i}]") for i, item in enumerate(value))
    if not bounds:
        raise _fail(key, "needs at least one bucket bound")
    if list(bounds) != sorted(set(bounds)):
        raise _fail(key, f"bounds must increase strictly, got {list(bounds)}")
    return bounds


def _check_labels(value: object, key: str) -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        raise _fail(key, f"expected a table of label = value, got {_describe(value)}")
    labels: dict[str, str] = {}
    for name, text in value.items():
        where = f"{key}.{name}"
        if not isinstance(name, str) or not _LABEL.fullmatch(name) or name.startswith("__"):
            raise _fail(key, f"{name!r} is not a Prometheus label name")
        if name in _RESERVED_LABELS:
            raise _fail(where, f"label {name!r} is set by lunamon itself; choose another name")
        if not isinstance(text, str):
            raise _fail(where, f"expected a string, got {_describe(text)}")
        labels[name] = text
    return MappingProxyType(labels)


def _check_optional_text(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise _fail(key, f"expected a string (empty for none), got {_describe(value)}")
    return value.strip()


def _check_instance(value: object, key: str) -> int:
    number = _check_int(value, key, -1)
    if number > 99:
        raise _fail(key, f"must be a replica number 0-99 (or -1 for none), got {number}")
    return number


def _env_floats(text: str) -> list[float]:
    try:
        return [float(item) for item in _env_list(text)]
    except ValueError:
        raise ValueError("expected numbers separated by commas") from None


_METRICS_SPECS: Final[Mapping[str, _Spec]] = MappingProxyType(
    {
        "enabled": _Spec(_check_bool, _env_bool, "serve Prometheus metrics", "enabled = true"),
        "path": _Spec(
            _check_path, _env_text, "where the app serves them (not recorded)", 'path = "/metrics"'
        ),
        "port": _Spec(_check_port, _env_int, "> 0: also served on a port of its own", "port = 0"),
        "host": _Spec(
            _check_text, _env_text, "the address that port listens on", 'host = "0.0.0.0"'
        ),
        "buckets": _Spec(
            _check_buckets,
            _env_floats,
            "bounds of the `requests` histogram in seconds (+Inf added)",
            "buckets = [0.005, 0.05, 0.5, 5.0]",
        ),
        "extra_labels": _Spec(
            _check_labels,
            _env_labels,
            "constant labels on every metric (`LUNAMON_METRICS_EXTRA_LABELS`: `k=v,...`)",
            'extra_labels = {datacenter = "eu-1"}',
        ),
        "steps": _Spec(
            _check_bool, _env_bool, "also a histogram of each `<step>_time`", "steps = false"
        ),
        "multiprocess_dir": _Spec(
            _check_optional_text,
            _env_text,
            "a folder the workers share: a scrape answers for all of them",
            'multiprocess_dir = "/run/luna-handlers/metrics"',
        ),
    }
)


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """``[monitoring.metrics]``: LUNA's Prometheus ``/metrics`` (off by default)."""

    enabled: bool = False
    path: str = "/metrics"
    port: int = 0
    host: str = "0.0.0.0"
    buckets: tuple[float, ...] = LUNA_BUCKETS
    extra_labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    steps: bool = False
    multiprocess_dir: str = ""

    def __post_init__(self) -> None:
        for name, spec in _METRICS_SPECS.items():
            object.__setattr__(self, name, spec.check(getattr(self, name), name))


def _check_metrics(value: object, key: str) -> MetricsSettings:
    if isinstance(value, MetricsSettings):
        return value
    if not isinstance(value, Mapping):
        raise _fail(key, f"expected a table ([monitoring.metrics]), got {_describe(value)}")
    unknown = [name for name in value if name not in _METRICS_SPECS]
    if unknown:
        raise _fail(f"{key}.{unknown[0]}", _unknown(unknown[0], _METRICS_SPECS))
    try:
        return MetricsSettings(**value)
    except SettingsError as exc:
        raise exc.relabel(key=f"{key}.{exc.key}", source=None) from None


# One entry per setting, in the order of MonitoringSettings' fields (a test checks
# that both name the same settings); the defaults live on the fields alone.
_SPECS: Final[Mapping[str, _Spec]] = MappingProxyType(
    {
        "enabled": _Spec(
            _check_bool, _env_bool, "false: record nothing, start no sink", "enabled = true"
        ),
        "service": _Spec(
            _check_service,
            _env_text,
            "the `service` tag of every point (`setup()` without `settings=` needs"
            " `service=` or `LUNAMON_SERVICE`: no default there)",
            'service = "luna-handlers"',
        ),
        "flush_interval": _Spec(
            _check_seconds,
            _env_float,
            "seconds between two flushes of a sink's buffer",
            "flush_interval = 1.0",
        ),
        "batch_size": _Spec(
            _at_least(1),
            _env_int,
            "points per write; a full batch is flushed at once",
            "batch_size = 5000",
        ),
        "buffer_size": _Spec(
            _at_least(1),
            _env_int,
            "points buffered per sink; when full the oldest are dropped (`overflow`)",
            "buffer_size = 100000",
        ),
        "shutdown_timeout": _Spec(
            _check_seconds,
            _env_float,
            "seconds the app's cleanup waits to drain the buffers",
            "shutdown_timeout = 5.0",
        ),
        "write_timeout": _Spec(
            _check_seconds,
            _env_float,
            "seconds one write of a batch may take before it counts as failed",
            "write_timeout = 60.0",
        ),
        "request_id_header": _Spec(
            _check_header,
            _env_text,
            "header carrying the request id, taken from the request and echoed",
            'request_id_header = "Luna-Request-Id"',
        ),
        "exclude": _Spec(
            _check_exclude,
            _env_list,
            "routes not recorded, as `METHOD:/template` (`LUNAMON_EXCLUDE`: comma-separated)",
            'exclude = ["GET:/healthcheck"]',
        ),
        "failed_status_codes": _Spec(
            _check_status_codes,
            _env_status_codes,
            "statuses that add an `error` point: codes and `low-high` ranges",
            'failed_status_codes = ["400-599"]',
        ),
        "path_tags": _Spec(
            _check_path_tags,
            _env_path_tags,
            "path parameters recorded as tags (`LUNAMON_PATH_TAGS`: `param=tag,...`)",
            'path_tags = {handlerId = "handler_id", verifierId = "verifier_id"}',
        ),
        "max_retries": _Spec(
            _at_least(0),
            _env_int,
            "retries of a failed batch before it is dropped (`retry_exhausted`)",
            "max_retries = 10",
        ),
        "retry_base_delay": _Spec(
            _check_seconds,
            _env_float,
            "first retry delay in seconds; doubles per retry, with jitter",
            "retry_base_delay = 0.5",
        ),
        "retry_max_delay": _Spec(
            _check_seconds,
            _env_float,
            "cap of the retry delay and of a server's `Retry-After`, in seconds",
            "retry_max_delay = 30.0",
        ),
        "server_timing": _Spec(
            _check_bool,
            _env_bool,
            "add a `Server-Timing` header (step times, total) to responses",
            "server_timing = false",
        ),
        "server_timing_when": _Spec(
            _check_condition,
            _env_text,
            "only for requests carrying this header and secret value (`Name: secret`,"
            " compared in constant time; the secret at least 16 characters); '' all",
            'server_timing_when = "X-Debug-Timing"',
        ),
        "server_timing_secret_file": _Spec(
            _check_optional_path,
            _env_text,
            "a file holding the value `server_timing_when`'s header must carry (then"
            " `server_timing_when` names the header alone)",
            'server_timing_secret_file = "/run/secrets/lunamon-timing"',
        ),
        "gc_freeze": _Spec(
            _check_bool,
            _env_bool,
            "when monitoring starts, `gc.freeze()` what is alive (once per process): no full"
            " garbage collection rescans the startup heap while the buffer fills",
            "gc_freeze = true",
        ),
        "slot_dir": _Spec(
            _check_optional_text,
            _env_text,
            "the folder where this host's processes lock their point-time slots; '' a"
            " folder per user in the temporary folder (a volume shared by replicas on one"
            " host makes them exact)",
            'slot_dir = "/run/lunamon-slots"',
        ),
        "instance": _Spec(
            _check_instance,
            _env_int,
            "0-99, unique per replica: point times of replicas never collide (its"
            " processes take slots 100 x instance on); -1 none (a random slot)",
            "instance = -1",
        ),
        "spool_dir": _Spec(
            _check_optional_text,
            _env_text,
            "a folder where each process keeps what its sinks have not stored yet: a process"
            " started later with the same folder delivers what a killed one left, each point"
            " once; '' none (a crash loses what is buffered)",
            'spool_dir = "/var/lib/luna-handlers/lunamon-spool"',
        ),
        "spool_max_bytes": _Spec(
            _at_least(65536),
            _env_int,
            "bytes of spool per process; beyond them its oldest points lose their"
            " protection against a crash (counted in `spool_stats()`)",
            "spool_max_bytes = 268435456",
        ),
        "metrics": _Spec(
            _check_metrics,
            None,
            "Prometheus metrics: the `[monitoring.metrics]` table below",
            "[monitoring.metrics]\nenabled = true",
        ),
        "sinks": _Spec(
            lambda value, key: _check_sinks(value, key),
            None,
            "where points go: `[[monitoring.sinks]]` tables (see the sink options below)",
            '[[monitoring.sinks]]\ntype = "influxdb"\nhost = "127.0.0.1"',
        ),
    }
)


class _ProcessEnvironment:
    """The default of ``env``: ``os.environ``, read when called, never shown by value."""

    def __repr__(self) -> str:
        return "<process environment>"


PROCESS_ENV: Final = _ProcessEnvironment()
EnvArg = Mapping[str, str] | _ProcessEnvironment | None
_warned_env: set[str] = set()
# LUNAMON_* variables read elsewhere (the encoder switch; the fault campaign's seed, in
# the tests), not settings: never warned as unknown.
_PROCESS_VARIABLES: Final = frozenset({"LUNAMON_PURE_PYTHON", "LUNAMON_FAULT_SEED"})


def _environment(env: EnvArg) -> Mapping[str, str] | None:
    return os.environ if isinstance(env, _ProcessEnvironment) else env


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class MonitoringSettings:
    """The ``[monitoring]`` section: what to monitor and where points go.

    The one source of options: a config file (:meth:`load`), a mapping
    (:meth:`from_mapping`), ``LUNAMON_*`` variables and ``setup()`` arguments
    (:meth:`replace`) all go through the same checks, and the defaults below are
    the only ones. A refused value raises ``SettingsError`` naming where it came from.
    """

    enabled: bool = True
    service: str = "luna-handlers"
    flush_interval: float = 1.0
    batch_size: int = 5000
    buffer_size: int = 100_000
    shutdown_timeout: float = 5.0
    write_timeout: float = 60.0
    request_id_header: str = "Luna-Request-Id"
    exclude: tuple[str, ...] = ()
    failed_status_codes: frozenset[int] = DEFAULT_FAILED_STATUS_CODES
    path_tags: Mapping[str, str] = field(default_factory=lambda: DEFAULT_PATH_TAGS, hash=False)
    max_retries: int = 10
    retry_base_delay: float = 0.5
    retry_max_delay: float = 30.0
    server_timing: bool = False
    server_timing_when: str = ""
    server_timing_secret_file: str = ""
    gc_freeze: bool = True
    slot_dir: str = ""
    instance: int = -1
    spool_dir: str = ""
    spool_max_bytes: int = 256 << 20
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    sinks: tuple[SinkSettings, ...] = ()
    # Where the settings came from (a file name); used in error messages.
    source: str = field(default="<settings>", init=False, compare=False)

    def __post_init__(self) -> None:
        for name, spec in _SPECS.items():
            object.__setattr__(self, name, spec.check(getattr(self, name), name))
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
        name, colon, _ = self.server_timing_when.partition(":")
        if self.server_timing_secret_file and colon:
            raise _fail(
                "server_timing_when",
                "give the header's name alone when server_timing_secret_file holds its value",
            )
        if name and not colon and not self.server_timing_secret_file:
            raise _fail(
                "server_timing_when",
                f"a header name alone ({name!r}) lets any client turn Server-Timing on and read"
                f" the service's step times: give '{name}: <secret>' (for example through"
                " LUNAMON_SERVER_TIMING_WHEN) or server_timing_secret_file",
            )

    def __repr__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "server_timing_when" and ":" in value:
                text = repr(value.partition(":")[0] + ": ***")
            elif f.name == "failed_status_codes":
                text = repr(_format_status_codes(value))
            elif f.name == "path_tags":
                text = repr(dict(value))
            else:
                text = repr(value)  # sinks mask their own secrets
            parts.append(f"{f.name}={text}")
        return f"MonitoringSettings({', '.join(parts)})"

    # ----------------------------------------------------------------- loading

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, env: EnvArg = PROCESS_ENV) -> MonitoringSettings:
        """Read the ``monitoring`` section of a ``.toml`` or ``.json`` file, then ``LUNAMON_*``.

        ``env`` defaults to the process environment; ``None`` reads none. A
        missing or unreadable file raises ``OSError``; anything wrong in it,
        ``SettingsError``. Keys of the file outside ``monitoring`` are ignored.
        """
        try:
            return cls._from_mapping(*_read_document(Path(path)), _environment(env))
        except SettingsError as exc:
            error = exc if exc.source else exc.relabel(key=exc.key, source=os.fspath(path))
        del env  # this frame stays in the traceback: no environment in it
        raise _scrubbed(error)

    @classmethod
    def from_mapping(
        cls,
        mapping: Mapping[str, Any],
        *,
        env: EnvArg = None,
        source: str = "<mapping>",
    ) -> MonitoringSettings:
        """Settings from the parsed ``monitoring`` section (or a whole document holding one).

        ``env`` supplies ``LUNAMON_*`` overrides and the variables named by
        ``<option>_env`` sink options (``PROCESS_ENV`` for the process's own);
        ``None``, the default, reads no environment at all.
        """
        try:
            return cls._from_mapping(mapping, source, _environment(env))
        except SettingsError as exc:
            error = exc if exc.source else exc.relabel(key=exc.key, source=source)
        del mapping, env  # this frame stays in the traceback: no raw configuration in it
        raise _scrubbed(error)

    @classmethod
    def from_env(cls, env: EnvArg = PROCESS_ENV) -> MonitoringSettings:
        """The defaults with the ``LUNAMON_*`` variables of ``env`` applied."""
        return cls.from_mapping({}, env=env, source="<environment>")

    def replace(self, **options: Any) -> MonitoringSettings:
        """A copy with ``options`` changed, checked exactly as a file's values are.

        ``setup(app, **options)`` goes through here. ``sinks`` takes
        :class:`SinkSettings` or sink tables as a file has them.
        """
        try:
            return self._replace(options)
        except SettingsError as exc:
            error = exc.relabel(key=exc.key, source=exc.source or "setup()")
        del options  # no raw configuration in the traceback
        raise _scrubbed(error)

    def _replace(self, options: Mapping[str, Any]) -> MonitoringSettings:
        values = {name: getattr(self, name) for name in _SPECS}
        for key, value in options.items():
            if key not in _SPECS:
                raise SettingsError(_unknown(key, _SPECS), key=key)
            if key == "sinks" and isinstance(value, (list, tuple)):
                value = tuple(
                    item
                    if isinstance(item, SinkSettings)
                    else _sink_from_table(item, f"sinks[{i}]", os.environ)
                    for i, item in enumerate(value)
                )
            values[key] = value
        settings = type(self)(**values)
        object.__setattr__(settings, "source", self.source)
        return settings

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
        kwargs: dict[str, Any] = {}
        labels: dict[str, str] = {}
        for key, value in mapping.items():
            label = f"monitoring.{key}"
            if key not in _SPECS:
                raise SettingsError(_unknown(key, _SPECS), key=label, source=source)
            kwargs[key] = _parse_sinks(value, label, env) if key == "sinks" else value
            labels[key] = label
        overrides = []
        metrics_env: dict[str, Any] = {}
        for name, text in (env or {}).items():
            if not name.startswith(ENV_PREFIX) or name != name.upper():
                continue
            key = name[len(ENV_PREFIX) :].lower()
            target, sub = kwargs, key
            spec = _SPECS.get(key)
            if spec is None and key.startswith("metrics_"):
                sub = key[len("metrics_") :]
                spec = _METRICS_SPECS.get(sub)
                target = metrics_env
            if spec is None or spec.from_env is None:
                if name not in _PROCESS_VARIABLES:
                    _warn_unknown_variable(name)
                continue
            label = f"environment variable {name}"
            try:
                target[sub] = spec.from_env(text)
            except ValueError as exc:
                problem = f"{exc}, got {text!r}"
            else:
                labels[key] = label
                overrides.append(name)
                continue
            raise SettingsError(problem, key=label, source=source)
        if metrics_env:
            base = kwargs.get("metrics", {})
            if isinstance(base, MetricsSettings):
                base = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
            if isinstance(base, Mapping):
                kwargs["metrics"] = {**base, **metrics_env}
        try:
            settings = cls(**kwargs)
        except SettingsError as exc:
            error = exc
        else:
            object.__setattr__(settings, "source", source)
            if not settings.metrics.enabled and set(metrics_env) - {"enabled"}:
                _warn_metrics_off(sorted(set(metrics_env) - {"enabled"}))
            logger.debug(
                "settings_loaded",
                source=source,
                enabled=settings.enabled,
                sinks=[s.type for s in settings.sinks],
                env_overrides=sorted(overrides),
            )
            return settings
        # Name the key as the user wrote it: the file's key path or the variable.
        head, rest = _split_key(error.key or "")
        where = labels.get(head, f"monitoring.{head}")
        if head == "metrics" and rest.startswith("."):
            sub, sub_rest = _split_key(rest[1:])
            if f"metrics_{sub}" in labels:  # set by LUNAMON_METRICS_<SUB>
                where, rest = labels[f"metrics_{sub}"], sub_rest
        raise error.relabel(key=where + rest, source=source)

    # ----------------------------------------------------------------- use

    def build_sinks(self, app: Any = None, *, source: str | None = None) -> list[Sink]:
        """Construct the configured sinks (not started). ``app`` is passed to LUNA plugins.

        A refusal names ``monitoring.sinks[i]`` of this settings' source, or ``sinks[i]``
        of ``source`` when the tables came from there (``setup()``).
        """
        sinks: list[Sink] = []
        for index, sink_settings in enumerate(self.sinks):
            try:
                sinks.append(sink_settings.build(app))
                continue
            except SettingsError as exc:
                error = exc
            label = ("" if source else "monitoring.") + f"sinks[{index}]"
            label += f".{error.key}" if error.key else ""
            raise error.relabel(key=label, source=source or self.source) from error.__cause__
        return sinks

    def flush_policy(self) -> FlushPolicy:
        """The batching, retry and drain settings as the flusher's :class:`FlushPolicy`."""
        return FlushPolicy(
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(FlushPolicy)}
        )


def _split_key(key: str) -> tuple[str, str]:
    """``key``'s first part and the rest, split at whichever of ``.`` or ``[`` comes first."""
    cut = min((i for i in (key.find("."), key.find("[")) if i >= 0), default=len(key))
    return key[:cut], key[cut:]


def _unknown(key: object, known: Iterable[str]) -> str:
    hint = difflib.get_close_matches(str(key), list(known), n=1)
    return "unknown setting" + (f" (did you mean {hint[0]!r}?)" if hint else "")


def _warn_metrics_off(keys: list[str]) -> None:
    """``LUNAMON_METRICS_*`` variables set while metrics stay off: they do nothing."""
    names = [f"{ENV_PREFIX}METRICS_{key.upper()}" for key in keys]
    if _warned_env.issuperset(names):
        return
    _warned_env.update(names)
    logger.warning(
        "metrics_variables_ignored",
        variables=names,
        detail=f"metrics are off: set {ENV_PREFIX}METRICS_ENABLED=true (or [monitoring.metrics]"
        " enabled = true) for these to take effect",
    )


def _warn_unknown_variable(name: str) -> None:
    """A ``LUNAMON_*`` variable that names no setting: warned once, not fatal (shared env)."""
    if name in _warned_env:
        return
    _warned_env.add(name)
    key = name[len(ENV_PREFIX) :].lower()
    known = [n for n, spec in _SPECS.items() if spec.from_env is not None]
    known += [f"metrics_{n}" for n, spec in _METRICS_SPECS.items() if spec.from_env is not None]
    hint = difflib.get_close_matches(key, known, n=1)
    logger.warning(
        "unknown_environment_variable",
        variable=name,
        hint=f"did you mean {ENV_PREFIX}{hint[0].upper()}?" if hint else None,
        known=[ENV_PREFIX + n.upper() for n in known],
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
