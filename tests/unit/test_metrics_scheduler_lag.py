"""The scheduler's queue lag reaches a metric through its ``on_lag`` callback (schedule.py imports no metrics).

Cases:
- each start reports start time minus due time, as the scheduler's clock tells it;
- a coalesced rerun reports how long it waited since it came due;
- a callback that raises is logged and the jobs still run; without a callback nothing is reported;
- wired to ``OperatorMetrics.observe_queue_lag``, the histogram counts every start.
"""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from secured_endpoint import metrics
from secured_endpoint.schedule import Scheduler


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def until(condition: object, timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.005)


async def test_each_start_reports_how_late_it_is() -> None:
    clock = Clock(1000.0)
    lags: list[float] = []
    ran: list[str] = []

    async def job(key: str) -> None:
        ran.append(key)

    scheduler: Scheduler[str] = Scheduler(job, clock=clock, on_lag=lags.append)
    scheduler.schedule("late", 997.5)  # due 2.5 s ago
    scheduler.schedule("now", 1000.0)
    await scheduler.start()
    try:
        await until(lambda: len(ran) == 2)
    finally:
        await scheduler.stop()
    assert sorted(lags) == [0.0, 2.5]


async def test_a_coalesced_rerun_reports_its_wait() -> None:
    clock = Clock(1000.0)
    lags: list[float] = []
    release = asyncio.Event()
    runs = 0

    async def job(key: str) -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            await release.wait()

    scheduler: Scheduler[str] = Scheduler(job, clock=clock, on_lag=lags.append)
    scheduler.schedule("k", 1000.0)
    await scheduler.start()
    try:
        await until(lambda: runs == 1)
        scheduler.schedule("k", 1000.0)  # due again while running: one rerun, right after
        await until(lambda: "k" in scheduler and scheduler.due_time("k") == 1000.0)
        await asyncio.sleep(0.05)  # let the loop move it to the reruns
        clock.now = 1004.0  # the first run takes 4 s
        release.set()
        await until(lambda: runs == 2)
    finally:
        await scheduler.stop()
    assert lags == [0.0, 4.0]


async def test_a_failing_callback_does_not_stop_the_jobs(caplog: pytest.LogCaptureFixture) -> None:
    ran: list[str] = []

    async def job(key: str) -> None:
        ran.append(key)

    def broken(_: float) -> None:
        raise RuntimeError("metric broke")

    scheduler: Scheduler[str] = Scheduler(job, on_lag=broken)
    scheduler.schedule_now("a")
    scheduler.schedule_now("b")
    await scheduler.start()
    try:
        await until(lambda: len(ran) == 2)
    finally:
        await scheduler.stop()
    assert "lag callback failed: RuntimeError: metric broke" in caplog.text


async def test_without_a_callback_and_wired_to_the_histogram() -> None:
    m = metrics.OperatorMetrics(CollectorRegistry())
    ran: list[str] = []

    async def job(key: str) -> None:
        ran.append(key)

    plain: Scheduler[str] = Scheduler(job)
    measured: Scheduler[str] = Scheduler(job, on_lag=m.observe_queue_lag)
    for scheduler in (plain, measured):
        scheduler.schedule_now("x")
        await scheduler.start()
    try:
        await until(lambda: len(ran) == 2)
    finally:
        for scheduler in (plain, measured):
            await scheduler.stop()
    assert m.registry.get_sample_value("secured_endpoint_scheduler_queue_lag_seconds_count") == 1
