"""The controller: takes in events, plans, and carries out what :mod:`~secured_endpoint.policy` decides.

Events (``observe``, ``source_changed``, ``target_changed``, ``request_refresh``, ``rewrite_all``) only update
the :class:`~secured_endpoint.intake.Registry` and hand a due time to the one
:class:`~secured_endpoint.schedule.Scheduler`. The scheduler runs :meth:`Controller.reconcile` for a key —
never twice at once — which asks the policy what to do and does it with its collaborators: the
:class:`~secured_endpoint.refresher.Refresher` (credentials + token request), the targets (a list; none is
named here) and the :class:`~secured_endpoint.publisher.StatusPublisher`.

Everything needed to carry on after a restart is in the object's status (``expiresAt``, ``nextRefreshTime``,
``tokenFingerprint``, ``tokenConfigHash``, ``sourceVersions``) and in the targets, so a new replica resumes
without asking the token server for tokens it already has.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from secured_endpoint import api, credentials, kube, metrics, policy, schedule, status, tokens
from secured_endpoint.intake import Endpoint, Key, Registry, older_version
from secured_endpoint.publisher import Published, StatusPublisher
from secured_endpoint.refresher import FetchFailed, Refresher
from secured_endpoint.settings import OperatorSettings
from secured_endpoint.targets.base import IssuedToken, Target, TargetError

logger = logging.getLogger(__name__)

# After a failed status write the endpoint is looked at again this much later.
_STATUS_RETRY = timedelta(seconds=5)


class SourceIndex(Protocol):
    """What the cluster holds now, as the operator's watches see it (filled before any endpoint is planned)."""

    def source_version(self, namespace: str, ref: api.SourceRef) -> str | None: ...

    def unwatched_hint(self, namespace: str, refs: Iterable[api.SourceRef]) -> str | None:
        """With a source label selector: which referenced objects lack the label (rotation goes unseen)."""
        ...

    def read_at(self, namespace: str, versions: Mapping[str, str], endpoint: str) -> None:
        """A token was made from these versions ("Secret/name" -> resourceVersion), read by GET: a source the
        watches cannot see is taken to be at that version until the next read."""
        ...


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Controller:
    client: kube.KubeClient
    token_client: tokens.TokenClient
    settings: OperatorSettings
    index: SourceIndex
    targets: Sequence[Target]
    clock: Callable[[], datetime] = _utc_now
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        # Only the leader plans, refreshes and writes; a follower keeps its picture current so that it can take
        # over without a relist. Without leader election the one replica leads from the start.
        self.leading = False
        self.registry = Registry(self.targets)
        self.sources = credentials.SourceReader(self.client, self.index.source_version)
        self.refresher = Refresher(self.sources, self.token_client, self.clock, self.rng)
        self.publisher = StatusPublisher(self.client, self.settings.event_component)
        # endpoint -> the resourceVersion the leader's own LIST took it in at, until kopf's events catch up
        self._taken_in: dict[Key, str] = {}
        self.scheduler: schedule.Scheduler[Key] = schedule.Scheduler(
            self._reconcile_or_retry, concurrency=self.settings.refresh_concurrency, name="refresh",
            clock=lambda: self.clock().timestamp(), on_lag=metrics.observe_queue_lag)

    async def start_leading(self) -> None:
        """Take over: plan every endpoint from the status its last leader wrote (overdue work spread out)."""
        self.leading = True
        for endpoint in self.registry:
            endpoint.runtime.first_sight = True
            if self._target_lost(endpoint):
                endpoint.runtime.targets_dirty = True
            self._plan(endpoint, startup=True)
        await self.scheduler.start()

    async def stop_leading(self, *, grace_period: float = 3.0) -> None:
        """Stop writing: no new job starts; those running get ``grace_period`` to finish, then are cancelled."""
        self.leading = False
        await self.scheduler.stop(grace_period=grace_period)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await self.publisher.flush()

    # -- intake: cheap bookkeeping, then a due time for the scheduler --------------------------------

    def take_in(self, body: Mapping[str, Any]) -> None:
        """A SecuredEndpoint from the leader's own LIST at take-over (docs/contract.md §5.7): every endpoint is
        planned within moments, not as kopf, one object at a time and always in the same order, delivers them
        (a replica restarted again and again would otherwise never reach the last ones in its list)."""
        meta = body.get("metadata", {})
        self._taken_in[(str(meta["namespace"]), str(meta["name"]))] = str(meta.get("resourceVersion", ""))
        self.observe(body, event_type=None)

    def observe(self, body: Mapping[str, Any], *, event_type: str | None) -> None:
        """A SecuredEndpoint was listed (``event_type`` None), added, modified or deleted."""
        meta = body.get("metadata", {})
        if event_type == "DELETED":
            self.forget((meta["namespace"], meta["name"]))
            return
        endpoint = self.registry.observe(body, adopt_status=not self.leading)
        metrics.ENDPOINTS.set(len(self.registry))
        if not self.leading or endpoint.runtime.first_sight:  # the leader's own writes are counted as published
            metrics.default.observe_status(endpoint.namespace, endpoint.name, endpoint.recorded)
        if self.leading and endpoint.runtime.first_sight and self._target_lost(endpoint):
            endpoint.runtime.targets_dirty = True
        self._plan(endpoint, startup=event_type is None)

    def outdated(self, body: Mapping[str, Any]) -> bool:
        """Is this kopf event (not a deletion) older than what :meth:`take_in` already showed? kopf may have
        listed before that LIST and still be delivering its listing (and the watch events after it), which would
        take the endpoint back in time for a moment: such an event is to be dropped. resourceVersions are
        compared as numbers (what etcd gives) only in that window; any other form, or an event as new, ends it."""
        meta = body.get("metadata", {})
        key = (str(meta["namespace"]), str(meta["name"]))
        held = self._taken_in.get(key)
        if held is None:
            return False
        if older_version(str(meta.get("resourceVersion", "")), held):
            return True
        del self._taken_in[key]
        return False

    def forget(self, key: Key) -> None:
        self._taken_in.pop(key, None)
        self.scheduler.cancel(key)
        self.registry.forget(key)
        metrics.forget_endpoint(*key)
        metrics.ENDPOINTS.set(len(self.registry))

    def source_changed(self, namespace: str, ref: api.SourceRef) -> None:
        """A Secret/ConfigMap was added, changed or deleted: the endpoints that use it look again."""
        if self.index.source_version(namespace, ref) is None:
            self.sources.forget(namespace, ref)
        for endpoint in self.registry.users_of(namespace, ref):
            self._plan(endpoint, startup=False)

    def target_changed(self, kind: str, namespace: str, location: str, fingerprint: str | None) -> None:
        """A target's object changed or vanished (``fingerprint`` None): put the token back if it is not ours."""
        if fingerprint is None:
            for target in self.targets:
                if target.kind == kind:
                    target.forget(namespace, location)
        endpoint = self.registry.owner_of(kind, namespace, location)
        if endpoint is None:
            return
        token = endpoint.runtime.token
        if fingerprint is not None and fingerprint in (endpoint.recorded.token_fingerprint,
                                                       token.fingerprint if token is not None else None):
            return  # what the operator wrote (its watch event may come before the status is updated)
        endpoint.runtime.targets_dirty = True
        self._plan(endpoint, startup=False)

    def request_refresh(self, key: Key, fingerprint: str) -> bool:
        """A gateway saw a 401 with this token (docs/contract.md §4); True if a refresh was planned."""
        endpoint = self.registry.get(key)
        if endpoint is None or endpoint.spec is None or not endpoint.spec.refresh.reactive:
            return False
        runtime = endpoint.runtime
        newer_in_hand = runtime.token is not None and runtime.token.fingerprint != fingerprint
        if fingerprint != endpoint.recorded.token_fingerprint or runtime.fetching or newer_in_hand:
            # the token in the targets, the one being fetched, or the one being written is newer than what the
            # gateway saw
            return False
        runtime.reactive_fingerprint = fingerprint
        self._plan(endpoint, startup=False)
        return True

    def rewrite_all(self, kind: str) -> None:
        """Target ``kind`` lost everything (Redis came back empty): write every current token into it again."""
        for endpoint in self.registry:
            if kind in endpoint.locations:
                endpoint.runtime.targets_dirty = True
                endpoint.runtime.rewrite_at = None
                self._plan(endpoint, startup=False)

    # -- planning ------------------------------------------------------------------------------------

    def _situation(self, endpoint: Endpoint, now: datetime) -> policy.Situation:
        desired, runtime = endpoint.desired, endpoint.runtime
        spec = desired.spec
        return policy.Situation(
            now=now, generation=desired.generation, deleting=desired.deleting,
            has_finalizer=desired.has_finalizer, spec_valid=spec is not None,
            suspended=spec is not None and spec.suspend, recorded=endpoint.recorded,
            inputs=self._inputs(endpoint) if spec is not None else None, failed_inputs=runtime.failed_inputs,
            refresh_at=runtime.refresh_at, rewrite_at=runtime.rewrite_at, targets_dirty=runtime.targets_dirty,
            refresh_request=desired.refresh_request, reactive_fingerprint=runtime.reactive_fingerprint,
            recent_forced=runtime.recent_forced,
            usable_claimed_until=endpoint.served_until if runtime.reported_failure is not None else None,
            floor=timedelta(seconds=self.settings.reactive_floor_seconds), throttled_until=runtime.throttled_until)

    def _inputs(self, endpoint: Endpoint) -> policy.Inputs:
        assert endpoint.spec is not None
        versions = tuple((str(ref), self.index.source_version(endpoint.namespace, ref))
                         for ref in sorted(endpoint.sources))
        return policy.Inputs(endpoint.spec.token_config_hash(), versions)

    def _plan(self, endpoint: Endpoint, *, startup: bool) -> None:
        if not self.leading:
            return
        now = self.clock()
        due = policy.next_due(self._situation(endpoint, now))
        if due is None:
            self.scheduler.cancel(endpoint.key)
        else:
            when = due.timestamp() + (self._startup_delay(endpoint, now) if startup and due <= now else 0.0)
            self.scheduler.schedule(endpoint.key, when, deadline=self._deadline(endpoint))
        endpoint.runtime.first_sight = False

    @staticmethod
    def _deadline(endpoint: Endpoint) -> float | None:
        """Behind a backlog, the token that expires first is replaced first (docs/contract.md §5); an endpoint
        that serves none goes as it comes due."""
        served_until = endpoint.served_until
        return served_until.timestamp() if served_until is not None else None

    def _startup_delay(self, endpoint: Endpoint, now: datetime) -> float:
        if not endpoint.runtime.first_sight:
            return 0.0
        return policy.startup_delay(now=now, served_until=endpoint.served_until,
                                    spread_seconds=self.settings.startup_spread_seconds, rng=self.rng)

    def _target_lost(self, endpoint: Endpoint) -> bool:
        """At start-up: does every target still hold the token the status names, as far as the watches tell?"""
        fingerprint = endpoint.recorded.token_fingerprint
        if fingerprint is None:
            return False
        return any(target.lost(endpoint.namespace, where, fingerprint)
                   for target in self.targets if (where := endpoint.locations.get(target.kind)) is not None)

    # -- the one job the scheduler runs --------------------------------------------------------------

    async def _reconcile_or_retry(self, key: Key) -> None:
        """An unexpected error (the apiserver gone, a bug) must not leave an endpoint unscheduled."""
        try:
            await self.reconcile(key)
        except Exception as exc:
            endpoint = self.registry.get(key)
            if endpoint is None:
                return
            endpoint.runtime.failures += 1
            delay = schedule.backoff_delay(failures=endpoint.runtime.failures, permanent=False, rng=self.rng)
            # the operator's own errors (KubeError, TargetError) say what failed without secrets; anything else
            # is unexpected and its text may quote data, so only its type is logged
            detail = type(exc).__name__
            if isinstance(exc, kube.KubeError | TargetError):
                detail = str(exc)
                delay = max(delay, self._throttle(endpoint, exc.retry_after))
            logger.error("Reconciling %s/%s failed (%s); retrying in %.0f s.", *key, detail, delay,
                         extra=endpoint.log_fields())
            self.scheduler.schedule(key, self.clock().timestamp() + delay, keep_earlier=True)

    async def reconcile(self, key: Key) -> None:
        endpoint = self.registry.get(key)
        if endpoint is None:
            return
        now = self.clock()
        decision = policy.decide(self._situation(endpoint, now))
        action = decision.action
        if action is policy.Action.NOTHING:
            self.scheduler.cancel(key)
            return
        if action is policy.Action.CLEAN_UP:
            await self._clean_up(endpoint)
            return
        if action is policy.Action.REPORT_INVALID_SPEC:
            await self._report_invalid_spec(endpoint, now)
            return
        if action is policy.Action.SUSPEND:
            await self._suspend(endpoint, now)
            return
        if action is policy.Action.REPORT_EXPIRED:
            assert endpoint.runtime.reported_failure is not None
            reason, message, needs_change = endpoint.runtime.reported_failure
            await self._report_failure(endpoint, reason, message, now=now, next_action=endpoint.runtime.refresh_at,
                                       needs_change=needs_change, attempt=False)
            self._plan(endpoint, startup=False)
            return
        if decision.needs_finalizer:
            await self._set_finalizer(endpoint, present=True)
            if self.registry.get(key) is not endpoint:  # gone (see _forget_if_gone): no token for it
                return
        if action is policy.Action.WAIT:
            self._plan(endpoint, startup=False)  # woken by an event that changed nothing that matters
            return
        # by the apiserver's status, not ours: a first token whose status write failed is still the first one
        first_token = not endpoint.stored.get("tokenFingerprint")
        token = endpoint.runtime.token if endpoint.runtime.token is not None \
            and endpoint.runtime.token.valid_at(now) else None
        if not decision.fetch and token is None:
            token = await self._read_back(endpoint, now)
            if token is None:
                decision = policy.Decision(policy.Action.FETCH, ("the targets lost the token",), decision.forced)
        if decision.fetch:
            logger.info("Fetching a token for %s/%s: %s.", *key, "; ".join(decision.why), extra=endpoint.log_fields())
            token = await self._fetch(endpoint, decision, now)
            if token is None:
                return
        assert token is not None
        reason = policy.ready_reason(first_token=first_token, fetched=decision.fetch, current=endpoint.recorded)
        await self._write_targets(endpoint, token, now, reason=reason)

    # -- fetching and writing ------------------------------------------------------------------------

    async def _fetch(self, endpoint: Endpoint, decision: policy.Decision, now: datetime) -> IssuedToken | None:
        assert endpoint.spec is not None
        runtime = endpoint.runtime
        if decision.forced:
            runtime.recent_forced = (*runtime.recent_forced, now)[-schedule.FORCED_BURST:]
        handled_request = endpoint.desired.refresh_request
        runtime.reactive_fingerprint = None
        inputs = self._inputs(endpoint)
        runtime.fetching = True
        try:
            result = await self.refresher.fetch(endpoint.namespace, endpoint.name, endpoint.spec,
                                                refresh_token=runtime.refresh_token)
        finally:
            runtime.fetching = False
        if isinstance(result, FetchFailed):
            runtime.failures += 1
            runtime.failed_inputs = inputs
            runtime.refresh_at = policy.failure_retry(
                kind=result.kind, now=now, failures=runtime.failures, permanent=result.permanent,
                retry_after_seconds=result.retry_after_seconds, served_until=endpoint.served_until,
                credentials_retry=timedelta(seconds=self.settings.credentials_retry_seconds), rng=self.rng)
            endpoint.recorded = dataclasses.replace(endpoint.recorded, last_refresh_request=handled_request)
            await self._report_failure(endpoint, result.reason, result.message, now=now,
                                       next_action=runtime.refresh_at,
                                       needs_change=policy.needs_change(result.kind, permanent=result.permanent))
            return None
        if result.refresh_token is not None:
            runtime.refresh_token = result.refresh_token
        # before anything can plan again: else an unwatched source would look changed until the status echo
        self.index.read_at(endpoint.namespace, result.source_versions, endpoint.name)
        runtime.failed_inputs = None
        runtime.refresh_at = result.refresh_at
        runtime.token = result.token
        # what the token was made from is recorded now (a failed write is retried with this token, not a new
        # one); what the token is, only once a target holds it (_write_targets): the status describes the token
        # gateways can read, and gateways report its fingerprint
        endpoint.recorded = dataclasses.replace(
            endpoint.recorded, token_config_hash=inputs.config_hash, source_versions=result.source_versions,
            last_refresh_request=handled_request)
        return result.token

    async def _read_back(self, endpoint: Endpoint, now: datetime) -> IssuedToken | None:
        """After a restart the token is only in the targets: take it from there to rewrite them."""
        for target in self.targets:
            where = endpoint.recorded.location(target.kind, target.location_field) \
                or endpoint.locations.get(target.kind)
            if where is None:
                continue
            try:
                token = await target.read(endpoint.owner, where)
            except (kube.KubeError, TargetError):
                continue
            if token is not None and token.fingerprint == endpoint.recorded.token_fingerprint \
                    and token.valid_at(now):
                endpoint.runtime.token = token
                return token
        return None

    async def _write_targets(self, endpoint: Endpoint, token: IssuedToken, now: datetime, *,
                             reason: api.Reason) -> None:
        assert endpoint.spec is not None
        runtime = endpoint.runtime
        failures: list[str] = []
        retry_after: float | None = None
        placed = dict(endpoint.recorded.targets)
        wrote = False
        for target in self.targets:
            old = endpoint.recorded.location(target.kind, target.location_field)
            new = target.location(endpoint.owner, endpoint.spec)
            if new is not None:
                try:
                    await target.write(endpoint.owner, endpoint.spec, new, token)
                except TargetError as exc:
                    failures.append(str(exc))
                    if exc.retry_after is not None:
                        retry_after = max(retry_after or 0.0, exc.retry_after)
                    metrics.observe_target_write_error(target.kind)
                    continue  # the old location may be all gateways have: it stays
                placed[target.kind] = {target.location_field: new}
                wrote = True
            if old is not None and old != new and await self._remove(target, endpoint, old) and new is None:
                placed.pop(target.kind, None)
        recorded = dataclasses.replace(endpoint.recorded, targets=placed)
        if wrote:
            recorded = dataclasses.replace(
                recorded, token_type=token.token_type, scope=token.scope, expires_at=token.expires_at,
                last_refresh_time=token.issued_at, token_fingerprint=token.fingerprint)
        endpoint.recorded = recorded
        if failures:
            runtime.failures += 1
            runtime.targets_dirty = True
            # from when the write failed (its retries took a while), and not before its Retry-After is over
            failed_at = self.clock()
            self._throttle(endpoint, retry_after)
            runtime.rewrite_at = policy.failure_retry(
                kind=policy.FailureKind.TARGET, now=failed_at, failures=runtime.failures, permanent=False,
                retry_after_seconds=retry_after, served_until=token.expires_at,
                credentials_retry=timedelta(seconds=self.settings.credentials_retry_seconds), rng=self.rng)
            await self._report_failure(endpoint, api.Reason.TARGET_WRITE_FAILED, "; ".join(failures), now=now,
                                       next_action=runtime.rewrite_at)
            return
        runtime.targets_dirty = False
        runtime.rewrite_at = None
        runtime.failures = 0
        runtime.reported_failure = None
        refresh_at = runtime.refresh_at or now
        message = (f"token valid until {status.timestamp(token.expires_at)}; "
                   f"next refresh at {status.timestamp(refresh_at)}")
        hint = self.index.unwatched_hint(endpoint.namespace, endpoint.sources)
        if hint:
            message = f"{message}; {hint}"
        wanted = dataclasses.replace(endpoint.recorded, consecutive_failures=0, next_refresh_time=refresh_at)
        await self._publish(endpoint, status.with_health(wanted, ready=True, reason=reason, message=message,
                                                         generation=endpoint.desired.generation, now=now))
        # keep_earlier: an event that came in during this run (a rotated Secret) still gets its rerun
        self.scheduler.schedule(endpoint.key, refresh_at.timestamp(), keep_earlier=True,
                                deadline=self._deadline(endpoint))

    async def _remove(self, target: Target, endpoint: Endpoint, location: str) -> bool:
        """Remove what ``endpoint`` left at an old ``location``; True if it is gone."""
        try:
            await target.delete(endpoint.owner, location)
        except TargetError as exc:
            logger.warning("Could not remove the old token of %s/%s: %s", endpoint.namespace, endpoint.name, exc,
                           extra=endpoint.log_fields())
            return False
        return True

    # -- failure, suspension, deletion ---------------------------------------------------------------

    async def _report_failure(self, endpoint: Endpoint, reason: api.Reason, message: str, *, now: datetime,
                              next_action: datetime | None, needs_change: bool = False, attempt: bool = True) -> None:
        """Report a failure; ``attempt`` False: the same failure again, only its "still usable" part changed."""
        if next_action is not None:
            self.scheduler.schedule(endpoint.key, next_action.timestamp(), keep_earlier=True)
        usable = endpoint.served_until is not None and endpoint.served_until > now
        endpoint.runtime.reported_failure = (reason, message, needs_change) if usable else None
        if usable:  # the status must change when that token expires: look again then
            assert endpoint.served_until is not None
            self.scheduler.schedule(endpoint.key, endpoint.served_until.timestamp(), keep_earlier=True)
        wanted = dataclasses.replace(endpoint.recorded, consecutive_failures=endpoint.runtime.failures,
                                     last_failure_time=now if attempt else endpoint.recorded.last_failure_time,
                                     next_refresh_time=next_action)
        await self._publish(endpoint, status.with_health(
            wanted, ready=False, reason=reason,
            message=f"{message}; {status.still_usable(endpoint.served_until, now)}",
            generation=endpoint.desired.generation, now=now, needs_change=needs_change, retry_at=next_action))

    async def _report_invalid_spec(self, endpoint: Endpoint, now: datetime) -> None:
        """A failure no retry can mend: report it once, wait for a change of the spec."""
        endpoint.runtime.failures += 1
        self.scheduler.cancel(endpoint.key)
        await self._report_failure(endpoint, api.Reason.INVALID_SPEC, endpoint.desired.spec_error or "invalid spec",
                                   now=now, next_action=None, needs_change=True)

    async def _suspend(self, endpoint: Endpoint, now: datetime) -> None:
        self.scheduler.cancel(endpoint.key)
        endpoint.runtime.reported_failure = None
        wanted = dataclasses.replace(endpoint.recorded, next_refresh_time=None)
        await self._publish(endpoint, status.with_health(
            wanted, ready=False, reason=api.Reason.SUSPENDED,
            message=f"spec.suspend is true: no token is requested; {status.still_usable(endpoint.served_until, now)}",
            generation=endpoint.desired.generation, now=now))

    async def _publish(self, endpoint: Endpoint, wanted: status.EndpointStatus) -> None:
        published = await self.publisher.publish(endpoint, wanted)
        if isinstance(published, kube.KubeError):
            delay = max(_STATUS_RETRY.total_seconds(), self._throttle(endpoint, published.retry_after))
            self.scheduler.schedule(endpoint.key, self.clock().timestamp() + delay, keep_earlier=True)
        elif published is Published.GONE and endpoint.key in self._taken_in:
            await self._forget_if_gone(endpoint)

    def _throttle(self, endpoint: Endpoint, retry_after: float | None) -> float:
        """A write for ``endpoint`` was answered with ``Retry-After: retry_after``: nothing is written for it
        before that is over (:func:`policy.throttled`), whichever event plans it; the seconds left to wait."""
        now = self.clock()
        runtime = endpoint.runtime
        runtime.throttled_until = policy.throttled_until(failed_at=now, retry_after_seconds=retry_after,
                                                         current=runtime.throttled_until)
        return max(0.0, (runtime.throttled_until - now).total_seconds()) if runtime.throttled_until else 0.0

    async def _forget_if_gone(self, endpoint: Endpoint) -> None:
        """An endpoint known only from the take-in LIST has gone: kopf, which listed after it went, will send no
        DELETED event of it, so the controller forgets it here. (Any other's DELETED event follows.)"""
        body = await self.client.get_endpoint(endpoint.namespace, endpoint.name)
        if body is None or body.get("metadata", {}).get("uid") != endpoint.desired.uid:
            logger.info("%s/%s is gone.", endpoint.namespace, endpoint.name, extra=endpoint.log_fields())
            self.forget(endpoint.key)

    async def _clean_up(self, endpoint: Endpoint) -> None:
        """Deletion: remove what the endpoint wrote, then let Kubernetes delete it."""
        self.scheduler.cancel(endpoint.key)
        for target in self.targets:
            places = {endpoint.recorded.location(target.kind, target.location_field),
                      endpoint.locations.get(target.kind)}
            for where in filter(None, places):
                try:
                    await target.delete(endpoint.owner, where)
                except TargetError as exc:
                    if not target.expires_by_itself:
                        raise
                    logger.warning("Could not remove the token of %s/%s: %s (it expires with the token)",
                                   endpoint.namespace, endpoint.name, exc, extra=endpoint.log_fields())
        await self._set_finalizer(endpoint, present=False)
        logger.info("Cleaned up after %s/%s.", endpoint.namespace, endpoint.name, extra=endpoint.log_fields())

    async def _set_finalizer(self, endpoint: Endpoint, *, present: bool) -> None:
        """Add or remove our finalizer with the resourceVersion as precondition, so a finalizer another
        controller adds at the same moment is not overwritten; on a conflict, read again and retry."""
        desired = endpoint.desired
        for _ in range(5):
            current = list(desired.finalizers)
            wanted = [f for f in current if f != api.FINALIZER] + ([api.FINALIZER] if present else [])
            if set(wanted) == set(current):
                return
            try:
                patched = await self.client.patch_endpoint_finalizers(
                    endpoint.namespace, endpoint.name, wanted, resource_version=desired.resource_version)
            except kube.KubeError as exc:
                if exc.not_found:
                    endpoint.desired = dataclasses.replace(desired, finalizers=())
                    if endpoint.key in self._taken_in:
                        await self._forget_if_gone(endpoint)
                    return
                if not exc.conflict:
                    raise
                body = await self.client.get_endpoint(endpoint.namespace, endpoint.name)
                if body is None:
                    endpoint.desired = dataclasses.replace(desired, finalizers=())
                    return
                meta = body["metadata"]
                desired = dataclasses.replace(desired, finalizers=tuple(meta.get("finalizers") or ()),
                                              resource_version=str(meta["resourceVersion"]))
                endpoint.desired = desired
                continue
            endpoint.desired = dataclasses.replace(
                desired, finalizers=tuple(wanted),
                resource_version=str(patched.get("metadata", {}).get("resourceVersion", "")))
            return
        raise kube.KubeError(409, "Conflict", "the finalizers kept changing; will retry")
