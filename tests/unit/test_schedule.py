"""Refresh policy and the scheduler (``secured_endpoint.schedule``).

Policy (fixed datetimes, seeded ``random.Random``; hypothesis for the invariants):
- token_expiry: expires_in, then JWT exp, then the default; non-positive expires_in and a JWT exp at or before
  issue time fall through; lifetimes clamped to [MIN_LIFETIME, MAX_LIFETIME], even absurdly large ones;
  naive datetimes refused; results in UTC.
- refresh_time: a third of the lifetime by default, seconds, percent; jitter only earlier and at most
  min(10 % of refreshBefore, 60 s); refreshBeforeSeconds beyond the lifetime floors at 10 % of the lifetime
  (no refresh loop); zero keeps the safety margin; both settings or a sub-second lifetime refused; jitter
  spreads tokens issued together; property: always within [issued + 10 %, expires - margin].
- backoff_ceiling / backoff_delay: transient 1 s doubling to 300 s, permanent 60 s doubling to 3600 s; equal
  jitter within [ceiling / 2, ceiling]; ceilings never decrease; huge failure counts do not overflow;
  failures < 1 refused.
- retry_time: plain backoff without a token; one "last chance" before a still-valid token expires for
  transient errors only; plain backoff once that moment has passed; property: always after now, never after
  the last chance when one is ahead.
- forced_refresh_at: two back to back, the third waits for the floor of the oldest, at and past the floor,
  refreshes in the future (clock went back) ignored.

Scheduler (real event loop, due times a few tens of milliseconds ahead):
- jobs start in due order, ties first-come-first-served; a backlog goes earliest deadline first (a key
  rescheduled or cancelled while in line loses its place; keep_earlier keeps the earlier deadline);
  rescheduling earlier wakes a sleeping loop; rescheduling later delays; cancel; due_time / len / contains
  bookkeeping; invalid arguments refused.
- a key never runs concurrently with itself; coming due while running gives exactly one rerun right after;
  cancel and schedule() during a run drop the pending rerun; keep_earlier keeps it.
- the concurrency bound is respected (and reached); an exception in one job is logged with key and type only
  and does not stop the others; the loop notices a jump of the wall clock within max_sleep.
- stop(): waits for running jobs, cancels those past the grace period (they become due again, as does a
  skipped rerun), is idempotent, keeps due times for a later start(); wait_idle() reports a timeout.
- a job rescheduling itself runs periodically; rescheduling one key many times keeps the heap small.
- 10,000 keys at random times within 0.3 s all run exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from secured_endpoint import schedule
from secured_endpoint.schedule import (
    LAST_CHANCE_JITTER,
    LAST_CHANCE_LEAD,
    MAX_LIFETIME,
    MIN_LIFETIME,
    ExpirySource,
    Scheduler,
    backoff_ceiling,
    backoff_delay,
    forced_refresh_at,
    refresh_time,
    retry_time,
    token_expiry,
)

T0 = datetime(2026, 11, 28, 16, 0, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


def rng(seed: int = 7) -> random.Random:
    return random.Random(seed)


# ----------------------------------------------------------------------------------------------------------
# token_expiry
# ----------------------------------------------------------------------------------------------------------


def test_expiry_prefers_expires_in() -> None:
    expires_at, source = token_expiry(
        issued_at=T0, expires_in=600, jwt_exp=T0 + HOUR, default_expires_in=3600
    )
    assert (expires_at, source) == (T0 + timedelta(seconds=600), ExpirySource.EXPIRES_IN)


def test_expiry_falls_back_to_jwt_exp() -> None:
    expires_at, source = token_expiry(
        issued_at=T0, expires_in=None, jwt_exp=T0 + 2 * HOUR, default_expires_in=3600
    )
    assert (expires_at, source) == (T0 + 2 * HOUR, ExpirySource.JWT_EXP)


def test_expiry_falls_back_to_default() -> None:
    expires_at, source = token_expiry(issued_at=T0, expires_in=None, jwt_exp=None, default_expires_in=900)
    assert (expires_at, source) == (T0 + timedelta(seconds=900), ExpirySource.DEFAULT)


@pytest.mark.parametrize("expires_in", [0, -5])
def test_non_positive_expires_in_is_no_lifetime(expires_in: int) -> None:
    _, source = token_expiry(issued_at=T0, expires_in=expires_in, jwt_exp=T0 + HOUR, default_expires_in=60)
    assert source is ExpirySource.JWT_EXP
    _, source = token_expiry(issued_at=T0, expires_in=expires_in, jwt_exp=None, default_expires_in=60)
    assert source is ExpirySource.DEFAULT


@pytest.mark.parametrize("jwt_exp", [T0 - HOUR, T0])
def test_jwt_exp_in_the_past_falls_back_to_default(jwt_exp: datetime) -> None:
    expires_at, source = token_expiry(issued_at=T0, expires_in=None, jwt_exp=jwt_exp, default_expires_in=120)
    assert (expires_at, source) == (T0 + timedelta(seconds=120), ExpirySource.DEFAULT)


def test_expiry_clamps_absurd_lifetimes() -> None:
    for expires_in in (400 * 24 * 3600, 10**20):
        expires_at, source = token_expiry(
            issued_at=T0, expires_in=expires_in, jwt_exp=None, default_expires_in=60
        )
        assert (expires_at, source) == (T0 + MAX_LIFETIME, ExpirySource.EXPIRES_IN)
    expires_at, _ = token_expiry(
        issued_at=T0, expires_in=None, jwt_exp=T0 + timedelta(days=5000), default_expires_in=60
    )
    assert expires_at == T0 + MAX_LIFETIME
    expires_at, _ = token_expiry(
        issued_at=T0, expires_in=None, jwt_exp=T0 + timedelta(milliseconds=300), default_expires_in=60
    )
    assert expires_at == T0 + MIN_LIFETIME
    expires_at, source = token_expiry(issued_at=T0, expires_in=None, jwt_exp=None, default_expires_in=0)
    assert (expires_at, source) == (T0 + MIN_LIFETIME, ExpirySource.DEFAULT)


def test_expiry_is_utc_and_refuses_naive_datetimes() -> None:
    cet = timezone(timedelta(hours=1))
    expires_at, _ = token_expiry(
        issued_at=T0.astimezone(cet), expires_in=60, jwt_exp=None, default_expires_in=60
    )
    assert expires_at.tzinfo is UTC
    assert expires_at == T0 + timedelta(seconds=60)
    with pytest.raises(ValueError, match="timezone-aware"):
        token_expiry(issued_at=T0.replace(tzinfo=None), expires_in=60, jwt_exp=None, default_expires_in=60)
    with pytest.raises(ValueError, match="timezone-aware"):
        token_expiry(
            issued_at=T0, expires_in=None, jwt_exp=(T0 + HOUR).replace(tzinfo=None), default_expires_in=60
        )


# ----------------------------------------------------------------------------------------------------------
# refresh_time
# ----------------------------------------------------------------------------------------------------------


def refresh(
    lifetime: timedelta,
    *,
    seconds: int | None = None,
    percent: int | None = None,
    seed: int = 7,
) -> datetime:
    return refresh_time(
        issued_at=T0,
        expires_at=T0 + lifetime,
        refresh_before_seconds=seconds,
        refresh_before_percent=percent,
        rng=rng(seed),
    )


def test_refresh_defaults_to_a_third_of_the_lifetime_minus_jitter() -> None:
    target = T0 + 2 * HOUR  # 3 h token: refresh 1 h before expiry
    for seed in range(50):
        at = refresh(3 * HOUR, seed=seed)
        assert target - timedelta(seconds=60) <= at <= target


def test_refresh_before_seconds_and_percent() -> None:
    at = refresh(HOUR, seconds=300)
    assert T0 + HOUR - timedelta(seconds=330) <= at <= T0 + HOUR - timedelta(seconds=300)
    at = refresh(HOUR, percent=20)  # 720 s before expiry, jitter up to 60 s (capped from 72 s)
    assert T0 + HOUR - timedelta(seconds=780) <= at <= T0 + HOUR - timedelta(seconds=720)


def test_refresh_jitter_is_ten_percent_of_refresh_before_for_short_tokens() -> None:
    lifetime = timedelta(seconds=60)  # refresh 20 s before expiry, jitter at most 2 s
    times = [refresh(lifetime, seed=seed) for seed in range(200)]
    assert min(times) >= T0 + timedelta(seconds=38)
    assert max(times) <= T0 + timedelta(seconds=40)
    assert max(times) - min(times) > timedelta(seconds=1.5)


def test_refresh_before_longer_than_the_lifetime_falls_back_to_the_default() -> None:
    # like cert-manager's renewBefore >= duration: refresh at two thirds, not in a loop at 10 %
    default = refresh(HOUR)
    assert refresh(HOUR, seconds=10 * 3600) == default
    assert refresh(HOUR, seconds=3600) == default
    assert refresh(HOUR, seconds=10**15) == default  # would overflow timedelta if used as is
    assert T0 + HOUR * 0.6 <= default <= T0 + HOUR * (2 / 3)
    at = refresh(HOUR, percent=250)  # the CRD refuses > 90; the policy still never loops
    assert at == T0 + HOUR * 0.1


def test_zero_refresh_before_keeps_the_safety_margin() -> None:
    assert refresh(HOUR, seconds=0, seed=1) <= T0 + HOUR - timedelta(seconds=5)
    assert refresh(timedelta(seconds=10), seconds=0) <= T0 + timedelta(seconds=9)  # margin 10 % = 1 s
    assert refresh(HOUR, seconds=-30) <= T0 + HOUR - timedelta(seconds=5)


def test_refresh_refuses_both_settings_and_sub_second_lifetimes() -> None:
    with pytest.raises(ValueError, match="mutually exclusive"):
        refresh(HOUR, seconds=60, percent=10)
    with pytest.raises(ValueError, match="shorter than"):
        refresh(timedelta(milliseconds=500))
    with pytest.raises(ValueError, match="shorter than"):
        refresh(-HOUR)


def test_refresh_jitter_spreads_tokens_issued_together() -> None:
    shared = random.Random(42)  # one Random for the whole operator, as in production
    seconds = {
        refresh_time(
            issued_at=T0,
            expires_at=T0 + HOUR,
            refresh_before_seconds=None,
            refresh_before_percent=None,
            rng=shared,
        ).replace(microsecond=0)
        for _ in range(1000)
    }
    assert len(seconds) >= 55  # 1,000 tokens spread over the 60 seconds of jitter


@given(
    issued_at=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
    lifetime_us=st.integers(min_value=1_000_000, max_value=int(MAX_LIFETIME.total_seconds()) * 1_000_000),
    setting=st.one_of(
        st.tuples(st.just("seconds"), st.integers(min_value=-100, max_value=10**9)),
        st.tuples(st.just("percent"), st.integers(min_value=-10, max_value=1000)),
        st.just(("default", 0)),
    ),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_refresh_always_inside_the_window(
    issued_at: datetime, lifetime_us: int, setting: tuple[str, int], seed: int
) -> None:
    lifetime = timedelta(microseconds=lifetime_us)
    expires_at = issued_at + lifetime
    kind, value = setting
    at = refresh_time(
        issued_at=issued_at,
        expires_at=expires_at,
        refresh_before_seconds=value if kind == "seconds" else None,
        refresh_before_percent=value if kind == "percent" else None,
        rng=rng(seed),
    )
    margin = min(timedelta(seconds=5), lifetime * 0.1)
    assert issued_at + lifetime * 0.1 <= at <= expires_at - margin
    assert issued_at < at
    assert at.tzinfo is UTC


# ----------------------------------------------------------------------------------------------------------
# backoff
# ----------------------------------------------------------------------------------------------------------


def test_backoff_ceilings() -> None:
    transient = [backoff_ceiling(failures=n, permanent=False) for n in range(1, 12)]
    assert transient == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
    permanent = [backoff_ceiling(failures=n, permanent=True) for n in range(1, 9)]
    assert permanent == [60, 120, 240, 480, 960, 1920, 3600, 3600]
    assert backoff_ceiling(failures=10**9, permanent=False) == 300


def test_backoff_uses_equal_jitter() -> None:
    generator = rng()
    delays = [backoff_delay(failures=5, permanent=False, rng=generator) for _ in range(500)]
    assert all(8 <= delay <= 16 for delay in delays)
    assert max(delays) - min(delays) > 6  # actually spread, not a constant
    first_permanent = [backoff_delay(failures=1, permanent=True, rng=generator) for _ in range(100)]
    assert all(30 <= delay <= 60 for delay in first_permanent)  # invalid_client is not hammered


def test_backoff_refuses_failures_below_one() -> None:
    with pytest.raises(ValueError, match="counts from 1"):
        backoff_delay(failures=0, permanent=False, rng=rng())


@given(
    failures=st.integers(min_value=1, max_value=10**6),
    permanent=st.booleans(),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_backoff_bounds_and_monotone_ceiling(failures: int, permanent: bool, seed: int) -> None:
    ceiling = backoff_ceiling(failures=failures, permanent=permanent)
    cap = 3600 if permanent else 300
    assert 0 < ceiling <= cap
    assert backoff_ceiling(failures=failures + 1, permanent=permanent) >= ceiling
    delay = backoff_delay(failures=failures, permanent=permanent, rng=rng(seed))
    assert ceiling / 2 <= delay <= ceiling <= cap


# ----------------------------------------------------------------------------------------------------------
# retry_time
# ----------------------------------------------------------------------------------------------------------


def test_retry_without_a_token_is_plain_backoff() -> None:
    at = retry_time(now=T0, failures=9, permanent=False, expires_at=None, rng=rng())
    assert T0 + timedelta(seconds=128) <= at <= T0 + timedelta(seconds=256)


def test_retry_takes_a_last_chance_before_a_valid_token_expires() -> None:
    expires_at = T0 + timedelta(seconds=120)  # backoff after 9 failures is 128..256 s: it would overshoot
    at = retry_time(now=T0, failures=9, permanent=False, expires_at=expires_at, rng=rng())
    assert expires_at - LAST_CHANCE_LEAD - LAST_CHANCE_JITTER <= at <= expires_at - LAST_CHANCE_LEAD


def test_retry_without_overshoot_is_plain_backoff() -> None:
    expires_at = T0 + HOUR
    at = retry_time(now=T0, failures=2, permanent=False, expires_at=expires_at, rng=rng())
    assert T0 + timedelta(seconds=1) <= at <= T0 + timedelta(seconds=2)


def test_retry_after_the_last_chance_is_plain_backoff() -> None:
    expires_at = T0 + timedelta(seconds=20)  # the last chance (20-40 s before expiry) is already behind us
    at = retry_time(now=T0, failures=9, permanent=False, expires_at=expires_at, rng=rng())
    assert at >= T0 + timedelta(seconds=128)


def test_permanent_errors_get_no_last_chance() -> None:
    expires_at = T0 + timedelta(seconds=120)
    at = retry_time(now=T0, failures=1, permanent=True, expires_at=expires_at, rng=rng())
    assert at >= T0 + timedelta(seconds=30)
    at = retry_time(now=T0, failures=3, permanent=True, expires_at=expires_at, rng=rng())
    assert at >= T0 + timedelta(seconds=120)


@given(
    failures=st.integers(min_value=1, max_value=50),
    permanent=st.booleans(),
    remaining_s=st.one_of(st.none(), st.integers(min_value=-7200, max_value=7200)),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_retry_properties(failures: int, permanent: bool, remaining_s: int | None, seed: int) -> None:
    expires_at = None if remaining_s is None else T0 + timedelta(seconds=remaining_s)
    at = retry_time(now=T0, failures=failures, permanent=permanent, expires_at=expires_at, rng=rng(seed))
    cap = timedelta(seconds=backoff_ceiling(failures=failures, permanent=permanent))
    assert T0 < at <= T0 + cap
    if not permanent and expires_at is not None and expires_at - LAST_CHANCE_LEAD - LAST_CHANCE_JITTER > T0:
        assert at <= expires_at - LAST_CHANCE_LEAD  # at least one attempt while the token is still valid


# ----------------------------------------------------------------------------------------------------------
# forced_refresh_at
# ----------------------------------------------------------------------------------------------------------

SECOND = timedelta(seconds=1)


def test_two_forced_refreshes_back_to_back_then_the_floor() -> None:
    assert forced_refresh_at(now=T0, recent=(), floor_seconds=10) == T0
    assert forced_refresh_at(now=T0, recent=(T0 - SECOND,), floor_seconds=10) == T0
    # a third within the floor waits until the older of the two is a floor old
    assert forced_refresh_at(now=T0, recent=(T0 - 3 * SECOND, T0 - SECOND), floor_seconds=10) == T0 + 7 * SECOND
    assert forced_refresh_at(now=T0, recent=(T0 - 10 * SECOND, T0 - SECOND), floor_seconds=10) == T0
    assert forced_refresh_at(now=T0, recent=(T0 - HOUR, T0 - HOUR), floor_seconds=10) == T0


def test_forced_refreshes_in_the_future_are_ignored() -> None:
    assert forced_refresh_at(now=T0, recent=(T0 + HOUR, T0 + HOUR), floor_seconds=10) == T0


# ----------------------------------------------------------------------------------------------------------
# Scheduler
# ----------------------------------------------------------------------------------------------------------

Key = tuple[str, str]


class Recorder:
    """A job that records starts, ends and the parallelism it saw; optionally blocks or fails per key."""

    def __init__(self, *, duration: float = 0.0) -> None:
        self.duration = duration
        self.started: list[Key] = []
        self.finished: list[Key] = []
        self.active: Counter[Key] = Counter()
        self.max_parallel = 0
        self.max_parallel_per_key = 0
        self.gates: dict[Key, asyncio.Event] = {}
        self.failing: set[Key] = set()

    async def __call__(self, key: Key) -> None:
        self.started.append(key)
        self.active[key] += 1
        self.max_parallel = max(self.max_parallel, sum(self.active.values()))
        self.max_parallel_per_key = max(self.max_parallel_per_key, self.active[key])
        try:
            gate = self.gates.get(key)
            if gate is not None:
                await gate.wait()
            elif self.duration:
                await asyncio.sleep(self.duration)
            if key in self.failing:
                raise RuntimeError(f"boom for {key[1]}")
        finally:
            self.active[key] -= 1
            self.finished.append(key)


@asynccontextmanager
async def running(scheduler: Scheduler[Key]) -> AsyncIterator[Scheduler[Key]]:
    await scheduler.start()
    try:
        yield scheduler
    finally:
        await scheduler.stop(grace_period=1.0)


async def until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.002)


def keys(count: int) -> Iterator[Key]:
    return (("ns", f"endpoint-{index}") for index in range(count))


async def test_jobs_start_in_due_order() -> None:
    job = Recorder()
    scheduler = Scheduler(job, concurrency=1)
    now = time.time()
    due = {("ns", "c"): now - 3, ("ns", "a"): now - 5, ("ns", "d"): now - 1, ("ns", "b"): now - 4}
    for key, when in due.items():
        scheduler.schedule(key, when)
    scheduler.schedule(("ns", "d2"), now - 1)  # a tie: first come, first served
    async with running(scheduler):
        assert await scheduler.wait_idle(2.0)
    assert job.started == [("ns", "a"), ("ns", "b"), ("ns", "c"), ("ns", "d"), ("ns", "d2")]
    assert len(scheduler) == 0


BLOCKER = ("ns", "blocker")


def one_slot_taken() -> tuple[Recorder, Scheduler[Key], float]:
    """A one-slot scheduler whose slot BLOCKER will hold (once started) until its gate is set: what is
    scheduled meanwhile waits in line."""
    job = Recorder()
    job.gates[BLOCKER] = asyncio.Event()
    scheduler = Scheduler(job, concurrency=1)
    now = time.time()
    scheduler.schedule(BLOCKER, now - 10)
    return job, scheduler, now


async def test_a_backlog_goes_earliest_deadline_first() -> None:
    """Due keys waiting for a slot start by deadline (the expiry of the token each would replace), not by due
    time: a rotated credential's refetch (due first, token good for minutes) waits behind refreshes whose
    tokens expire in seconds; without a deadline a key's due time is its deadline."""
    job, scheduler, now = one_slot_taken()
    async with running(scheduler):
        await until(lambda: job.started == [BLOCKER])
        scheduler.schedule(("ns", "rotated"), now - 5, deadline=now + 300)
        scheduler.schedule(("ns", "expires-soon"), now - 1, deadline=now + 2)
        scheduler.schedule(("ns", "expires-sooner"), now - 2, deadline=now + 1)
        scheduler.schedule(("ns", "no-token"), now - 3)  # deadline: its due time
        await asyncio.sleep(0.05)  # all four are in line behind the blocker
        job.gates[BLOCKER].set()
        assert await scheduler.wait_idle(2.0)
    assert job.started == [BLOCKER, ("ns", "no-token"), ("ns", "expires-sooner"), ("ns", "expires-soon"),
                           ("ns", "rotated")]


