"""The `timed` decorator matrix and `measure`, with a counter for a clock."""

from __future__ import annotations

import asyncio
import inspect
import itertools
from collections.abc import AsyncIterator, Iterator

import pytest

from lunamon import RequestCollector, measure, timed
from lunamon import timing as timing_module
from lunamon.collector import current


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """perf_counter returns 1, 2, 3 ... so each timed call takes exactly 1 s."""
    ticks = itertools.count(1)
    monkeypatch.setattr(timing_module, "perf_counter", lambda: float(next(ticks)))


@pytest.fixture
def collector() -> Iterator[RequestCollector]:
    c = RequestCollector("POST:/test", "rid")
    token = current.set(c)
    yield c
    current.reset(token)


@timed("fetch_time")
async def fetch(x: int) -> int:
    await asyncio.sleep(0)
    return x * 2


@timed
async def bare_named() -> str:
    return "ok"


@timed("sync_time")
def sync_add(a: int, b: int = 1) -> int:
    return a + b


@timed("boom_time")
async def boom() -> None:
    raise KeyError("boom")


@timed("recursive_time")
def recursive(n: int) -> int:
    return 0 if n == 0 else 1 + recursive(n - 1)


@timed("stream_time")
async def stream(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i


@timed("gen_time")
def gen(n: int) -> Iterator[int]:
    yield from range(n)


class Store:
    def __init__(self) -> None:
        self.saved: list[str] = []

    @timed("save_time")
    async def save(self, item: str) -> None:
        self.saved.append(item)

    @timed("class_time")
    @classmethod
    async def create(cls) -> Store:
        return cls()

    @timed("static_time")
    @staticmethod
    def helper(x: int) -> int:
        return x + 1


async def test_coroutine_function(clock: None, collector: RequestCollector) -> None:
    assert await fetch(21) == 42
    assert collector.steps == {"fetch_time": 1.0}
    assert inspect.iscoroutinefunction(fetch)
    assert fetch.__name__ == "fetch"


async def test_bare_decorator_names_the_field(clock: None, collector: RequestCollector) -> None:
    assert await bare_named() == "ok"
    assert collector.steps == {"bare_named_time": 1.0}


async def test_steps_timed_twice_are_summed(clock: None, collector: RequestCollector) -> None:
    await fetch(1)
    await fetch(2)
    assert collector.steps == {"fetch_time": 2.0}
    assert type(collector.steps["fetch_time"]) is float


async def test_sync_function(clock: None, collector: RequestCollector) -> None:
    assert sync_add(1, b=2) == 3
    assert collector.steps == {"sync_time": 1.0}


async def test_exception_propagates_and_time_is_recorded(
    clock: None, collector: RequestCollector
) -> None:
    with pytest.raises(KeyError, match="boom"):
        await boom()
    assert collector.steps == {"boom_time": 1.0}


async def test_recursion_each_call_adds_its_own_time(
    clock: None, collector: RequestCollector
) -> None:
    # Clock ticks: outer start 1, inner start 2, innermost 3-4 (1 s), inner end 5 (3 s),
    # outer end 6 (5 s): 1 + 3 + 5.
    assert recursive(2) == 2
    assert collector.steps == {"recursive_time": 9.0}


async def test_methods_classmethods_staticmethods(clock: None, collector: RequestCollector) -> None:
    store = await Store.create()
    await store.save("a")
    assert Store.helper(1) == 2
    assert store.helper(2) == 3
    assert store.saved == ["a"]
    assert collector.steps == {
        "class_time": 1.0,
        "save_time": 1.0,
        "static_time": 2.0,
    }
    assert inspect.iscoroutinefunction(Store.save)
    assert inspect.iscoroutinefunction(store.save)


async def test_async_generator_times_its_own_steps(
    clock: None, collector: RequestCollector
) -> None:
    items = [i async for i in stream(3)]
    assert items == [0, 1, 2]
    # 3 items + the final StopAsyncIteration step, 1 s each.
    assert collector.steps == {"stream_time": 4.0}
    assert inspect.isasyncgenfunction(stream)


async def test_generator_times_its_own_steps(clock: None, collector: RequestCollector) -> None:
    assert list(gen(2)) == [0, 1]
    assert collector.steps == {"gen_time": 3.0}


async def test_outside_a_request_only_calls_through() -> None:
    assert current.get() is None
    coro = fetch(2)
    # The coroutine itself is handed back: no extra wrapper outside a request.
    assert coro.cr_code is fetch.__wrapped__.__code__  # type: ignore[attr-defined]
    assert await coro == 4
    assert sync_add(1) == 2
    assert [i async for i in stream(2)] == [0, 1]
    with measure("block_time") as m:
        pass
    assert m.name == "block_time"


async def test_child_tasks_record_into_the_same_request(
    clock: None, collector: RequestCollector
) -> None:
    await asyncio.gather(fetch(1), fetch(2), asyncio.create_task(fetch(3)))
    # The three overlap: they start at ticks 1, 2, 3 and end at 4, 5, 6: 3 s each, summed.
    assert collector.steps == {"fetch_time": 9.0}


async def test_measure_sync_and_async(clock: None, collector: RequestCollector) -> None:
    with measure("block_time"):
        pass
    async with measure("block_time"):
        await asyncio.sleep(0)
    with pytest.raises(ValueError, match="inner"), measure("failing_time"):
        raise ValueError("inner")
    assert collector.steps == {"block_time": 2.0, "failing_time": 1.0}


async def test_nested_measures_do_not_share_state(clock: None, collector: RequestCollector) -> None:
    with measure("outer_time"), measure("inner_time"):
        pass
    assert collector.steps == {"inner_time": 1.0, "outer_time": 3.0}


def test_bad_names_are_refused_at_decoration() -> None:
    with pytest.raises(ValueError, match="reserved"):
        timed("time")
    with pytest.raises(ValueError, match="newline"):
        measure("a\nb")
    with pytest.raises(TypeError):
        timed(42)  # type: ignore[call-overload]
