"""Leader election on a ``coordination.k8s.io/v1`` Lease, with client-go's rules and defaults.

Replicas compete for one Lease; only its holder refreshes tokens and writes. The rules are those of client-go's
``tools/leaderelection`` (defaults: 15 s lease, 10 s renew deadline, 2 s retry period):

- **Acquire**: read the Lease, creating it when missing (a POST a rival may win: 409, then read who). Write
  ourselves in only when nobody holds it, or its holder let it run out *by our own clock*: the record unchanged
  for ``leaseDurationSeconds`` since we first saw it so (client-go's ``observedTime``). The record's timestamps
  are never compared with our clock, so skew between nodes does not matter (a different clock rate would).
  Every write is a PUT over the resourceVersion read: of two rivals one wins, the other gets 409.
  ``leaseTransitions`` goes up by one whenever the holder changes.
- **Renew** every retry period. A leader whose renewals have not succeeded for the renew deadline stops leading:
  ``renew_deadline`` after the *start* of its last successful write, while a rival counts ``lease_duration``
  from when it *saw* that write — so the leader has stopped before anyone may take over. A leader that finds
  another holder in the Lease, or loses a conflicting write (409) to a rival, steps down at once.
- **Follow**: try again after a retry period jittered like client-go's (``JitterFactor`` 1.2: a wait in
  ``[1, 2.2)`` retry periods) — but never later than the moment the holder's lease runs out by our clock
  (:func:`follower_wait`), where client-go may wait up to 2.2 more retry periods. A dead leader is then replaced
  at most ``lease_duration + 2.2 * retry_period`` after its last renewal (19.4 s by default, not 23.8 s).
- **Release** when :meth:`LeaderElector.run` ends (client-go's ReleaseOnCancel): holder empty, lease duration
  1 s, so a follower takes over at its next try — only after ``on_stopped_leading`` has returned, so the old
  leader's writes are over.

The decisions are pure functions with the clock as an argument (:func:`observe`, :func:`may_take`,
:func:`renew_deadline_passed`, :func:`next_record`, :func:`release_record`, :func:`follower_wait`);
:class:`LeaderElector` does the timing and the I/O, all of it through :class:`kube.KubeClient`. Like client-go
there is no fencing: a leader whose event loop stalls for longer than ``lease_duration - renew_deadline`` could
still finish a write after a rival took over. :attr:`LeaderElector.is_leader` reads the clock each time, so a
writer that asks just before each write keeps that window to the write itself.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from secured_endpoint import kube
from secured_endpoint.settings import OperatorSettings

logger = logging.getLogger(__name__)

LEASE_API_VERSION = "coordination.k8s.io/v1"
JITTER_FACTOR = 1.2
"""client-go's JitterFactor: a follower waits ``retry_period * (1 + JITTER_FACTOR * u)``, ``u`` in ``[0, 1)``."""
RELEASED_LEASE_DURATION_SECONDS = 1
"""What a release writes (as client-go does): a follower may take an empty Lease at once anyway."""
MICRO_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
"""``metav1.MicroTime`` as the apiserver writes it: RFC 3339 UTC with microseconds."""

Callback = Callable[[], Awaitable[None] | None]
LeaderCallback = Callable[[str], Awaitable[None] | None]


# -- timing -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """The three durations of an election, in seconds, checked as client-go checks them."""

    lease_duration: float = 15.0
    """How long a rival waits, by its own clock, for a holder that stopped renewing."""
    renew_deadline: float = 10.0
    """How long the leader keeps failing to renew before it stops leading."""
    retry_period: float = 2.0
    """Time between two tries (a follower's jittered by :attr:`jitter_factor`)."""
    jitter_factor: float = JITTER_FACTOR
    """A follower's wait is ``retry_period * (1 + jitter_factor * u)``; 0 means no jitter."""

    def __post_init__(self) -> None:
        problems = timing_problems(self.lease_duration, self.renew_deadline, self.retry_period)
        if self.jitter_factor < 0:
            problems.append("the jitter factor must not be negative")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_settings(cls, settings: OperatorSettings) -> Timing:
        return cls(lease_duration=settings.lease_duration_seconds, renew_deadline=settings.renew_deadline_seconds,
                   retry_period=settings.retry_period_seconds)

    @property
    def lease_duration_seconds(self) -> int:
        """``leaseDurationSeconds`` as written: whole seconds, rounded up so no rival waits less than asked."""
        return max(1, math.ceil(self.lease_duration))