async def test_a_key_rescheduled_or_cancelled_while_in_line_keeps_no_place_there() -> None:
    job, scheduler, now = one_slot_taken()
    async with running(scheduler):
        await until(lambda: job.started == [BLOCKER])
        for name in ("later", "cancelled", "stays"):
            scheduler.schedule(("ns", name), now - 1, deadline=now + 1)
        await asyncio.sleep(0.05)  # in line
        scheduler.schedule(("ns", "later"), now + 0.2)  # no longer due
        scheduler.cancel(("ns", "cancelled"))
        job.gates[BLOCKER].set()
        await until(lambda: ("ns", "later") in job.started)
        assert await scheduler.wait_idle(2.0)
    assert job.started == [BLOCKER, ("ns", "stays"), ("ns", "later")]


async def test_keep_earlier_keeps_the_earlier_deadline() -> None:
    job = Recorder()
    scheduler = Scheduler(job, concurrency=1)
    now = time.time()
    scheduler.schedule(("ns", "a"), now - 1, deadline=now + 5)
    scheduler.schedule(("ns", "a"), now + 60, keep_earlier=True, deadline=now + 1)  # keeps now - 1, and now + 1
    scheduler.schedule(("ns", "b"), now - 1, deadline=now + 3)
    async with running(scheduler):
        assert await scheduler.wait_idle(2.0)
    assert job.started == [("ns", "a"), ("ns", "b")]


