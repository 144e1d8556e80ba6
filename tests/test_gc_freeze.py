"""``gc_freeze``: the heap alive when monitoring starts leaves the collector's scans, once
per process (BENCHMARKS.md section 5: no full collection stalls the loop)."""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Iterator

import pytest

import lunamon.monitoring
from lunamon import MemorySink, Monitoring, MonitoringSettings


@pytest.fixture
def unfrozen(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    gc.unfreeze()
    monkeypatch.setattr(lunamon.monitoring, "_frozen_in", None)
    yield
    gc.unfreeze()


def _start_and_close(**options: object) -> None:
    async def run() -> None:
        monitoring = Monitoring(MonitoringSettings(**options), [MemorySink()])  # type: ignore[arg-type]
        await monitoring.start()
        await monitoring.close()

    asyncio.run(run())


@pytest.mark.usefixtures("unfrozen")
def test_starting_freezes_what_is_alive_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    _start_and_close()
    frozen = gc.get_freeze_count()
    assert frozen > 0
    kept = [[n] for n in range(1000)]  # tracked objects made after the freeze
    _start_and_close()
    assert gc.get_freeze_count() == frozen  # not again in this process
    # A forked worker (another pid) freezes its own heap when its monitoring starts.
    monkeypatch.setattr(os, "getpid", lambda: -1)
    _start_and_close()
    assert gc.get_freeze_count() >= frozen + len(kept)


@pytest.mark.usefixtures("unfrozen")
def test_gc_freeze_false_leaves_the_collector_alone() -> None:
    _start_and_close(gc_freeze=False)
    assert gc.get_freeze_count() == 0
    assert lunamon.monitoring._frozen_in is None


@pytest.mark.usefixtures("unfrozen")
def test_a_disabled_monitoring_freezes_nothing() -> None:
    _start_and_close(enabled=False)
    assert gc.get_freeze_count() == 0