def timing_problems(lease_duration: float, renew_deadline: float, retry_period: float) -> list[str]:
    """client-go's rules: a leader must notice it cannot renew before its lease runs out, and must have time for
    more than one try before it gives up."""
    problems = [f"{name} must be greater than zero" for name, value in
                (("the lease duration", lease_duration), ("the renew deadline", renew_deadline),
                 ("the retry period", retry_period)) if not value > 0]
    if lease_duration <= renew_deadline:
        problems.append(f"the lease duration ({lease_duration:g} s) must be greater than the renew deadline "
                        f"({renew_deadline:g} s)")
    if renew_deadline <= JITTER_FACTOR * retry_period:
        problems.append(f"the renew deadline ({renew_deadline:g} s) must be greater than {JITTER_FACTOR:g} times "
                        f"the retry period ({retry_period:g} s)")
    return problems


def jittered(period: float, factor: float, rng: random.Random) -> float:
    """client-go's ``wait.Jitter``: ``period`` plus up to ``factor`` periods, uniformly: ``[p, p * (1 + f))``."""
    return period + rng.random() * factor * period


def follower_wait(observation: Observation | None, identity: str, timing: Timing, now: float,
                  rng: random.Random) -> float:
    """How long a follower waits before its next try: the jittered retry period, cut short to the moment
    another holder's lease runs out by our clock (if that is still ahead), so that a dead leader is replaced as
    soon as the rules allow. A live leader renews long before that moment, so this costs no extra reads."""
    wait = jittered(timing.retry_period, timing.jitter_factor, rng)
    if observation is not None and observation.record.holder not in ("", identity):
        expiry = observation.observed_at + observation.record.lease_duration_seconds
        if expiry > now:
            wait = min(wait, expiry - now)
    return wait


def renew_deadline_passed(renewed_at: float, timing: Timing, now: float) -> bool:
    """Has the leader gone ``renew_deadline`` without a successful write? ``renewed_at`` is when its last
    successful write *started* (monotonic seconds), which no rival can have seen earlier."""
    return now >= renewed_at + timing.renew_deadline


# -- the record ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LeaseRecord:
    """The leader-election part of a Lease's ``spec`` (client-go's LeaderElectionRecord)."""

    holder: str = ""
    """``holderIdentity``; empty: nobody holds the Lease (released, or never taken)."""
    lease_duration_seconds: int = 0
    acquire_time: str | None = None
    """``acquireTime`` as written (MicroTime text); only ever compared, never read as a time."""
    renew_time: str | None = None
    transitions: int = 0
    """``leaseTransitions``: how often the holder changed."""

    @classmethod
    def from_lease(cls, lease: Mapping[str, Any]) -> LeaseRecord:
        spec = lease.get("spec") or {}
        return cls(holder=str(spec.get("holderIdentity") or ""),
                   lease_duration_seconds=_whole(spec.get("leaseDurationSeconds")),
                   acquire_time=_text_or_none(spec.get("acquireTime")),
                   renew_time=_text_or_none(spec.get("renewTime")),
                   transitions=_whole(spec.get("leaseTransitions")))

    def spec(self) -> dict[str, Any]:
        """The Lease ``spec`` holding this record, and nothing else (client-go writes the same five fields)."""
        spec: dict[str, Any] = {"holderIdentity": self.holder, "leaseDurationSeconds": self.lease_duration_seconds,
                                "leaseTransitions": self.transitions}
        if self.acquire_time is not None:
            spec["acquireTime"] = self.acquire_time
        if self.renew_time is not None:
            spec["renewTime"] = self.renew_time
        return spec