async def test_near_future_jobs_run_in_due_order() -> None:
    job = Recorder()
    scheduler = Scheduler(job, concurrency=4)
    now = time.time()
    order = list(keys(20))
    shuffled = order[:]
    random.Random(3).shuffle(shuffled)
    for key in shuffled:
        scheduler.schedule(key, now + 0.02 + 0.005 * order.index(key))
    async with running(scheduler):
        await until(lambda: len(job.finished) == 20)
    assert job.started == order


async def test_rescheduling_earlier_wakes_the_sleeping_loop() -> None:
    job = Recorder()
    scheduler = Scheduler(job, max_sleep=30.0)
    key = ("ns", "early")
    scheduler.schedule(key, time.time() + 60)
    async with running(scheduler):
        await asyncio.sleep(0.05)  # the loop now sleeps towards +60 s (capped at 30 s)
        started = time.monotonic()
        scheduler.schedule(key, time.time() + 0.02)
        await until(lambda: job.finished == [key], timeout=1.0)
        assert time.monotonic() - started < 0.5
        assert len(scheduler) == 0


async def test_rescheduling_later_delays() -> None:
    job = Recorder()
    scheduler = Scheduler(job)
    key = ("ns", "late")
    async with running(scheduler):
        scheduler.schedule(key, time.time() + 0.05)
        later = time.time() + 0.25
        scheduler.schedule(key, later)
        assert scheduler.due_time(key) == later
        await asyncio.sleep(0.15)
        assert job.started == []
        await until(lambda: job.finished == [key])
        assert time.time() >= later
    assert job.started == [key]  # once: the replaced due time left nothing behind


