"""``timed`` and ``measure``: time sub-steps of a request into its collector.

The kind of wrapper (coroutine, async generator, generator, plain function) is
chosen once, when the function is decorated; the call path then does only what
that kind needs. Outside a monitored request a wrapped call costs one context
variable read: coroutines are handed back as they are, not wrapped in another.
Times are ``time.perf_counter()`` differences in seconds (floats), and a step
timed more than once in a request is summed (each call adds its own duration,
recursive calls included).
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Generator
from types import FunctionType, MethodType, TracebackType
from typing import Any, Final, Generic, TypeVar, overload

import wrapt

from lunamon._log import logger
from lunamon._validation import validate_key
from lunamon.collector import RequestCollector, current

__all__ = ["measure", "timed", "unattributed_steps"]

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
Y = TypeVar("Y")
S = TypeVar("S")

# The clock; tests replace it with a counter to assert exact durations.
perf_counter: Callable[[], float] = time.perf_counter

_current_get = current.get
_checked_names: set[str] = set()
_get_ident = threading.get_ident
_MAIN_THREAD: Final = threading.main_thread().ident
# Steps timed in a worker thread outside any request, by name: most often a
# loop.run_in_executor call that lost the request's context.
_unattributed_steps: dict[str, int] = {}


def _unattributed(name: str) -> None:
    count = _unattributed_steps.get(name, 0)
    _unattributed_steps[name] = count + 1
    if not count:
        logger.debug(
            "step_outside_request",
            step=name,
            hint="run in a thread without the request's context: use"
            " lunamon.run_in_executor(executor, func, ...) or asyncio.to_thread",
        )


def unattributed_steps() -> dict[str, int]:
    """How often each step was timed in a worker thread outside any request."""
    return dict(_unattributed_steps)


def _check_name(name: str) -> str:
    if name not in _checked_names:
        validate_key(name, "step name")
        _checked_names.add(name)
    return name


async def _timed_await(coro: Awaitable[T], collector: RequestCollector, name: str) -> T:
    start = perf_counter()
    try:
        return await coro
    finally:
        collector.add_step(name, perf_counter() - start)


class _TimedAsyncGenerator(Generic[Y, S]):
    """Times the generator's own work: the sum of its steps, not its consumer's."""

    __slots__ = ("_agen", "_collector", "_name")

    def __init__(self, agen: AsyncGenerator[Y, S], collector: RequestCollector, name: str):
        self._agen = agen
        self._collector = collector
        self._name = name

    def __aiter__(self) -> _TimedAsyncGenerator[Y, S]:
        return self

    def __anext__(self) -> Coroutine[Any, Any, Y]:
        return _timed_await(self._agen.__anext__(), self._collector, self._name)

    def asend(self, value: S) -> Coroutine[Any, Any, Y]:
        return _timed_await(self._agen.asend(value), self._collector, self._name)

    def athrow(self, *args: Any) -> Coroutine[Any, Any, Y]:
        return _timed_await(self._agen.athrow(*args), self._collector, self._name)

    def aclose(self) -> Coroutine[Any, Any, None]:
        return _timed_await(self._agen.aclose(), self._collector, self._name)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._agen, attr)


class _TimedGenerator(Generic[Y, S, T]):
    """Times a generator's own work, step by step."""

    __slots__ = ("_collector", "_gen", "_name")

    def __init__(self, gen: Generator[Y, S, T], collector: RequestCollector, name: str):
        self._gen = gen
        self._collector = collector
        self._name = name

    def __iter__(self) -> _TimedGenerator[Y, S, T]:
        return self

    def _step(self, method: Callable[..., Y], *args: Any) -> Y:
        start = perf_counter()
        try:
            return method(*args)
        finally:
            self._collector.add_step(self._name, perf_counter() - start)

    def __next__(self) -> Y:
        return self._step(self._gen.__next__)

    def send(self, value: S) -> Y:
        return self._step(self._gen.send, value)

    def throw(self, *args: Any) -> Y:
        return self._step(self._gen.throw, *args)

    def close(self) -> None:
        start = perf_counter()
        try:
            self._gen.close()
        finally:
            self._collector.add_step(self._name, perf_counter() - start)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._gen, attr)


# A call path: ``(wrapper_or_None, *args, **kwargs)``, the shape of a ``__call__``.
Caller = Callable[..., Any]