def _whole(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def micro_time(moment: datetime) -> str:
    """``2026-12-01T12:00:00.000000Z``: a ``metav1.MicroTime``. ``moment`` must be timezone-aware."""
    if moment.tzinfo is None:
        raise ValueError("a naive datetime: the wall clock must return timezone-aware times")
    return moment.astimezone(UTC).strftime(MICRO_TIME_FORMAT)


def next_record(current: LeaseRecord | None, identity: str, timing: Timing, wall_now: datetime) -> LeaseRecord:
    """The record ``identity`` writes to take or keep the Lease at ``wall_now``.

    Keeping it (already the holder): same ``acquireTime`` and ``leaseTransitions``, a new ``renewTime``.
    Taking it from someone else or from nobody: both times now and one more transition. Creating the Lease
    (``current`` None): no transition yet.
    """
    stamp = micro_time(wall_now)
    if current is not None and current.holder == identity:
        return replace(current, lease_duration_seconds=timing.lease_duration_seconds, renew_time=stamp,
                       acquire_time=current.acquire_time or stamp)
    transitions = 0 if current is None else current.transitions + 1
    return LeaseRecord(holder=identity, lease_duration_seconds=timing.lease_duration_seconds, acquire_time=stamp,
                       renew_time=stamp, transitions=transitions)


def release_record(current: LeaseRecord, wall_now: datetime) -> LeaseRecord:
    """What a leader writes to give the Lease up: no holder, a 1 s lease, the transitions kept (client-go's)."""
    stamp = micro_time(wall_now)
    return LeaseRecord(holder="", lease_duration_seconds=RELEASED_LEASE_DURATION_SECONDS, acquire_time=stamp,
                       renew_time=stamp, transitions=current.transitions)


# -- what was seen, and when ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    """A record and when (our monotonic clock) we first saw the Lease hold exactly it."""

    record: LeaseRecord
    observed_at: float


def observe(previous: Observation | None, record: LeaseRecord, now: float) -> Observation:
    """The observation after reading ``record`` at ``now``: the previous one if the record did not change (its
    clock keeps running), else a new one starting now. A renewal changes ``renewTime``, so it restarts the
    clock; a change to the Lease's labels or annotations does not."""
    if previous is not None and previous.record == record:
        return previous
    return Observation(record=record, observed_at=now)


def lease_expired(observation: Observation, now: float) -> bool:
    """Has the record gone unchanged for its own ``leaseDurationSeconds`` (not ours) by our clock?"""
    return now >= observation.observed_at + observation.record.lease_duration_seconds


def may_take(observation: Observation, identity: str, now: float) -> bool:
    """May ``identity`` write itself into the Lease? When nobody holds it, it already does, or the holder's lease
    ran out by our clock."""
    holder = observation.record.holder
    return not holder or holder == identity or lease_expired(observation, now)


# -- bodies and identity --------------------------------------------------------------------------------------


def new_lease(namespace: str, name: str, record: LeaseRecord) -> kube.JSON:
    """The Lease to create, holding ``record``."""
    return {"apiVersion": LEASE_API_VERSION, "kind": "Lease", "metadata": {"name": name, "namespace": namespace},
            "spec": record.spec()}


def updated_lease(lease: Mapping[str, Any], record: LeaseRecord) -> kube.JSON:
    """The Lease as read, its spec replaced by ``record``: metadata kept — labels, annotations and the
    resourceVersion, which makes the PUT conditional on nobody having written since."""
    return {**lease, "spec": record.spec()}


def default_identity(environ: Mapping[str, str] | None = None, hostname: str | None = None) -> str:
    """``<pod name>_<uuid4>``: the Pod's name (``POD_NAME``, else the host name) for people reading the Lease, and
    a random part so that two processes on one host (or a restarted Pod) are never taken for one another."""
    environ = os.environ if environ is None else environ
    name = environ.get("POD_NAME", "").strip() or (hostname if hostname is not None else socket.gethostname())
    return f"{name.strip() or 'secured-endpoint-operator'}_{uuid.uuid4()}"


# -- the elector ----------------------------------------------------------------------------------------------


class _Outcome(Enum):
    HOLDING = "holding"  # we hold the Lease now: acquired or renewed
    HELD = "held"  # a rival holds a live lease, or won the write
    FAILED = "failed"  # the API did not say (error, no answer in time)


class LeaderElector:
    """One candidate in the election for the Lease ``namespace/name``; :meth:`run` it as a task of its own.

    - :attr:`is_leader` — leading right now (checked against the renew deadline each time it is read: ask it
      before each write); :attr:`leading` — an ``asyncio.Event`` set while leading, cleared by the election's
      task (so a moment after :attr:`is_leader` turns false at a deadline); :attr:`leader` — the holder last seen.
    - ``on_started_leading()`` — called once each time this candidate becomes the leader, after
      :attr:`is_leader` turned true. ``on_stopped_leading()`` — called once when that ends (renew deadline passed,
      a rival holds the Lease or won a write, :meth:`run` ending), after :attr:`is_leader` turned false; it may
      be a coroutine function, and the Lease is released only once it has returned, so it is the place to stop
      the writers and wait for the writes in flight — within ``lease_duration - renew_deadline`` (5 s by
      default) after a missed deadline, when a rival may take over. ``on_new_leader(identity)`` — a new holder
      seen (this candidate included), not called for an empty Lease. Each may return an awaitable, which is
      awaited on the election's own task: keep them short (start tasks, do not run the work in them), since no
      renewal happens meanwhile. One that raises ends :meth:`run` with its exception, after stopping and
      releasing.
    - :meth:`run` goes until cancelled (or :meth:`stop`); then it stops leading and, with ``release_on_cancel``,
      releases the Lease so that a follower takes over at its next try.

    ``monotonic`` (seconds) times every deadline; ``wall`` (timezone-aware) only fills the record's timestamps.
    """

    def __init__(self, client: kube.KubeClient, *, namespace: str, name: str, identity: str,
                 timing: Timing | None = None, on_started_leading: Callback | None = None,
                 on_stopped_leading: Callback | None = None, on_new_leader: LeaderCallback | None = None,
                 release_on_cancel: bool = True, monotonic: Callable[[], float] = time.monotonic,
                 wall: Callable[[], datetime] | None = None, rng: random.Random | None = None) -> None:
        if not identity:
            raise ValueError("the identity must not be empty: an empty holderIdentity means nobody holds the Lease")
        self.client = client
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.timing = timing or Timing()
        self.release_on_cancel = release_on_cancel
        self.leading = asyncio.Event()
        self._on_started_leading = on_started_leading
        self._on_stopped_leading = on_stopped_leading
        self._on_new_leader = on_new_leader
        self._monotonic = monotonic
        self._wall = wall or _utc_now
        self._rng = rng or random.Random()  # noqa: S311 - jitter only
        self._lease: kube.JSON | None = None  # the Lease as last read or written (its resourceVersion included)
        self._observation: Observation | None = None
        self._leading = False
        self._renewed_at = -math.inf  # monotonic start of the last successful write while leading
        self._reported = ""  # the holder last announced
        self._failures = 0  # tries in a row that failed
        self._last_error = ""
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, client: kube.KubeClient, settings: OperatorSettings, *, identity: str | None = None,
                      namespace: str | None = None, on_started_leading: Callback | None = None,
                      on_stopped_leading: Callback | None = None,
                      on_new_leader: LeaderCallback | None = None) -> LeaderElector:
        """An elector for ``SEP_LEASE_*``: the identity from :func:`default_identity` unless given, the namespace
        from :meth:`OperatorSettings.lease_namespace_or_own` (which reads the service account's namespace file:
        a few bytes, once) unless given."""
        return cls(client, namespace=namespace or settings.lease_namespace_or_own(), name=settings.lease_name,
                   identity=identity or default_identity(), timing=Timing.from_settings(settings),
                   on_started_leading=on_started_leading, on_stopped_leading=on_stopped_leading,
                   on_new_leader=on_new_leader)

    def __str__(self) -> str:
        return f"Lease {self.namespace}/{self.name}"

    @property
    def is_leader(self) -> bool:
        """Leading now: the last successful write started less than the renew deadline ago. Turns false at the
        deadline by itself, even before the election's task has noticed."""
        return self._leading and not renew_deadline_passed(self._renewed_at, self.timing, self._monotonic())

    @property
    def leader(self) -> str | None:
        """The holder the Lease named when last read or written; None before the first read or when empty."""
        return (self._observation.record.holder or None) if self._observation else None

    async def run(self) -> None:
        """Take part in the election until cancelled; see the class. Raises only what a callback raised."""
        if self._task is not None and not self._task.done():
            raise RuntimeError(f"the elector for {self} is already running")
        self._task = asyncio.current_task()
        logger.info("Leader election on %s as %s (lease %g s, renew deadline %g s, retry period %g s).", self,
                    self.identity, self.timing.lease_duration, self.timing.renew_deadline, self.timing.retry_period)
        try:
            while True:
                if self._leading:
                    await self._lead_once()
                else:
                    await self._follow_once()
        finally:
            await self._shutdown()

    async def stop(self) -> None:
        """Cancel :meth:`run` and wait until it stopped leading and released the Lease. Does nothing if it is not
        running; never raises what :meth:`run` raised (its task's owner sees that)."""
        task = self._task
        if task is None or task.done():
            return
        if task is asyncio.current_task():
            raise RuntimeError("stop() called from the elector's own task (from a callback): cancel it instead")
        task.cancel()
        await asyncio.wait([task])

    # -- one round as the leader, one as a follower ------------------------------------------------------------

    async def _lead_once(self) -> None:
        now = self._monotonic()
        if renew_deadline_passed(self._renewed_at, self.timing, now):
            await self._stop_leading(f"the Lease could not be renewed for {self.timing.renew_deadline:g} s "
                                     f"({self._last_error or 'no answer'})")
            await asyncio.sleep(self._follower_wait())
            return
        try:
            # a renewal still going at the deadline is abandoned: by then the leader must have stopped
            async with asyncio.timeout(self._renewed_at + self.timing.renew_deadline - now):
                outcome, why = await self._try_acquire_or_renew()
        except TimeoutError:
            outcome, why = _Outcome.FAILED, "no answer before the renew deadline"
        await self._announce()
        if outcome is _Outcome.HELD:
            await self._stop_leading(why)
            await asyncio.sleep(self._follower_wait())
            return
        if outcome is _Outcome.HOLDING:
            self._recovered()
        else:
            self._failed(why, leading=True)
        # the next renewal after a retry period, or at the deadline to stop leading
        left = self._renewed_at + self.timing.renew_deadline - self._monotonic()
        await asyncio.sleep(max(0.0, min(self.timing.retry_period, left)))

    async def _follow_once(self) -> None:
        try:
            async with asyncio.timeout(self.timing.renew_deadline):
                outcome, why = await self._try_acquire_or_renew()
        except TimeoutError:
            outcome, why = _Outcome.FAILED, f"no answer within {self.timing.renew_deadline:g} s"
        await self._announce()
        if outcome is _Outcome.HOLDING:
            self._recovered()
            await self._start_leading()
            left = self._renewed_at + self.timing.renew_deadline - self._monotonic()
            await asyncio.sleep(max(0.0, min(self.timing.retry_period, left)))
            return
        if outcome is _Outcome.FAILED:
            self._failed(why, leading=False)
        else:
            self._recovered()
        await asyncio.sleep(self._follower_wait())

    def _follower_wait(self) -> float:
        return follower_wait(self._observation, self.identity, self.timing, self._monotonic(), self._rng)

    # -- one try: client-go's tryAcquireOrRenew ----------------------------------------------------------------

    async def _try_acquire_or_renew(self) -> tuple[_Outcome, str]:
        if self._leading and self._lease is not None and self._observation is not None:
            # the leader's fast path: write over the version it wrote last, without reading first
            record = next_record(self._observation.record, self.identity, self.timing, self._wall())
            started = self._monotonic()
            try:
                written = await self.client.replace_lease(self.namespace, self.name,
                                                          updated_lease(self._lease, record))
            except kube.KubeError as exc:
                if not (exc.conflict or exc.not_found):
                    return _Outcome.FAILED, str(exc)
                # changed or deleted since: read it and judge again
            else:
                self._wrote(written, started)
                return _Outcome.HOLDING, ""
        try:
            lease = await self.client.get_lease(self.namespace, self.name)
        except kube.KubeError as exc:
            return _Outcome.FAILED, str(exc)
        if lease is None:
            return await self._create()
        self._saw(lease)
        assert self._observation is not None
        if not may_take(self._observation, self.identity, self._monotonic()):
            return _Outcome.HELD, f"the Lease is held by {self._observation.record.holder}"
        record = next_record(self._observation.record, self.identity, self.timing, self._wall())
        started = self._monotonic()
        try:
            written = await self.client.replace_lease(self.namespace, self.name, updated_lease(lease, record))
        except kube.KubeError as exc:
            if exc.conflict:
                return await self._after_conflict(record, started)
            return _Outcome.FAILED, str(exc)
        self._wrote(written, started)
        return _Outcome.HOLDING, ""

    async def _create(self) -> tuple[_Outcome, str]:
        record = next_record(None, self.identity, self.timing, self._wall())
        started = self._monotonic()
        try:
            created = await self.client.create_lease(self.namespace, new_lease(self.namespace, self.name, record))
        except kube.KubeError as exc:
            if exc.conflict:  # a rival created it first
                return await self._after_conflict(record, started)
            return _Outcome.FAILED, str(exc)
        self._wrote(created, started)
        return _Outcome.HOLDING, ""

    async def _after_conflict(self, attempted: LeaseRecord, started: float) -> tuple[_Outcome, str]:
        """A write got 409: read the Lease to learn who won. Another holder: a rival did. Our very record: the
        write was ours after all (a PUT repeated after a lost answer finds its own first attempt). Us with another
        record: only something else changed (a label, say); the next try writes over the new version."""
        try:
            lease = await self.client.get_lease(self.namespace, self.name)
        except kube.KubeError as exc:
            return _Outcome.FAILED, f"409 Conflict, then reading the Lease: {exc}"
        if lease is None:
            return _Outcome.FAILED, "409 Conflict, then the Lease was gone"
        if LeaseRecord.from_lease(lease) == attempted:
            self._wrote(lease, started)
            return _Outcome.HOLDING, ""
        self._saw(lease)
        holder = LeaseRecord.from_lease(lease).holder
        if holder == self.identity:
            return _Outcome.FAILED, "409 Conflict: the Lease changed meanwhile"
        return _Outcome.HELD, f"{holder or 'nobody'} wrote the Lease first (409 Conflict)"

    def _saw(self, lease: kube.JSON) -> None:
        self._lease = lease
        self._observation = observe(self._observation, LeaseRecord.from_lease(lease), self._monotonic())

    def _wrote(self, lease: kube.JSON, started: float) -> None:
        self._lease = lease
        self._observation = Observation(LeaseRecord.from_lease(lease), self._monotonic())
        self._renewed_at = started

    # -- transitions ---------------------------------------------------------------------------------------------

    async def _start_leading(self) -> None:
        self._leading = True
        self.leading.set()
        transitions = self._observation.record.transitions if self._observation else 0
        logger.info("Leading: %s acquired as %s (lease transitions: %d).", self, self.identity, transitions)
        await _call(self._on_started_leading)

    async def _stop_leading(self, why: str, *, level: int = logging.WARNING) -> None:
        if not self._leading:
            return
        self._leading = False
        self.leading.clear()
        logger.log(level, "Stopped leading: %s: %s.", self, why)
        await _call(self._on_stopped_leading)

    async def _announce(self) -> None:
        holder = self._observation.record.holder if self._observation else ""
        if holder == self._reported:
            return
        self._reported = holder
        if not holder:
            logger.info("%s has no holder (released).", self)
            return
        logger.info("New leader of %s: %s%s.", self, holder, " (this replica)" if holder == self.identity else "")
        if self._on_new_leader is not None:
            result = self._on_new_leader(holder)
            if inspect.isawaitable(result):
                await result

    def _failed(self, why: str, *, leading: bool) -> None:
        self._failures += 1
        self._last_error = why
        if leading:
            left = self._renewed_at + self.timing.renew_deadline - self._monotonic()
            level = logging.WARNING if self._failures == 1 else logging.DEBUG
            logger.log(level, "Renewing %s failed (%s); leading ends in %.1f s unless a renewal succeeds.", self,
                       why, max(0.0, left))
        else:
            # the first failure and every tenth after it: a lasting one (403) stays visible, not a flood
            level = logging.WARNING if self._failures % 10 == 1 else logging.DEBUG
            logger.log(level, "Reading %s failed (%s; %d in a row).", self, why, self._failures)

    def _recovered(self) -> None:
        if self._failures:
            logger.info("%s answers again after %d failed tries.", self, self._failures)
        self._failures = 0
        self._last_error = ""

    # -- the end -------------------------------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        try:
            await self._stop_leading("stopping", level=logging.INFO)
        finally:
            if self.release_on_cancel and self._lease is not None and self.leader == self.identity:
                await self._release()

    async def _release(self) -> None:
        """Give the Lease up (as client-go's release: bounded by the renew deadline, again after a conflict)."""
        lease = self._lease
        try:
            async with asyncio.timeout(self.timing.renew_deadline):
                for _ in range(3):
                    if lease is None or LeaseRecord.from_lease(lease).holder != self.identity:
                        return  # somebody else holds it now (or nobody): nothing to give up
                    record = release_record(LeaseRecord.from_lease(lease), self._wall())
                    try:
                        written = await self.client.replace_lease(self.namespace, self.name,
                                                                  updated_lease(lease, record))
                    except kube.KubeError as exc:
                        if not exc.conflict:
                            raise
                        lease = await self.client.get_lease(self.namespace, self.name)
                        continue
                    self._saw(written)
                    logger.info("Released %s.", self)
                    return
                raise kube.KubeError(409, "Conflict", "the Lease kept changing")
        except (kube.KubeError, TimeoutError) as exc:
            logger.warning("Could not release %s (%s): a follower takes over once the lease has run out.", self,
                           str(exc) or "no answer in time")


async def _call(callback: Callback | None) -> None:
    if callback is None:
        return
    result = callback()
    if inspect.isawaitable(result):
        await result


def _utc_now() -> datetime:
    return datetime.now(UTC)