async def test_cancel() -> None:
    job = Recorder()
    scheduler = Scheduler(job)
    key, other = ("ns", "gone"), ("ns", "stays")
    async with running(scheduler):
        scheduler.schedule(key, time.time() + 0.03)
        scheduler.schedule(other, time.time() + 0.05)
        scheduler.cancel(key)
        scheduler.cancel(("ns", "never-scheduled"))  # harmless
        assert scheduler.due_time(key) is None
        assert key not in scheduler
        assert len(scheduler) == 1
        await asyncio.sleep(0.15)
    assert job.started == [other]


async def test_bookkeeping_and_invalid_arguments() -> None:
    scheduler = Scheduler(Recorder())
    key = ("ns", "a")
    assert scheduler.due_time(key) is None
    assert len(scheduler) == 0
    scheduler.schedule(key, 100.0)
    scheduler.schedule(key, 50.0)
    assert scheduler.due_time(key) == 50.0
    assert key in scheduler
    assert len(scheduler) == 1
    assert scheduler.running_count == 0
    scheduler.schedule(key, 80.0, keep_earlier=True)
    assert scheduler.due_time(key) == 50.0
    scheduler.schedule(key, 20.0, keep_earlier=True)
    assert scheduler.due_time(key) == 20.0
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            scheduler.schedule(key, bad)
    with pytest.raises(ValueError, match="concurrency"):
        Scheduler(Recorder(), concurrency=0)


