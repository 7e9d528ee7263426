"""What to do for one SecuredEndpoint now, and when to look at it again: pure decisions (docs/contract.md §5).

The controller gathers a frozen :class:`Situation` — the recorded status, the spec's state, what shaped the
current token and what would shape one now, the runtime bookkeeping and the clock reading ``now`` — and
this module answers, with nothing but arithmetic:

- :func:`decide`: the one :class:`Action` to take now, with the reasons (for the log) in ``why``;
- :func:`next_due`: when the controller must run again (None: only when something changes).

The rules, in the order they apply (the first that matches wins, like cert-manager's trigger policy chain):

0. The apiserver answered one of this endpoint's writes with a ``Retry-After`` that has not passed → wait
   until it has, whatever is due: any action writes, and the same write sooner would ignore the server.
1. Being deleted → clean up (if our finalizer is still there), else nothing.
2. A spec the operator cannot use → report ``InvalidSpec`` once for this generation.
3. ``spec.suspend`` → report ``Suspended`` once for this generation.
4. A new token is needed (:func:`fetch_reasons`): none yet; the token-shaping spec fields changed; a
   referenced Secret/ConfigMap changed; the planned refresh is due; a forced refresh (the annotation, or a
   gateway's report of a refused token) the per-endpoint floor lets through (two back to back, then one per
   floor). After a failed fetch, a change of inputs
   counts only if the inputs differ from the failed attempt's: otherwise backoff decides.
5. A failure status that says the previous token stays usable until a time now past → say that no valid
   token is in the targets.
6. The targets must be written again with the token in hand (one was lost, a write failed, Redis came back)
   or the status is for an older generation → rewrite, once any write retry time has come.
7. Otherwise wait until the earliest of: the refresh time, the write retry, the end of the floor for a
   pending forced refresh, the expiry of a token a failure status calls usable.

:func:`failure_retry` says when to try again after a failed fetch, and :func:`ready_reason` which reason a
successful write reports.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from secured_endpoint import api, schedule
from secured_endpoint.status import EndpointStatus


@dataclass(frozen=True)
class Inputs:
    """Everything outside the operator that shapes a token: the spec's settings and the sources' versions."""

    config_hash: str
    source_versions: tuple[tuple[str, str | None], ...]  # ("Secret/name", resourceVersion or None: missing)


@dataclass(frozen=True)
class Situation:
    """One endpoint as the controller sees it at ``now``; every input of :func:`decide`."""

    now: datetime
    generation: int
    deleting: bool
    has_finalizer: bool
    spec_valid: bool
    suspended: bool
    recorded: EndpointStatus
    inputs: Inputs | None  # None while the spec is invalid
    failed_inputs: Inputs | None = None  # what the last failed fetch used
    refresh_at: datetime | None = None  # when the next token is due (after a failure: the retry)
    rewrite_at: datetime | None = None  # when to retry a failed target write
    targets_dirty: bool = False  # a target lost the token or could not be written
    refresh_request: str | None = None  # the refresh annotation's value
    reactive_fingerprint: str | None = None  # a gateway reported this (current) token as refused
    recent_forced: tuple[datetime, ...] = ()  # when the last forced refreshes ran (the floor counts from them)
    usable_claimed_until: datetime | None = None  # the failure status says the previous token is usable until
    floor: timedelta = timedelta(seconds=5)  # least time between two forced refreshes
    throttled_until: datetime | None = None  # a write failed with a Retry-After that ends then (:func:`throttled`)


class Action(enum.Enum):
    NOTHING = "nothing"  # nothing to do until something changes
    CLEAN_UP = "clean up"  # being deleted: remove what the endpoint wrote, then our finalizer
    REPORT_INVALID_SPEC = "report invalid spec"
    SUSPEND = "report suspended"
    FETCH = "fetch"  # request a new token, then write the targets
    REWRITE = "rewrite"  # write the token in hand (or read back from a target) to every target again
    REPORT_EXPIRED = "report expired"  # the failure status said "usable until" a time now past: say it is not
    WAIT = "wait"  # nothing due yet


@dataclass(frozen=True)
class Decision:
    action: Action
    why: tuple[str, ...] = ()
    forced: bool = False  # the fetch answers a refresh request (it starts the floor again)
    needs_finalizer: bool = False  # add our finalizer before acting

    @property
    def fetch(self) -> bool:
        return self.action is Action.FETCH


def forced_pending(s: Situation) -> bool:
    """Has someone asked for a refresh that has not been acted on yet (the annotation or a gateway)?"""
    annotation = s.refresh_request is not None and s.refresh_request != s.recorded.last_refresh_request
    return annotation or s.reactive_fingerprint is not None


def forced_at(s: Situation) -> datetime:
    """When a forced refresh may run (at or before ``now``: now). The floor keeps a token that is refused as soon
    as it is issued (a wrong audience, say) from turning every refusal into a token request, without delaying
    the first refusals (:func:`schedule.forced_refresh_at`)."""
    return schedule.forced_refresh_at(now=s.now, recent=s.recent_forced, floor_seconds=s.floor.total_seconds())


def fetch_reasons(s: Situation) -> tuple[str, ...]:
    """Why a new token is needed now (empty: it is not). Needs a valid spec (``s.inputs``)."""
    assert s.inputs is not None
    recorded = s.recorded
    why: list[str] = []
    if forced_pending(s) and forced_at(s) <= s.now:
        why.append("refresh requested")
    if s.inputs != s.failed_inputs:
        if recorded.token_config_hash is None:
            why.append("no token yet")
        else:
            if recorded.token_config_hash != s.inputs.config_hash:
                why.append("token settings changed")
            changed = [name for name, version in s.inputs.source_versions
                       if recorded.source_versions.get(name) != version]
            if changed:
                why.append(f"{', '.join(changed)} changed")
    if s.refresh_at is not None and s.refresh_at <= s.now:
        why.append("refresh due")
    return tuple(why)


def throttled(s: Situation) -> bool:
    """Did the apiserver ask (``Retry-After``) this endpoint's writes to wait beyond ``now``?"""
    return s.throttled_until is not None and s.now < s.throttled_until


