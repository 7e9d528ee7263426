"""When to refresh a token, and one scheduler that runs every endpoint's refresh on time.

Two halves, neither of which imports kopf, kubernetes or httpx:

**Pure policy** (docs/contract.md §5). Small functions that take every input as a keyword argument — the issue time,
the clock reading ``now``, a ``random.Random`` for jitter — and return a decision. They never read the clock
themselves, so tests pin them with fixed datetimes and a seeded ``Random``. All datetimes are timezone-aware;
results are in UTC.

- :func:`token_expiry` — when a freshly issued token expires: ``expires_in`` → the JWT ``exp`` →
  ``defaultExpiresInSeconds``, with absurd values clamped to ``[MIN_LIFETIME, MAX_LIFETIME]``.
- :func:`refresh_time` — when to fetch the next token: ``expires_at - refreshBefore`` minus a little jitter,
  kept inside ``(issued_at + 10 % of the lifetime, expires_at - safety margin]``.
- :func:`backoff_delay` / :func:`retry_time` — when to try again after a failed request: capped exponential
  backoff with "equal jitter", slower for errors that retrying will not fix, and one last attempt before a
  still-valid token expires.
- :func:`forced_refresh_at` — the per-endpoint floor between refreshes gateways or people asked for
  (docs/contract.md §4).

**The scheduler.** kopf timers are one asyncio task per object, each holding a copy of the body, and they only
know fixed intervals. Refreshes need "run at time T" for 10,000+ objects on one replica, so
:class:`Scheduler` keeps one heap of ``(due_time, sequence, key)`` entries for all of them:

- ``schedule``/``cancel`` are O(log n) / O(1): a dict maps each key to its one current heap entry and an
  entry that is no longer the key's current one is skipped when it reaches the top ("lazy deletion"); the
  heap is rebuilt when stale entries outnumber live ones, so memory stays at a few hundred bytes per key.
- One background task sleeps until the earliest due time (an ``asyncio.Event`` plus ``loop.call_later``, no
  polling). Scheduling something earlier than that wakes it; later schedules do not disturb it.
- Due jobs start at most ``concurrency`` at a time (one asyncio task per *running* job, none per waiting key),
  earliest *deadline* first: a key's deadline (by default its due time) is when waiting longer starts to
  hurt, such as the expiry of the token it would replace. With a backlog, a refresh whose token expires in
  seconds goes before one that came due earlier but whose token has minutes left (a rotated credential);
  without one, jobs start as they come due. A key never runs twice at once: if it comes due while its
  previous run is still going, it runs once more right after that run ends, however often it came due
  meanwhile.
- Due times are wall-clock seconds (``time.time()``), the unit of ``status.nextRefreshTime``, so they survive
  a restart. The event loop sleeps on a monotonic clock, so each sleep is capped (``max_sleep``) and a jump
  of the wall clock is noticed within that cap.

The scheduler is not thread-safe: call it from the event loop it runs in.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Generic, TypeVar

logger = logging.getLogger("secured_endpoint.schedule")

# ----------------------------------------------------------------------------------------------------
# Pure policy: token lifetime
# ----------------------------------------------------------------------------------------------------

# A server that announces a multi-year token is misconfigured or lying; refreshing at least yearly costs
# nothing and keeps the arithmetic below (and Redis PEXPIREAT) in sane ranges.
MAX_LIFETIME = timedelta(days=366)
# A token living less than this is treated as living this long: the refresh window below needs room to exist.
MIN_LIFETIME = timedelta(seconds=1)


class ExpirySource(enum.StrEnum):
    """Where :func:`token_expiry` took the expiry from (for logs and status messages)."""

    EXPIRES_IN = "expires_in"  # the token response's expires_in
    JWT_EXP = "jwt_exp"  # the access token is a JWT and carries exp
    DEFAULT = "default"  # spec.refresh.defaultExpiresInSeconds


def token_expiry(
    *,
    issued_at: datetime,
    expires_in: int | None,
    jwt_exp: datetime | None,
    default_expires_in: int,
    jwt_lifetime: timedelta | None = None,
) -> tuple[datetime, ExpirySource]:
    """Return when a token issued at ``issued_at`` expires, and where that came from (docs/contract.md §5).

    The first usable source wins:

    1. ``expires_in`` from the token response, if positive. ``0`` or a negative value is no lifetime (some
       servers send ``0`` for "unknown"); treating it as "expired at once" would refresh in a tight loop.
    2. the JWT's own lifetime ``exp - iat`` (``jwt_lifetime``), counted from ``issued_at``: the issuer's clock
       may be minutes ahead of ours or behind, but the difference of two of its readings is not skewed.
    3. the JWT ``exp`` claim alone, if it lies after ``issued_at``. An ``exp`` at or before ``issued_at`` is in
       the past or comes from a skewed clock, and would also cause a tight loop, so it is ignored.
    4. ``default_expires_in``.

    The lifetime is then clamped to ``[MIN_LIFETIME, MAX_LIFETIME]``.
    """
    issued_at = _as_utc(issued_at, "issued_at")
    if expires_in is not None and expires_in > 0:
        return issued_at + _seconds_lifetime(expires_in), ExpirySource.EXPIRES_IN
    if jwt_lifetime is not None and jwt_lifetime > timedelta(0):
        return issued_at + _clamp_lifetime(jwt_lifetime), ExpirySource.JWT_EXP
    if jwt_exp is not None:
        jwt_exp = _as_utc(jwt_exp, "jwt_exp")
        if jwt_exp > issued_at:
            return issued_at + _clamp_lifetime(jwt_exp - issued_at), ExpirySource.JWT_EXP
    return issued_at + _seconds_lifetime(default_expires_in), ExpirySource.DEFAULT


def _clamp_lifetime(lifetime: timedelta) -> timedelta:
    return min(max(lifetime, MIN_LIFETIME), MAX_LIFETIME)


def _seconds_lifetime(seconds: float) -> timedelta:
    # Clamp before building the timedelta: an absurd expires_in (1e20) would overflow it.
    return _clamp_lifetime(timedelta(seconds=min(seconds, MAX_LIFETIME.total_seconds())))


def _as_utc(moment: datetime, name: str) -> datetime:
    # A naive datetime is ambiguous (local time? UTC?) and would silently shift every refresh by the UTC
    # offset.
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got naive {moment.isoformat()}")
    return moment.astimezone(UTC)


# ----------------------------------------------------------------------------------------------------
# Pure policy: proactive refresh
# ----------------------------------------------------------------------------------------------------

# refreshBefore when the spec sets neither seconds nor percent: refresh after two thirds of the lifetime.
DEFAULT_REFRESH_BEFORE_FRACTION = 1 / 3
# Never refresh before this fraction of the lifetime has passed: a refreshBeforeSeconds longer than the
# lifetime would otherwise schedule the next refresh at once, every time — a refresh loop against the token
# server.
EARLIEST_REFRESH_FRACTION = 0.1
# Never refresh later than expires_at minus min(SAFETY_MARGIN, SAFETY_MARGIN_FRACTION * lifetime): the old
# token must still be valid when gateways read the new one, even with a few seconds of clock skew between
# hosts.
SAFETY_MARGIN = timedelta(seconds=5)
SAFETY_MARGIN_FRACTION = 0.1
# Jitter spreads tokens issued in the same second (e.g. after a restart) over up to a minute, so they do not
# all come back in the same second. It is a fraction of refreshBefore so that short-lived tokens keep most of
# their margin.
REFRESH_JITTER_FRACTION = 0.1
MAX_REFRESH_JITTER = timedelta(seconds=60)


def refresh_time(
    *,
    issued_at: datetime,
    expires_at: datetime,
    refresh_before_seconds: int | None,
    refresh_before_percent: int | None,
    rng: random.Random,
) -> datetime:
    """Return when to fetch the next token for one that is valid from ``issued_at`` to ``expires_at``.

    The target is ``expires_at - refresh_before`` where ``refresh_before`` is ``refresh_before_seconds``, or
    ``refresh_before_percent`` % of the lifetime, or a third of the lifetime when neither is set or when
    ``refresh_before_seconds`` is not shorter than the lifetime (as cert-manager does for a renewBefore
    longer than the certificate: a 300 s margin on a 60 s token means "refresh early", not "always"). A random jitter
    of up to ``min(10 % of refresh_before, 60 s)`` then moves it *earlier*, never later. The result always
    lies in ``[issued_at + 10 % of the lifetime, expires_at - min(5 s, 10 % of the lifetime)]``, so a huge
    ``refreshBeforeSeconds`` cannot cause a refresh loop and a zero one cannot serve an expired token.

    Raises ``ValueError`` if both refresh-before settings are given (the CRD refuses that) or if the token's
    lifetime is shorter than ``MIN_LIFETIME`` (:func:`token_expiry` never produces one).
    """
    issued_at = _as_utc(issued_at, "issued_at")
    expires_at = _as_utc(expires_at, "expires_at")
    if refresh_before_seconds is not None and refresh_before_percent is not None:
        raise ValueError("refresh_before_seconds and refresh_before_percent are mutually exclusive")
    lifetime = expires_at - issued_at
    if lifetime < MIN_LIFETIME:
        raise ValueError(f"token lifetime {lifetime} is shorter than {MIN_LIFETIME}")

    if refresh_before_seconds is not None and refresh_before_seconds < lifetime.total_seconds():
        refresh_before = timedelta(seconds=refresh_before_seconds)
    elif refresh_before_percent is not None:
        refresh_before = lifetime * (refresh_before_percent / 100)
    else:
        refresh_before = lifetime * DEFAULT_REFRESH_BEFORE_FRACTION

    # Timedelta arithmetic (whole microseconds) keeps the bounds exact; float seconds would round across them.
    safety_margin = min(SAFETY_MARGIN, lifetime * SAFETY_MARGIN_FRACTION)
    earliest = issued_at + lifetime * EARLIEST_REFRESH_FRACTION
    latest = expires_at - safety_margin
    refresh_before = min(max(refresh_before, safety_margin), expires_at - earliest)

    jitter_span = min(refresh_before * REFRESH_JITTER_FRACTION, MAX_REFRESH_JITTER)
    jitter = jitter_span * rng.random()
    # Clamping after the jitter keeps `earliest` a hard bound; a token capped there simply gets no jitter.
    return min(max(expires_at - refresh_before - jitter, earliest), latest)


# ----------------------------------------------------------------------------------------------------
# Pure policy: retries after a failure
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff: the n-th consecutive failure waits up to ``min(cap, base * 2^(n-1))``."""

    base_seconds: float
    cap_seconds: float

    def ceiling(self, failures: int) -> float:
        """The longest delay after ``failures`` consecutive failures (1 = the first): doubling up to the cap."""
        if failures < 1:
            raise ValueError(f"failures counts from 1 (the first failure), got {failures}")
        return min(self.cap_seconds, self.base_seconds * 2.0 ** min(failures - 1, _MAX_DOUBLINGS))