async def test_no_concurrent_run_of_one_key_and_one_coalesced_rerun() -> None:
    job = Recorder()
    key = ("ns", "busy")
    job.gates[key] = gate = asyncio.Event()
    scheduler = Scheduler(job)
    async with running(scheduler):
        scheduler.schedule_now(key)
        await until(lambda: scheduler.running_count == 1)
        for _ in range(3):  # comes due three more times while running
            scheduler.schedule(key, time.time())
            await asyncio.sleep(0.02)
        assert scheduler.due_time(key) is not None  # the pending rerun counts as scheduled
        assert len(scheduler) == 1
        assert job.started == [key]
        del job.gates[key]
        gate.set()
        await until(lambda: len(job.finished) == 2)
        assert await scheduler.wait_idle(1.0)
    assert job.started == [key, key]
    assert job.max_parallel_per_key == 1
    assert len(scheduler) == 0


@pytest.mark.parametrize("drop", ["cancel", "schedule"])
async def test_cancel_or_reschedule_during_a_run_drops_the_rerun(drop: str) -> None:
    job = Recorder()
    key = ("ns", "busy")
    job.gates[key] = gate = asyncio.Event()
    scheduler = Scheduler(job)
    async with running(scheduler):
        scheduler.schedule_now(key)
        await until(lambda: scheduler.running_count == 1)
        scheduler.schedule_now(key)
        await asyncio.sleep(0.02)  # it came due: a rerun is pending
        if drop == "cancel":
            scheduler.cancel(key)
        else:
            scheduler.schedule(key, time.time() + 60)
        gate.set()
        assert await scheduler.wait_idle(1.0)
    assert job.started == [key]


