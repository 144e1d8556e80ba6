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
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Generator
from types import FunctionType, MethodType, TracebackType
from typing import Any, Generic, TypeVar, overload

import wrapt

from lunamon.collector import RequestCollector, current
from lunamon.point import validate_key

__all__ = ["measure", "timed"]

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
Y = TypeVar("Y")
S = TypeVar("S")

# The clock; tests replace it with a counter to assert exact durations.
perf_counter: Callable[[], float] = time.perf_counter

_current_get = current.get
_checked_names: set[str] = set()


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
        steps = collector.steps
        steps[name] = steps.get(name, 0.0) + (perf_counter() - start)


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


# One factory per kind of callable. Each returns the call path for ``wrapped``
# as a ``__call__`` (its first parameter is the wrapper object, unused): the kind
# and the field name are settled here, once, not on every call.
Caller = Callable[..., Any]


def _coroutine_caller(wrapped: Callable[..., Any], name: str) -> Caller:
    def __call__(_self: object, /, *args: Any, **kwargs: Any) -> Any:
        collector = _current_get()
        if collector is None:
            return wrapped(*args, **kwargs)
        return _timed_await(wrapped(*args, **kwargs), collector, name)

    return __call__


def _async_generator_caller(wrapped: Callable[..., Any], name: str) -> Caller:
    def __call__(_self: object, /, *args: Any, **kwargs: Any) -> Any:
        collector = _current_get()
        if collector is None:
            return wrapped(*args, **kwargs)
        return _TimedAsyncGenerator(wrapped(*args, **kwargs), collector, name)

    return __call__


def _generator_caller(wrapped: Callable[..., Any], name: str) -> Caller:
    def __call__(_self: object, /, *args: Any, **kwargs: Any) -> Any:
        collector = _current_get()
        if collector is None:
            return wrapped(*args, **kwargs)
        return _TimedGenerator(wrapped(*args, **kwargs), collector, name)

    return __call__


def _function_caller(wrapped: Callable[..., Any], name: str) -> Caller:
    def __call__(_self: object, /, *args: Any, **kwargs: Any) -> Any:
        collector = _current_get()
        if collector is None:
            return wrapped(*args, **kwargs)
        start = perf_counter()
        try:
            return wrapped(*args, **kwargs)
        finally:
            steps = collector.steps
            steps[name] = steps.get(name, 0.0) + (perf_counter() - start)

    return __call__


def _caller_factory(func: Callable[..., Any]) -> Callable[[Callable[..., Any], str], Caller]:
    if inspect.iscoroutinefunction(func):
        return _coroutine_caller
    if inspect.isasyncgenfunction(func):
        return _async_generator_caller
    if inspect.isgeneratorfunction(func):
        return _generator_caller
    return _function_caller


class _TimedFunctionWrapper(wrapt.FunctionWrapper):  # type: ignore[type-arg]
    """wrapt's proxy (introspection, descriptors) with a fast call path.

    wrapt 2.5's own ``__call__`` probes ``__wrapped__.__self__`` on every call
    (about 1.5 µs for a plain function), binding a method builds a
    ``BoundFunctionWrapper`` per access, and every attribute read on the proxy
    costs ~200 ns. So :func:`_wrap` makes one subclass per decorated callable
    whose ``__call__`` closes over the function and the field name; plain
    functions and instance methods (bound with ``MethodType``) call straight
    through it. Classmethods, staticmethods and other descriptors keep wrapt's
    binding and its ``(wrapped, instance, args, kwargs)`` wrapper.
    """

    _plain = False

    def __init__(self, wrapped: Any, factory: Callable[[Any, str], Caller], name: str) -> None:
        def wrapper(inner: Any, instance: Any, args: Any, kwargs: Any) -> Any:
            return factory(inner, name)(None, *args, **kwargs)

        super().__init__(wrapped, wrapper)

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        if not self._plain:
            return super().__get__(instance, owner)
        if instance is None:
            return self
        return MethodType(self, instance)


def _wrapper_class(func: Any, factory: Callable[[Any, str], Caller], name: str) -> type[Any]:
    if not isinstance(func, FunctionType):
        return _TimedFunctionWrapper
    namespace = {"__call__": factory(func, name), "_plain": True}
    return type("TimedFunction", (_TimedFunctionWrapper,), namespace)


def _wrap(func: F, name: str | None) -> F:
    inner = func.__func__ if isinstance(func, (classmethod, staticmethod)) else func
    if not callable(inner):
        raise TypeError(f"timed() needs a function, not {type(func).__name__}")
    field = _check_name(name if name is not None else f"{inner.__name__}_time")
    factory = _caller_factory(inner)
    wrapper: F = _wrapper_class(func, factory, field)(func, factory, field)
    return wrapper


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

    async def __aenter__(self) -> measure:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)