def throttled_until(*, failed_at: datetime, retry_after_seconds: float | None,
                    current: datetime | None) -> datetime | None:
    """Until when the endpoint's writes wait after one failed at ``failed_at`` with ``retry_after_seconds``
    (None: the answer asked nothing); a wait already asked for that ends later is kept."""
    if retry_after_seconds is None:
        return current
    until = failed_at + timedelta(seconds=min(retry_after_seconds, schedule.MAX_RETRY_AFTER_SECONDS))
    return until if current is None or until > current else current


def decide(s: Situation) -> Decision:
    """The action to take now (see the module docstring for the rules)."""
    if throttled(s):
        return Decision(Action.WAIT, ("the apiserver asked to wait (Retry-After)",))
    if s.deleting:
        return Decision(Action.CLEAN_UP if s.has_finalizer else Action.NOTHING)
    if not s.spec_valid:
        return Decision(Action.NOTHING if s.recorded.reported(api.Reason.INVALID_SPEC, s.generation)
                        else Action.REPORT_INVALID_SPEC)
    if s.suspended:
        return Decision(Action.NOTHING if s.recorded.reported(api.Reason.SUSPENDED, s.generation)
                        else Action.SUSPEND)
    needs_finalizer = not s.has_finalizer
    why = fetch_reasons(s)
    if why:
        return Decision(Action.FETCH, why, forced="refresh requested" in why, needs_finalizer=needs_finalizer)
    if s.usable_claimed_until is not None and s.usable_claimed_until <= s.now:
        return Decision(Action.REPORT_EXPIRED, ("the previous token expired",), needs_finalizer=needs_finalizer)
    rewrite_due = s.targets_dirty and (s.rewrite_at is None or s.rewrite_at <= s.now)
    if rewrite_due or s.recorded.observed_generation != s.generation:
        return Decision(Action.REWRITE, ("targets need the token again",) if rewrite_due else ("spec changed",),
                        needs_finalizer=needs_finalizer)
    return Decision(Action.WAIT, needs_finalizer=needs_finalizer)