async def test_keep_earlier_keeps_a_pending_rerun() -> None:
    job = Recorder()
    key = ("ns", "busy")
    job.gates[key] = gate = asyncio.Event()
    scheduler = Scheduler(job)
    async with running(scheduler):
        scheduler.schedule_now(key)
        await until(lambda: scheduler.running_count == 1)
        scheduler.schedule_now(key)  # e.g. the credential Secret changed during the refresh
        await asyncio.sleep(0.02)
        scheduler.schedule(key, time.time() + 60, keep_earlier=True)  # the job's own "next refresh"
        del job.gates[key]
        gate.set()
        await until(lambda: len(job.finished) == 2)
    assert job.started == [key, key]


async def test_concurrency_bound_is_respected() -> None:
    job = Recorder(duration=0.005)
    scheduler = Scheduler(job, concurrency=8)
    now = time.time()
    for key in keys(200):
        scheduler.schedule(key, now)
    async with running(scheduler):
        await until(lambda: scheduler.running_count == 8)
        assert await scheduler.wait_idle(5.0)
    assert job.max_parallel == 8
    assert len(job.finished) == 200


async def test_a_failing_job_is_logged_and_does_not_stop_others(caplog: pytest.LogCaptureFixture) -> None:
    job = Recorder()
    bad = ("ns", "bad")
    job.failing.add(bad)
    scheduler = Scheduler(job, concurrency=2)
    caplog.set_level(logging.ERROR, logger="secured_endpoint.schedule")
    async with running(scheduler):
        scheduler.schedule_now(bad)
        for key in keys(10):
            scheduler.schedule(key, time.time() + 0.01)
        await until(lambda: len(job.finished) == 11)
        scheduler.schedule_now(bad)  # the loop still runs; the key can run again
        await until(lambda: len(job.finished) == 12)
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 2
    message = errors[0].getMessage()
    assert "('ns', 'bad')" in message
    assert "RuntimeError: boom for bad" in message
    assert errors[0].exc_info is None  # no traceback at ERROR level


