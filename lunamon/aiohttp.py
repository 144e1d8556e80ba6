"""aiohttp integration: ``setup`` and ``monitor_request``.

``setup(app, service=..., **options)`` installs the recorder as the app's first
middleware (or, with ``middleware=False``, leaves it to the handlers decorated
with :func:`monitor_request`) and ties delivery to the app's lifecycle.
"""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web
from aiohttp.typedefs import Middleware

from lunamon._recorder import ErrorCodeGetter, RequestRecorder
from lunamon.collector import current
from lunamon.errors import SettingsError
from lunamon.monitoring import Monitoring
from lunamon.point import compiled_speedups
from lunamon.settings import ENV_PREFIX, MonitoringSettings, SinkSettings
from lunamon.sinks.base import Sink

if TYPE_CHECKING:
    from lunamon.metrics import MetricsSink

__all__ = ["MONITORING_KEY", "monitor_request", "setup"]

MONITORING_KEY: Final = web.AppKey("lunamon_monitoring", Monitoring)
RECORDER_KEY: Final = web.AppKey("lunamon_recorder", RequestRecorder)

_current_get = current.get
_compiled = compiled_speedups()  # @monitor_request's common call compiled, when built


def _find_recorder(request: web.Request) -> RequestRecorder | None:
    recorder = request.app.get(RECORDER_KEY)
    if recorder is None:
        recorder = request.config_dict.get(RECORDER_KEY)
    return recorder