def _caller(func: Callable[..., Any], name: str) -> Caller:
    """The call path for ``func``, chosen once by its kind: outside a request it
    only calls through; inside, it adds the time to step ``name``."""
    if inspect.iscoroutinefunction(func):
        timed_result: Callable[[Any, RequestCollector, str], Any] = _timed_await
    elif inspect.isasyncgenfunction(func):
        timed_result = _TimedAsyncGenerator
    elif inspect.isgeneratorfunction(func):
        timed_result = _TimedGenerator
    else:

        def call_function(_wrapper: object, /, *args: Any, **kwargs: Any) -> Any:
            collector = _current_get()
            if collector is None:
                if _get_ident() != _MAIN_THREAD:
                    _unattributed(name)
                return func(*args, **kwargs)
            start = perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                collector.add_step(name, perf_counter() - start)

        return call_function

    def call_deferred(_wrapper: object, /, *args: Any, **kwargs: Any) -> Any:
        # Coroutines and generators run later: the result is wrapped to time its own steps.
        collector = _current_get()
        if collector is None:
            return func(*args, **kwargs)
        return timed_result(func(*args, **kwargs), collector, name)

    return call_deferred


class _TimedFunctionWrapper(wrapt.FunctionWrapper):  # type: ignore[type-arg]
    """wrapt's proxy (introspection, descriptors) around a :func:`_caller`.

    A plain function gets a subclass of its own (see :func:`_wrap`) whose
    ``__call__`` *is* the caller: wrapt 2.5's own ``__call__`` probes
    ``__wrapped__.__self__`` on every call (~1.5 µs), binding builds a
    ``BoundFunctionWrapper`` per access, and every attribute read on the proxy
    costs ~200 ns; methods are bound with ``MethodType``. Classmethods,
    staticmethods and other callables keep wrapt's binding, with a
    ``(wrapped, instance, args, kwargs)`` wrapper made once around the caller.
    """

    _plain = False

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        if not self._plain:
            return super().__get__(instance, owner)
        if instance is None:
            return self
        return MethodType(self, instance)


def _wrapt_wrapper(func: Any, caller: Caller) -> Callable[..., Any]:
    """wrapt's ``(wrapped, instance, args, kwargs)`` around ``caller`` (made for the
    function under ``func``): a classmethod's class is passed on as its first argument."""
    if isinstance(func, classmethod):

        def class_wrapper(wrapped: Any, _instance: Any, args: Any, kwargs: Any) -> Any:
            return caller(None, wrapped.__self__, *args, **kwargs)

        return class_wrapper

    def wrapper(_wrapped: Any, _instance: Any, args: Any, kwargs: Any) -> Any:
        return caller(None, *args, **kwargs)

    return wrapper


def _wrap(func: F, name: str | None) -> F:
    inner = func.__func__ if isinstance(func, (classmethod, staticmethod)) else func
    if not callable(inner):
        raise TypeError(f"timed() needs a function, not {type(func).__name__}")
    caller = _caller(inner, _check_name(name if name is not None else f"{inner.__name__}_time"))
    wrapper: Any
    if isinstance(func, FunctionType):
        namespace = {"__call__": caller, "_plain": True}
        wrapper = type("TimedFunction", (_TimedFunctionWrapper,), namespace)(
            func, _wrapt_wrapper(func, caller)
        )
    else:
        wrapper = _TimedFunctionWrapper(func, _wrapt_wrapper(func, caller))
    return wrapper  # type: ignore[no-any-return]


@overload
def timed(name: F, /) -> F: ...
@overload
def timed(name: str | None = None, /) -> Callable[[F], F]: ...


def timed(name: Any = None, /) -> Any:
    """Record how long the decorated callable takes as field ``name`` of the request.

    Use bare (``@timed``, field ``f"{func.__name__}_time"``) or with the field
    name (``@timed("save_warps_time")``). Works for coroutine functions, async
    generators, generators and plain functions, as methods, classmethods and
    staticmethods (put ``@timed`` above ``@classmethod``). Exceptions propagate
    unchanged and the time is still recorded. Outside a monitored request the
    call goes straight through.
    """
    if name is None or isinstance(name, str):
        if name is not None:
            _check_name(name)

        def decorator(func: F) -> F:
            return _wrap(func, name)

        return decorator
    if callable(name) or isinstance(name, (classmethod, staticmethod)):
        return _wrap(name, None)
    raise TypeError(f"timed() takes a field name or a function, not {type(name).__name__}")


class measure:
    """Time a block as step ``name``: ``with measure("x_time"):`` or ``async with``.

    A fresh object per use, so nested and concurrent blocks never share state.
    Outside a monitored request it records nothing.
    """

    __slots__ = ("_collector", "_start", "name")

    def __init__(self, name: str) -> None:
        self.name = _check_name(name)
        self._collector: RequestCollector | None = None
        self._start = 0.0

    def __enter__(self) -> measure:
        self._collector = _current_get()
        self._start = perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._collector is not None:
            self._collector.add_step(self.name, perf_counter() - self._start)
        elif _get_ident() != _MAIN_THREAD:
            _unattributed(self.name)

    async def __aenter__(self) -> measure:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)