# Transient errors (unreachable, timeout, 5xx, 429): retry quickly at first, then back off to 5 minutes.
TRANSIENT_BACKOFF = Backoff(base_seconds=1.0, cap_seconds=300.0)
# invalid_client / invalid_grant / unauthorized_client: retrying will not help until someone fixes the
# credentials (and a credential Secret change triggers a refresh at once anyway), so do not hammer the server
# or fill its audit log: start at a minute, back off to an hour.
PERMANENT_BACKOFF = Backoff(base_seconds=60.0, cap_seconds=3600.0)
# Doubling beyond this adds nothing below any sane cap; bounding it keeps 2**n from growing huge integers.
_MAX_DOUBLINGS = 40


def backoff_ceiling(*, failures: int, permanent: bool) -> float:
    """Return the longest delay :func:`backoff_delay` may return after ``failures`` consecutive failures.

    It doubles with every failure from the policy's base up to its cap and never decreases.
    """
    return (PERMANENT_BACKOFF if permanent else TRANSIENT_BACKOFF).ceiling(failures)


def jittered_backoff(policy: Backoff, *, failures: int, rng: random.Random) -> float:
    """A delay in ``[ceiling / 2, ceiling]`` for ``policy`` after ``failures`` consecutive failures ("equal
    jitter"; see :func:`backoff_delay`). The one backoff formula of the operator: token refreshes, Kubernetes API
    retries, watch reconnects and Redis resubscribes all use it with their own :class:`Backoff`."""
    ceiling = policy.ceiling(failures)
    return ceiling / 2 + rng.uniform(0.0, ceiling / 2)