def next_due(s: Situation) -> datetime | None:
    """When the controller must act for this endpoint next (None: only when something changes)."""
    if throttled(s):
        return s.throttled_until
    decision = decide(s)
    if decision.action is Action.NOTHING:
        return None
    if decision.action is not Action.WAIT or decision.needs_finalizer:
        return s.now
    candidates = [s.refresh_at, s.usable_claimed_until]
    if s.targets_dirty:
        candidates.append(s.rewrite_at)
    if forced_pending(s):
        candidates.append(forced_at(s))
    return min((c for c in candidates if c is not None), default=None)


def ready_reason(*, first_token: bool, fetched: bool, current: EndpointStatus) -> api.Reason:
    """``TokenIssued`` for an endpoint's first token, ``TokenRefreshed`` for a new one; a rewrite of the same
    token keeps the reason a Ready status already shows."""
    if not fetched:
        ready = current.ready
        if ready is not None and ready.status == "True" and ready.reason in api.Reason.__members__.values():
            return api.Reason(ready.reason)
    return api.Reason.TOKEN_ISSUED if first_token else api.Reason.TOKEN_REFRESHED


class FailureKind(enum.Enum):
    CREDENTIALS = "credentials"  # a referenced Secret/ConfigMap or key is missing or unusable
    TOKEN = "token"  # the token server refused, failed or answered nonsense
    KUBE = "kube"  # the Kubernetes API failed while reading the sources
    TARGET = "target"  # a target could not be written
    UNEXPECTED = "unexpected"  # a bug or an unclassified library error


def needs_change(kind: FailureKind, *, permanent: bool) -> bool:
    """Can only a change mend this failure (kstatus ``Stalled``), rather than a retry (``Reconciling``)? A missing
    or unusable Secret, refused credentials, a permanent OAuth error."""
    return kind is FailureKind.CREDENTIALS or (kind is FailureKind.TOKEN and permanent)


def failure_retry(*, kind: FailureKind, now: datetime, failures: int, permanent: bool,
                  retry_after_seconds: float | None, served_until: datetime | None,
                  credentials_retry: timedelta, rng: random.Random) -> datetime:
    """When to try again after the ``failures``-th consecutive failure of ``kind`` at ``now``.

    A missing Secret is retried when it appears (a watch event), so its timed retry is only a safety net; a
    server's Retry-After (429, 503) is honoured; everything else follows :func:`schedule.retry_time`.
    """
    if kind is FailureKind.CREDENTIALS:
        return now + credentials_retry * rng.uniform(0.9, 1.0)
    retry_at = schedule.retry_time(now=now, failures=failures, permanent=permanent and kind is FailureKind.TOKEN,
                                   expires_at=served_until, rng=rng)
    if retry_after_seconds is not None:
        retry_at = max(retry_at, now + timedelta(seconds=min(retry_after_seconds,
                                                             schedule.MAX_RETRY_AFTER_SECONDS)))
    return retry_at


def startup_delay(*, now: datetime, served_until: datetime | None, spread_seconds: float,
                  rng: random.Random) -> float:
    """How much later than due an overdue refresh seen at start-up runs: after a restart, overdue refreshes are
    spread over ``spread_seconds`` rather than fired in one burst — but only while the token they replace is
    still valid, and within half of what is left of it. An endpoint with no valid token (new, or expired while
    no operator ran) goes at once (docs/contract.md §5.7)."""
    if not spread_seconds or served_until is None or served_until <= now:
        return 0.0
    return rng.uniform(0, min(spread_seconds, (served_until - now).total_seconds() / 2))