async def test_a_wall_clock_jump_is_noticed_within_max_sleep() -> None:
    offset = 0.0

    def clock() -> float:
        return 1_000_000.0 + offset

    job = Recorder()
    key = ("ns", "jump")
    scheduler = Scheduler(job, clock=clock, max_sleep=0.05)
    scheduler.schedule(key, 1_000_000.0 + 3600)
    async with running(scheduler):
        await asyncio.sleep(0.1)
        assert job.started == []
        offset = 3600.0  # the wall clock jumps an hour ahead; nothing wakes the loop explicitly
        await until(lambda: job.finished == [key], timeout=0.5)


async def test_stop_waits_for_running_jobs_and_is_idempotent() -> None:
    job = Recorder(duration=0.05)
    scheduler = Scheduler(job)
    await scheduler.stop()  # never started: nothing to do
    await scheduler.start()
    await scheduler.start()  # idempotent
    scheduler.schedule_now(("ns", "a"))
    await until(lambda: scheduler.running_count == 1)
    await scheduler.stop()
    assert job.finished == [("ns", "a")]
    assert scheduler.running_count == 0
    await scheduler.stop()


@pytest.mark.parametrize("with_rerun", [False, True])
async def test_stop_cancels_jobs_after_the_grace_period_and_keeps_due_times(with_rerun: bool) -> None:
    job = Recorder()
    stuck, later = ("ns", "stuck"), ("ns", "later")
    job.gates[stuck] = asyncio.Event()  # never set
    scheduler = Scheduler(job)
    await scheduler.start()
    scheduler.schedule_now(stuck)
    await until(lambda: scheduler.running_count == 1)
    if with_rerun:
        scheduler.schedule_now(stuck)  # a pending rerun the stop interrupts
        await asyncio.sleep(0.02)
    scheduler.schedule(later, time.time() + 60)
    started = time.monotonic()
    await scheduler.stop(grace_period=0.05)
    assert time.monotonic() - started < 0.5
    assert scheduler.running_count == 0
    assert job.active[stuck] == 0  # cancelled, its finally ran
    assert stuck in scheduler  # the cancelled run (and any pending rerun) is due again
    assert later in scheduler
    del job.gates[stuck]
    async with running(scheduler):  # a restart carries on
        await until(lambda: job.finished.count(stuck) == 2)