# A server's Retry-After is honoured up to this long; beyond it the header is more likely wrong than meant.
MAX_RETRY_AFTER_SECONDS = 3600.0


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header in delta-seconds form (RFC 9110 §10.2.3), capped at
    ``MAX_RETRY_AFTER_SECONDS``; None when absent or not delta-seconds (the HTTP-date form is rare and ignored)."""
    if value is None:
        return None
    text = value.strip()
    if not (text.isascii() and text.isdigit()):
        return None
    return min(float(text), MAX_RETRY_AFTER_SECONDS)


def backoff_delay(*, failures: int, permanent: bool, rng: random.Random) -> float:
    """Return how many seconds to wait before retrying after ``failures`` consecutive failures (1 = first).

    "Equal jitter": a uniformly random delay in ``[ceiling / 2, ceiling]``. Full jitter (``[0, ceiling]``)
    spreads load a little better but sometimes retries almost at once — even for ``invalid_client``, which we
    promise not to hammer — and its expected delay stops growing visibly to users reading the status. Equal
    jitter still spreads 10,000 endpoints that failed together over half the window, and guarantees each retry
    waits at least half the nominal delay (so ≥ 0.5 s for the first transient and ≥ 30 s for the first
    permanent failure).
    """
    return jittered_backoff(PERMANENT_BACKOFF if permanent else TRANSIENT_BACKOFF, failures=failures, rng=rng)


# How long before a still-valid token expires to make one last attempt, when backoff would overshoot it.
# Longer than a token request's timeout, so the new token can be stored before the old one is gone; jittered
# so tokens that expire together (issued together after a restart) do not all try in the same second.
LAST_CHANCE_LEAD = timedelta(seconds=30)
LAST_CHANCE_JITTER = timedelta(seconds=10)


def retry_time(
    *,
    now: datetime,
    failures: int,
    permanent: bool,
    expires_at: datetime | None,
    rng: random.Random,
) -> datetime:
    """Return when to retry after ``failures`` consecutive failures at ``now``.

    Normally ``now + backoff_delay(...)``. One exception keeps a valid token alive through a transient
    outage: if the last token (``expires_at``) would expire before that retry, the retry is pulled in to a
    "last chance" ``LAST_CHANCE_LEAD`` (+ up to ``LAST_CHANCE_JITTER``) before the expiry, provided that
    moment is still ahead. Once it has passed, plain backoff resumes, so there is exactly one extra attempt,
    not a burst that converges on the expiry. Permanent errors get no last chance: the same credentials will
    be refused again.
    """
    now = _as_utc(now, "now")
    delay = backoff_delay(failures=failures, permanent=permanent, rng=rng)
    retry_at = now + timedelta(seconds=delay)
    if permanent or expires_at is None:
        return retry_at
    expires_at = _as_utc(expires_at, "expires_at")
    last_chance = expires_at - LAST_CHANCE_LEAD - LAST_CHANCE_JITTER * rng.random()
    if now < last_chance < retry_at:
        return last_chance
    return retry_at


# ----------------------------------------------------------------------------------------------------
# Pure policy: reactive refresh (docs/contract.md §4)
# ----------------------------------------------------------------------------------------------------


# Forced refreshes allowed back to back before the floor applies. The floor is there for a token that is refused
# as soon as it is issued (a wrong audience, an IdP that revokes at once): without it every refused token would
# be replaced at once, in a loop. A token refused soon after it replaced a refused one is not that loop yet
# (an IdP revoking every session once, a rotation racing a revocation): it is replaced at once too.
FORCED_BURST = 2


def forced_refresh_at(*, now: datetime, recent: Sequence[datetime], floor_seconds: float,
                      burst: int = FORCED_BURST) -> datetime:
    """When a forced refresh (a gateway's report, the annotation) may run, given the times of the recent ones.

    At most ``burst`` run within any ``floor_seconds``; one more waits until the oldest of those is
    ``floor_seconds`` old. A time in the future means our clock went back (or another replica's was ahead): it
    is ignored rather than blocking every forced refresh until the clock catches up. A result at or before
    ``now`` means "now".
    """
    now = _as_utc(now, "now")
    floor = timedelta(seconds=floor_seconds)
    window = sorted(moment for moment in (_as_utc(m, "recent") for m in recent) if now - floor < moment <= now)
    if len(window) < burst:
        return now
    return window[-burst] + floor


# ----------------------------------------------------------------------------------------------------
# The scheduler
# ----------------------------------------------------------------------------------------------------

K = TypeVar("K", bound=Hashable)

# Cap of one sleep of the scheduler loop. The loop sleeps on the event loop's monotonic clock while due times
# are wall-clock; after a forward jump of the wall clock, due jobs start at most this late.
MAX_SLEEP_SECONDS = 10.0
# Stale heap entries (from rescheduling and cancelling) are dropped in one rebuild once they outnumber the
# live ones; the slack avoids rebuilding small heaps over and over.
_COMPACTION_SLACK = 1024


class Scheduler(Generic[K]):
    """Run ``run(key)`` for each key at its due time (wall-clock seconds), ``concurrency`` jobs at a time.

    - :meth:`schedule` sets (or replaces, earlier or later) a key's one due time; :meth:`cancel` removes it.
    - A job that is due while all ``concurrency`` slots are busy waits its turn; jobs start in due order
      (equal due times: in the order they were scheduled).
    - The scheduler runs a key once per due time and never reschedules by itself: the job schedules its own
      next run (e.g. the next refresh, or a retry).
    - A key never runs twice at once. If it comes due while running, it runs once more right after the current
      run (coalesced: at most one pending rerun). :meth:`cancel` or a new :meth:`schedule` drops that rerun.
    - A job's exception is logged (key and exception type and message only, never a traceback at ERROR level,
      since messages are all we control for secret content) and does not affect other jobs.
    - :meth:`cancel` does not interrupt a running job; it only removes what is still to come.
    - ``on_lag``, if given, is called with how late (seconds, start time minus due time) each run starts, a
      coalesced rerun included: the queue lag a metric can show (the scheduler itself knows no metrics).
    """

    __slots__ = (
        "_clock",
        "_concurrency",
        "_deadlines",
        "_entries",
        "_heap",
        "_loop_task",
        "_max_sleep",
        "_name",
        "_next_wake",
        "_on_lag",
        "_progress",
        "_ready",
        "_reruns",
        "_run",
        "_running",
        "_sequence",
        "_stopping",
        "_tasks",
        "_turned_at",
        "_wakeup",
    )

    def __init__(
        self,
        run: Callable[[K], Awaitable[None]],
        *,
        concurrency: int = 32,
        clock: Callable[[], float] = time.time,
        name: str = "refresh",
        max_sleep: float = MAX_SLEEP_SECONDS,
        on_lag: Callable[[float], None] | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        if not max_sleep > 0:
            raise ValueError(f"max_sleep must be positive, got {max_sleep}")
        self._run = run
        self._concurrency = concurrency
        self._clock = clock
        self._name = name
        self._max_sleep = max_sleep
        self._on_lag = on_lag
        # Heap entries are (due_time, sequence, key): the unique sequence breaks ties first-come-first-served
        # and means keys are never compared (they need only be hashable). An entry is live only while it is
        # the very object in `_entries[key]`; everything else in the heap is stale and skipped.
        self._heap: list[tuple[float, int, K]] = []
        self._entries: dict[K, tuple[float, int, K]] = {}
        self._sequence = itertools.count()
        # Due entries waiting for a slot, as (deadline, sequence, entry), live while `entry` is still the key's.
        self._ready: list[tuple[float, int, tuple[float, int, K]]] = []
        self._deadlines: dict[K, float] = {}
        # Keys that came due while running, with that due time. Disjoint from `_entries`.
        self._reruns: dict[K, float] = {}
        self._running: set[K] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # The loop sleeps on `_wakeup`. `_next_wake` is the due time it is sleeping towards: schedule() only
        # wakes it for something earlier. -inf means "waiting for a free slot" (a finishing job wakes it, new
        # entries could not start anyway); +inf means "nothing scheduled".
        self._wakeup = asyncio.Event()
        self._next_wake = math.inf
        # Set whenever a job finishes or the schedule changes, for wait_idle().
        self._progress = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._turned_at: float | None = None

    # ----- scheduling ---------------------------------------------------------------------------------------

    def schedule(self, key: K, when: float, *, keep_earlier: bool = False, deadline: float | None = None) -> None:
        """Make ``key`` due at ``when`` (``time.time()`` seconds), replacing its previous due time; among due
        keys waiting for a slot, the earliest ``deadline`` (default: ``when``) starts first.

        With ``keep_earlier=True`` an existing earlier (or equal) due time — including a pending rerun — is
        kept instead, with the earlier of the two deadlines. A job rescheduling itself should use it, so that
        a "refresh now" that arrived while it was running (say, a changed credential Secret) is not
        overwritten by the job's own "next refresh in an hour".
        """
        if not math.isfinite(when):
            raise ValueError(f"due time must be a finite number of seconds, got {when}")
        deadline = when if deadline is None else deadline
        if keep_earlier:
            current = self.due_time(key)
            if current is not None and current <= when:
                self._deadlines[key] = min(self._deadlines.get(key, current), deadline)
                return
        self._deadlines[key] = deadline
        self._reruns.pop(key, None)
        entry = (when, next(self._sequence), key)
        self._entries[key] = entry
        heapq.heappush(self._heap, entry)
        if when < self._next_wake:
            self._next_wake = when
            self._wakeup.set()
        self._progress.set()
        self._compact_if_needed()

    def schedule_now(self, key: K) -> None:
        """Make ``key`` due now; a key that is already due keeps its earlier due time and place in line."""
        self.schedule(key, self._clock(), keep_earlier=True)

    def cancel(self, key: K) -> None:
        """Forget ``key``'s due time and any pending rerun. A run in progress finishes undisturbed."""
        self._reruns.pop(key, None)
        self._deadlines.pop(key, None)
        if self._entries.pop(key, None) is not None:
            self._compact_if_needed()
        self._progress.set()

    def due_time(self, key: K) -> float | None:
        """Return when ``key`` is due (a pending rerun: when it came due), or None if nothing is scheduled."""
        entry = self._entries.get(key)
        if entry is not None:
            return entry[0]
        return self._reruns.get(key)

    def __len__(self) -> int:
        """Return the number of keys with a due time (including those waiting to rerun)."""
        return len(self._entries) + len(self._reruns)

    def __contains__(self, key: object) -> bool:
        return key in self._entries or key in self._reruns

    @property
    def running_count(self) -> int:
        """Return the number of jobs running right now (at most ``concurrency``)."""
        return len(self._running)

    def _compact_if_needed(self) -> None:
        # Amortised O(1): a rebuild is O(n) and happens only after n stale entries accumulated.
        if len(self._heap) + len(self._ready) > 2 * len(self._entries) + _COMPACTION_SLACK:
            entries = self._entries
            self._ready = [item for item in self._ready if entries.get(item[2][2]) is item[2]]
            heapq.heapify(self._ready)
            readied = {id(item[2]) for item in self._ready}
            self._heap = [entry for entry in entries.values() if id(entry) not in readied]
            heapq.heapify(self._heap)

    def _peek(self) -> tuple[float, int, K] | None:
        """Return the earliest live entry, dropping stale ones from the top of the heap."""
        heap = self._heap
        entries = self._entries
        while heap:
            top = heap[0]
            if entries.get(top[2]) is top:
                return top
            heapq.heappop(heap)
        return None

    # ----- lifecycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the background loop (idempotent). Keys scheduled before are picked up at once."""
        if self._loop_task is not None:
            return
        self._stopping = False
        self._loop_task = asyncio.create_task(self._loop(), name=f"{self._name}-scheduler")
        self._loop_task.add_done_callback(self._report_loop_exit)

    async def stop(self, grace_period: float = 10.0) -> None:
        """Stop the loop, wait up to ``grace_period`` seconds for running jobs, then cancel those left.

        Idempotent. Due times are kept, and a pending rerun the stop skipped or a job it cancelled becomes due
        again, so a later :meth:`start` carries on where this one left off.
        """
        loop_task, self._loop_task = self._loop_task, None
        if loop_task is None:
            return
        self._stopping = True  # running jobs finish their current run but do not start a pending rerun
        loop_task.cancel()
        await asyncio.wait([loop_task])
        if self._tasks:
            _, unfinished = await asyncio.wait(set(self._tasks), timeout=grace_period)
            if unfinished:
                logger.warning(
                    "%s scheduler: cancelling %d job(s) still running %.1f s after stop",
                    self._name,
                    len(unfinished),
                    grace_period,
                )
                for task in unfinished:
                    task.cancel()
                await asyncio.wait(unfinished)

    # A timeout parameter rather than asyncio.timeout(): "not idle in time" is an answer here, not an error.
    async def wait_idle(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait until no job runs and none is due; return False if that took longer than ``timeout`` seconds.

        Keys due in the future do not count. Meant for tests and benchmarks.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._is_idle():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._progress.clear()
            # Time passing can make entries due without any event; the cap re-checks for that.
            await self._sleep_until_set(self._progress, min(remaining, self._max_sleep))
        return True

    def _is_idle(self) -> bool:
        if self._running or self._reruns:
            return False
        top = self._peek()
        return top is None or top[0] > self._clock()

    def _report_loop_exit(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # A bug in the loop itself: nothing will be refreshed any more, so say so loudly.
            logger.critical("%s scheduler loop crashed: %r", self._name, task.exception())

    # ----- the loop and the jobs ----------------------------------------------------------------------------

    @property
    def turned_at(self) -> float | None:
        """When the loop last turned (the event loop's monotonic clock); None before it started. It turns at
        least every ``max_sleep`` seconds while running, so a much older value means it is stuck."""
        return self._turned_at

    async def _loop(self) -> None:
        while True:
            self._turned_at = asyncio.get_running_loop().time()
            self._start_due_jobs()
            self._wakeup.clear()
            if len(self._running) >= self._concurrency:
                self._next_wake = -math.inf
                delay = self._max_sleep
            else:
                top = self._peek()
                if top is None:
                    self._next_wake = math.inf
                    delay = self._max_sleep
                else:
                    self._next_wake = top[0]
                    delay = min(max(top[0] - self._clock(), 0.0), self._max_sleep)
            await self._sleep_until_set(self._wakeup, delay)

    @staticmethod
    async def _sleep_until_set(event: asyncio.Event, delay: float) -> None:
        # One timer handle instead of asyncio.wait_for(), which would create a task per sleep.
        handle = asyncio.get_running_loop().call_later(delay, event.set)
        try:
            await event.wait()
        finally:
            handle.cancel()

    def _start_due_jobs(self) -> None:
        now = self._clock()
        while (top := self._peek()) is not None and top[0] <= now:  # due: in line by deadline
            heapq.heappop(self._heap)
            heapq.heappush(self._ready, (self._deadlines.get(top[2], top[0]), top[1], top))
        entries, ready = self._entries, self._ready
        while len(self._running) < self._concurrency and ready:
            _, _, entry = heapq.heappop(ready)
            when, _, key = entry
            if entries.get(key) is not entry:
                continue  # rescheduled or cancelled while in line
            del entries[key]
            self._deadlines.pop(key, None)
            if key in self._running:
                self._reruns[key] = when  # coalesced: one rerun however often it comes due meanwhile
                continue
            self._running.add(key)
            self._report_lag(now - when)
            task = asyncio.create_task(self._run_key(key), name=f"{self._name}:{key!r}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run_key(self, key: K) -> None:
        cancelled = False
        try:
            while True:
                await self._run_once(key)
                if self._stopping or key not in self._reruns:
                    return
                # Rerun in the same task and slot: "right after", and ahead of keys still waiting for a slot.
                self._report_lag(self._clock() - self._reruns.pop(key))
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            self._running.discard(key)
            interrupted_rerun = self._reruns.pop(key, None)
            if interrupted_rerun is not None:  # stop() came first: keep it for the next start()
                self.schedule(key, interrupted_rerun)
            if cancelled:  # cut off mid-run, so it never scheduled its next run: it is due again
                self.schedule(key, self._clock(), keep_earlier=True)
            if self._next_wake == -math.inf:  # the loop is waiting for a free slot
                self._wakeup.set()
            self._progress.set()

    def _report_lag(self, seconds: float) -> None:
        if self._on_lag is None:
            return
        try:
            self._on_lag(seconds)
        except Exception as error:  # a broken metric must not stop the refreshes
            logger.error("%s scheduler: the lag callback failed: %s: %s", self._name, type(error).__name__, error)

    async def _run_once(self, key: K) -> None:
        try:
            await self._run(key)
        except Exception as error:  # a job's bug must not stop the other 9,999 endpoints
            logger.error("%s job for %r failed: %s: %s", self._name, key, type(error).__name__, error)
            logger.debug("%s job for %r failed", self._name, key, exc_info=error)