def _call_through(
    func: Callable[..., Awaitable[web.StreamResponse]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    _request: web.Request,
) -> Awaitable[web.StreamResponse]:
    """``func`` called with its own arguments, as the recorder calls a handler (with the
    request): bound with :func:`functools.partial` for a view method or extra arguments."""
    return func(*args, **kwargs)


def _monitored(func: Callable[..., Awaitable[web.StreamResponse]]) -> Any:
    """``func`` (a handler function or a ``web.View`` method) run as a monitored request.

    A ``functools.wraps`` wrapper rather than wrapt's: wrapt 2.5 probes
    ``__self__`` on every call (~1.4 µs), and a handler needs no descriptor magic.
    With the extension built it is ``_speedups.MonitoredHandler`` around this
    coroutine function (the reference), which calls the middleware itself for
    ``handler(request)`` with a request of the app in ``last``.
    """

    # The app this handler last served and its recorder's middleware (an app's recorder
    # never changes once it serves): no Application.get per request.
    last: list[Any] = [None, None]

    async def monitored_handler(*args: Any, **kwargs: Any) -> web.StreamResponse:
        if len(args) == 1 and not kwargs and type(args[0]) is web.Request:  # handler(request)
            plain: web.Request = args[0]
            if _current_get() is None:
                app = plain.app
                if app is last[0]:
                    middleware: Middleware | None = last[1]
                else:
                    recorder = _find_recorder(plain)
                    middleware = None if recorder is None else recorder.middleware
                    if middleware is not None:
                        last[0], last[1] = app, middleware
                if middleware is not None:
                    return await middleware(plain, func)
            return await func(plain)
        # A web.View's method, more arguments, a subclass of web.Request: the handler is
        # called with its own arguments once the recorder runs.
        first = args[0] if args else kwargs.get("request")
        request = first.request if isinstance(first, web.View) else first
        if not isinstance(request, web.Request) or _current_get() is not None:
            return await func(*args, **kwargs)
        found = _find_recorder(request)
        if found is None:
            return await func(*args, **kwargs)
        return await found.middleware(request, functools.partial(_call_through, func, args, kwargs))

    # functools.wraps called, not used as a decorator: mutmut mutates undecorated code only.
    reference = functools.wraps(func)(monitored_handler)
    if _compiled is None:
        return reference
    # inspect sees a coroutine function by its __code__ (the reference's), as it sees a
    # Cython function.
    compiled = _compiled.MonitoredHandler(func, reference, last, web.Request)
    return functools.wraps(func)(compiled)


def monitor_request(func: Any = None) -> Any:
    """Monitor one route handler (a function, or a ``web.View`` method).

    For services that monitor only some routes, or that skip aiohttp's
    middleware machinery (``setup(..., middleware=False)``). Inside a request
    already monitored by the middleware it only calls through.
    """
    if func is None:
        return _monitored
    return _monitored(func)


def _base_settings(settings: object, options: Mapping[str, Any]) -> MonitoringSettings:
    if isinstance(settings, MonitoringSettings):
        return settings
    if settings is None:
        if "service" not in options and f"{ENV_PREFIX}SERVICE" not in os.environ:
            raise SettingsError(
                "a service name is needed: setup(app, service='luna-handlers')",
                key="service",
                source="setup()",
            )
        return MonitoringSettings.from_env()
    if isinstance(settings, Mapping):
        return MonitoringSettings.from_mapping(
            settings, env=os.environ, source="setup(settings=...)"
        )
    raise TypeError(
        "settings= takes a MonitoringSettings (MonitoringSettings.load('monitoring.toml'))"
        f" or a mapping shaped like the [monitoring] section, not {type(settings).__name__}"
    )


def setup(
    app: web.Application,
    *,
    settings: MonitoringSettings | Mapping[str, Any] | None = None,
    sinks: Iterable[Sink | Mapping[str, Any] | SinkSettings] | None = None,
    middleware: bool = True,
    error_code: ErrorCodeGetter | None = None,
    server_timing_allow: Callable[[web.Request], object] | None = None,
    **options: Any,
) -> Monitoring:
    """Monitor every request of ``app`` (or, with ``middleware=False``, the handlers
    decorated with :func:`monitor_request`).

    ``options`` are the settings of the ``[monitoring]`` section (``service``,
    ``exclude``, ``flush_interval``, ...: docs/configuration.md), checked as
    a file's are (``None`` means not given). They win over ``settings``: a
    :class:`MonitoringSettings`, or a mapping shaped like the section; without
    it the ``LUNAMON_*`` variables are read. ``sinks`` are sink objects, or sink
    tables as a file has them (``{"type": "influxdb", "url": ...}``, checked as a
    file's are), used instead of the configured ones; with neither, points go to an InfluxDB 1.x
    at ``localhost:8086``, database ``luna_monitoring`` (LUNA's default).
    ``error_code(request, response_or_exception)`` supplies an error code when
    neither the exception nor a JSON body has one. ``server_timing_allow(request)``
    decides which requests get a ``Server-Timing`` header (with ``server_timing``; after
    ``server_timing_when``'s secret header, when both are set). Sinks start on app startup
    and are drained on cleanup.
    """
    if not isinstance(app, web.Application):
        raise TypeError(f"setup() needs an aiohttp.web.Application, not {type(app).__name__}")
    if MONITORING_KEY in app:
        raise RuntimeError("lunamon.setup() was already called for this application")
    if error_code is not None and not callable(error_code):
        raise TypeError("error_code= takes a callable (request, response_or_exception) -> int")
    if server_timing_allow is not None and not callable(server_timing_allow):
        raise TypeError("server_timing_allow= takes a callable (request) -> bool")
    options = {key: value for key, value in options.items() if value is not None}
    sinks, options = _sink_objects(sinks, options)
    config = _base_settings(settings, options)
    if options:
        config = config.replace(**options)
    # Sink tables given to setup() are refused as setup()'s, not as the environment's.
    sink_list = _sinks(app, config, sinks, "setup()" if "sinks" in options else None)
    metrics = None
    if config.enabled and config.metrics.enabled:
        metrics = _metrics_sink(config, app)
        sink_list.append(metrics)
        path = config.metrics.path  # the scrape is not a request of the service
        config = config.replace(exclude=(*config.exclude, f"GET:{path}", f"HEAD:{path}"))
    monitoring = Monitoring(config, sink_list)
    monitoring.metrics = metrics
    app[MONITORING_KEY] = monitoring
    if not config.enabled:
        return monitoring
    recorder = RequestRecorder(monitoring, config, error_code, server_timing_allow)
    app[RECORDER_KEY] = recorder
    if middleware:
        app.middlewares.insert(0, recorder.middleware)
    app.on_response_prepare.append(recorder.prepare_hook)
    if metrics is not None:
        from lunamon.metrics import MetricsPort, add_metrics_route, check_metrics_route

        add_metrics_route(app, metrics.settings.path, metrics)

    async def lunamon_lifecycle(_app: web.Application) -> AsyncIterator[None]:
        if metrics is not None:
            check_metrics_route(app, config.metrics.path)  # the app's, added after setup()
        await monitoring.start()
        port = None
        if metrics is not None and config.metrics.port:
            port = MetricsPort(metrics)
            try:
                await port.start()
            except BaseException:
                await monitoring.close()
                raise
        yield
        if port is not None:
            await port.close()
        await monitoring.close()

    app.cleanup_ctx.append(lunamon_lifecycle)
    return monitoring


def _sink_objects(
    sinks: Iterable[Any] | None, options: dict[str, Any]
) -> tuple[list[Sink] | None, dict[str, Any]]:
    """Sink objects as they are; sink tables go with the options, to be checked as a file's."""
    if sinks is None:
        return None, options
    items = list(sinks)
    tables = [item for item in items if isinstance(item, (Mapping, SinkSettings))]
    if not tables:
        return items, options
    if len(tables) < len(items):
        raise TypeError("sinks= takes sink objects or sink tables (mappings), not both")
    return None, {**options, "sinks": tables}


def _metrics_sink(config: MonitoringSettings, app: web.Application) -> MetricsSink:
    """The metrics sink, once its folder and its path are known to be usable."""
    try:
        from lunamon.metrics import MetricsSink, check_metrics_route
    except ImportError as exc:
        raise ImportError(
            f"[monitoring.metrics] needs prometheus_client ({exc}): pip install 'lunamon[metrics]'"
        ) from None
    check_metrics_route(app, config.metrics.path)  # before setup() changes anything
    return MetricsSink(config.metrics)


def _sinks(
    app: web.Application,
    config: MonitoringSettings,
    sinks: Iterable[Sink] | None,
    source: str | None = None,
) -> list[Sink]:
    if not config.enabled:
        return []
    if sinks is not None:
        sink_list = list(sinks)
    elif config.sinks:
        sink_list = config.build_sinks(app, source=source)
    else:
        from lunamon.sinks.influxdb import InfluxDBSink

        sink_list = [InfluxDBSink()]
    for sink in sink_list:
        if not isinstance(sink, Sink):
            raise TypeError(f"{type(sink).__name__} is not a Sink (async start/write/close)")
    return sink_list