async def test_wait_idle_reports_a_timeout() -> None:
    job = Recorder()
    key = ("ns", "slow")
    job.gates[key] = gate = asyncio.Event()
    scheduler = Scheduler(job)
    async with running(scheduler):
        assert await scheduler.wait_idle(0.1)  # nothing scheduled
        scheduler.schedule_now(key)
        assert not await scheduler.wait_idle(0.05)
        gate.set()
        assert await scheduler.wait_idle(1.0)


async def test_a_job_rescheduling_itself_runs_periodically() -> None:
    runs: list[float] = []
    key = ("ns", "periodic")

    async def job(key: Key) -> None:
        runs.append(time.time())
        if len(runs) < 5:
            scheduler.schedule(key, time.time() + 0.01, keep_earlier=True)

    scheduler: Scheduler[Key] = Scheduler(job)
    async with running(scheduler):
        scheduler.schedule_now(key)
        await until(lambda: len(runs) == 5)
        await asyncio.sleep(0.05)
    assert len(runs) == 5
    assert len(scheduler) == 0


async def test_rescheduling_one_key_many_times_keeps_the_heap_small() -> None:
    scheduler = Scheduler(Recorder())
    key = ("ns", "churn")
    for index in range(20_000):
        scheduler.schedule(key, 1000.0 + index)
    assert len(scheduler) == 1
    assert len(scheduler._heap) <= 2 + schedule._COMPACTION_SLACK


async def test_ten_thousand_keys_each_run_exactly_once() -> None:
    counts: Counter[Key] = Counter()

    async def job(key: Key) -> None:
        counts[key] += 1
        await asyncio.sleep(0)

    scheduler: Scheduler[Key] = Scheduler(job, concurrency=32)
    generator = random.Random(10_000)
    now = time.time()
    all_keys = list(keys(10_000))
    for key in all_keys:
        scheduler.schedule(key, now + generator.uniform(0.0, 0.3))
    assert len(scheduler) == 10_000
    async with running(scheduler):
        await until(lambda: len(scheduler) == 0, timeout=10.0)
        assert await scheduler.wait_idle(5.0)
    assert len(counts) == 10_000
    assert set(counts.values()) == {1}


def test_a_jwt_lifetime_is_counted_from_our_issue_time_not_the_issuers_clock() -> None:
    # an IdP whose clock is 5 minutes ahead: its exp is 5 minutes late by ours, its exp - iat is right
    skewed_exp = T0 + timedelta(minutes=5, seconds=4)
    expires, source = token_expiry(issued_at=T0, expires_in=None, jwt_exp=skewed_exp,
                                   jwt_lifetime=timedelta(seconds=4), default_expires_in=3600)
    assert (expires, source) == (T0 + timedelta(seconds=4), ExpirySource.JWT_EXP)
    # without iat the exp alone is all there is
    assert token_expiry(issued_at=T0, expires_in=None, jwt_exp=skewed_exp, default_expires_in=3600)[0] == skewed_exp
    # expires_in still wins
    assert token_expiry(issued_at=T0, expires_in=60, jwt_exp=skewed_exp, jwt_lifetime=timedelta(seconds=4),
                        default_expires_in=3600)[0] == T0 + timedelta(seconds=60)
