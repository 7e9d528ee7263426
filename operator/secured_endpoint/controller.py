"""The controller: what to do for one SecuredEndpoint, and when.

kopf delivers events (``observe``, ``source_changed``, ``target_changed``); nothing is done in them but
bookkeeping and a due time handed to the one :class:`~secured_endpoint.schedule.Scheduler`. The scheduler
runs :meth:`Controller.reconcile` for a key — never twice at once — which fetches a token if one is due,
writes the targets and patches the status.

Everything needed to carry on after a restart is in the object's status (``expiresAt``,
``nextRefreshTime``, ``tokenFingerprint``, ``tokenConfigHash``, ``sourceVersions``) and in the targets,
so a new replica resumes without asking the token server for tokens it already has.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from pydantic import SecretStr

from secured_endpoint import api, credentials, kube, metrics, schedule, status, tokens
from secured_endpoint.settings import OperatorSettings
from secured_endpoint.targets.base import IssuedToken, Owner, TargetError
from secured_endpoint.targets.redis import RedisTarget
from secured_endpoint.targets.secret import SecretTarget

logger = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name)


class SourceIndex(Protocol):
    """What the cluster holds now, as kopf's indexes see it (filled before any handler runs)."""

    def source_version(self, namespace: str, ref: api.SourceRef) -> str | None: ...

    def target_fingerprint(self, namespace: str, secret_name: str) -> str | None: ...

    def unwatched_hint(self, namespace: str, refs: Iterable[api.SourceRef]) -> str | None:
        """With a source label selector: which referenced objects lack the label (rotation goes unseen)."""
        ...


@dataclass
class Endpoint:
    """The operator's view of one SecuredEndpoint; ``recorded`` is its status as last written or read."""

    namespace: str
    name: str
    uid: str
    generation: int
    spec: api.SecuredEndpointSpec | None
    spec_error: str | None
    refresh_request: str | None
    deleting: bool
    finalizers: list[str]
    recorded: dict[str, Any]
    resource_version: str = ""
    token: IssuedToken | None = None
    refresh_token: SecretStr | None = None  # in memory only: after a restart the password grant is used
    failures: int = 0
    refresh_at: datetime | None = None  # when a new token is due (a failed fetch moves it to the retry)
    rewrite_at: datetime | None = None  # when to retry writing the targets with the token we have
    failed_inputs: Inputs | None = None  # what the last failed fetch used: retry at once only if it changes
    last_forced: float | None = None
    reactive_fingerprint: str | None = None  # a gateway reported this token as refused
    fetching: bool = False  # a token request is in flight: it will answer every gateway's 401 at once
    targets_dirty: bool = False
    first_sight: bool = True
    sources: frozenset[api.SourceRef] = frozenset()
    secret_name: str | None = None

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)

    @property
    def owner(self) -> Owner:
        return Owner(self.namespace, self.name, self.uid)

    def recorded_time(self, name: str) -> datetime | None:
        return status.parse_timestamp(self.recorded.get(name))

    @property
    def served_until(self) -> datetime | None:
        """Expiry of the newest token a target holds: the status records a token only once one does."""
        return self.recorded_time("expiresAt")

    @property
    def recorded_secret_name(self) -> str | None:
        """The Secret that holds the token according to the status (it may differ from the spec's)."""
        secret = (self.recorded.get("targets") or {}).get("secret") or {}
        name = secret.get("name")
        return name if isinstance(name, str) else None


@dataclass(frozen=True)
class Inputs:
    """Everything outside the operator that shapes a token: the spec's settings and the sources' versions."""

    config_hash: str
    source_versions: tuple[tuple[str, str | None], ...]


@dataclass(frozen=True)
class Decision:
    """Why a reconcile needs a new token (empty ``why`` = it does not)."""

    why: tuple[str, ...] = ()
    forced: bool = False

    @property
    def fetch(self) -> bool:
        return bool(self.why)


@dataclass
class Controller:
    client: kube.KubeClient
    token_client: tokens.TokenClient
    settings: OperatorSettings
    index: SourceIndex
    redis: RedisTarget | None = None
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        self.endpoints: dict[Key, Endpoint] = {}
        self.users_of_source: dict[tuple[str, api.SourceRef], set[Key]] = {}
        self.owner_of_secret: dict[tuple[str, str], Key] = {}  # token Secret -> endpoint
        self.secret_target = SecretTarget(self.client, labels=self.settings.source_labels)
        self.scheduler: schedule.Scheduler[Key] = schedule.Scheduler(
            self._reconcile_or_retry, concurrency=self.settings.refresh_concurrency, name="refresh")

    async def start(self) -> None:
        await self.scheduler.start()

    async def stop(self) -> None:
        await self.scheduler.stop()

    # -- events from kopf: cheap bookkeeping, then a due time for the scheduler --------------------

    def observe(self, body: Mapping[str, Any], *, event_type: str | None) -> None:
        """A SecuredEndpoint was listed (``event_type`` None), added, modified or deleted."""
        meta = body.get("metadata", {})
        key = (meta["namespace"], meta["name"])
        if event_type == "DELETED":
            self.forget(key)
            return
        try:
            spec, spec_error = api.parse_spec(body.get("spec") or {}), None
        except api.SpecError as exc:
            spec, spec_error = None, str(exc)
        endpoint = self.endpoints.get(key)
        if endpoint is None or endpoint.uid != meta["uid"]:
            recorded = dict(body.get("status") or {})
            endpoint = Endpoint(
                namespace=key[0], name=key[1], uid=meta["uid"], generation=meta.get("generation", 0),
                spec=spec, spec_error=spec_error, refresh_request=None, deleting=False, finalizers=[],
                recorded=recorded, failures=int(recorded.get("consecutiveFailures") or 0),
                refresh_at=status.parse_timestamp(recorded.get("nextRefreshTime")),
            )
            self.endpoints[key] = endpoint
        endpoint.generation = meta.get("generation", 0)
        endpoint.spec, endpoint.spec_error = spec, spec_error
        endpoint.refresh_request = (meta.get("annotations") or {}).get(api.REFRESH_ANNOTATION)
        endpoint.deleting = bool(meta.get("deletionTimestamp"))
        endpoint.finalizers = list(meta.get("finalizers") or ())
        endpoint.resource_version = str(meta.get("resourceVersion", ""))
        self._index(endpoint)
        self._plan(endpoint, startup=event_type is None)
        metrics.ENDPOINTS.set(len(self.endpoints))

    def forget(self, key: Key) -> None:
        self.scheduler.cancel(key)
        endpoint = self.endpoints.pop(key, None)
        if endpoint is not None:
            endpoint.spec = None
            self._index(endpoint)
            if self.owner_of_secret.get((key[0], endpoint.secret_name or "")) == key:
                del self.owner_of_secret[(key[0], endpoint.secret_name or "")]
        metrics.ENDPOINTS.set(len(self.endpoints))

    def source_changed(self, namespace: str, ref: api.SourceRef) -> None:
        """A Secret/ConfigMap was added, changed or deleted: the endpoints that use it look again."""
        for key in tuple(self.users_of_source.get((namespace, ref), ())):
            self._plan(self.endpoints[key], startup=False)

    def target_changed(self, namespace: str, secret_name: str, fingerprint: str | None) -> None:
        """A token Secret changed or vanished (``fingerprint`` None): put the token back if it is not ours."""
        if fingerprint is None:
            self.secret_target.forget(namespace, secret_name)
        key = self.owner_of_secret.get((namespace, secret_name))
        endpoint = self.endpoints.get(key) if key is not None else None
        if endpoint is None or fingerprint == endpoint.recorded.get("tokenFingerprint") \
                or (endpoint.token is not None and fingerprint == endpoint.token.fingerprint):
            return  # what the operator wrote (its watch event may come before the status is updated)
        endpoint.targets_dirty = True
        self._plan(endpoint, startup=False)

    def request_refresh(self, key: Key, fingerprint: str) -> bool:
        """A gateway saw a 401 with this token (SPEC §4); True if a refresh was planned."""
        endpoint = self.endpoints.get(key)
        if endpoint is None or endpoint.spec is None or not endpoint.spec.refresh.reactive:
            return False
        newer_in_hand = endpoint.token is not None and endpoint.token.fingerprint != fingerprint
        if fingerprint != endpoint.recorded.get("tokenFingerprint") or endpoint.fetching or newer_in_hand:
            # the token in the targets, the one being fetched, or the one being written is newer than what
            # the gateway saw
            return False
        endpoint.reactive_fingerprint = fingerprint
        self._plan(endpoint, startup=False)
        return True

    def redis_restored(self) -> None:
        """Redis is back after an outage: write every current token into it again."""
        for endpoint in self.endpoints.values():
            if endpoint.spec is not None and endpoint.spec.redis_enabled:
                endpoint.targets_dirty = True
                endpoint.rewrite_at = None
                self._plan(endpoint, startup=False)

    # -- planning: when must reconcile run? -------------------------------------------------------

    def _plan(self, endpoint: Endpoint, *, startup: bool) -> None:
        now = self.clock()
        due = self._due(endpoint, now)
        if due is None:
            self.scheduler.cancel(endpoint.key)
        else:
            when = due.timestamp()
            if startup and endpoint.first_sight and due <= now and self.settings.startup_spread_seconds:
                # after a restart, overdue work is spread out rather than fired in one burst (ANCHORS)
                when += self.rng.uniform(0, self.settings.startup_spread_seconds)
            self.scheduler.schedule(endpoint.key, when)
        endpoint.first_sight = False

    def _due(self, endpoint: Endpoint, now: datetime) -> datetime | None:
        """When reconcile must next run for this endpoint (None: only when something changes)."""
        if endpoint.deleting:
            return now if api.FINALIZER in endpoint.finalizers else None  # else: cleaned up already
        if endpoint.spec is None:
            return None if self._reported(endpoint, api.Reason.INVALID_SPEC) else now
        if endpoint.spec.suspend:
            return None if self._reported(endpoint, api.Reason.SUSPENDED) else now
        if api.FINALIZER not in endpoint.finalizers:
            return now
        if endpoint.recorded.get("observedGeneration") != endpoint.generation:
            return now
        decision = self._decide(endpoint, now)
        if decision.fetch:
            return self._not_before_floor(endpoint, now) if decision.forced else now
        if self._forced_pending(endpoint):
            return self._not_before_floor(endpoint, now)
        if endpoint.first_sight and self._target_lost(endpoint):
            endpoint.targets_dirty = True
        candidates = [endpoint.refresh_at]
        if endpoint.targets_dirty:
            candidates.append(endpoint.rewrite_at or now)
        return min((c for c in candidates if c is not None), default=None)

    def _reported(self, endpoint: Endpoint, reason: api.Reason) -> bool:
        ready = status.current_ready(endpoint.recorded)
        return bool(ready is not None and ready.get("reason") == reason
                    and endpoint.recorded.get("observedGeneration") == endpoint.generation)

    def _not_before_floor(self, endpoint: Endpoint, now: datetime) -> datetime:
        if endpoint.last_forced is None:
            return now
        earliest = endpoint.last_forced + self.settings.reactive_floor_seconds
        return max(now, datetime.fromtimestamp(earliest, UTC))

    def _forced_pending(self, endpoint: Endpoint) -> bool:
        annotation = endpoint.refresh_request is not None \
            and endpoint.refresh_request != endpoint.recorded.get("lastRefreshRequest")
        return annotation or endpoint.reactive_fingerprint is not None

    def _target_lost(self, endpoint: Endpoint) -> bool:
        """At start-up: does the token Secret still hold the token the status names?"""
        fingerprint = endpoint.recorded.get("tokenFingerprint")
        if endpoint.secret_name is None or fingerprint is None:
            return False
        return bool(self.index.target_fingerprint(endpoint.namespace, endpoint.secret_name) != fingerprint)

    def _inputs(self, endpoint: Endpoint) -> Inputs:
        assert endpoint.spec is not None
        versions = tuple((str(ref), self.index.source_version(endpoint.namespace, ref))
                         for ref in sorted(endpoint.sources))
        return Inputs(endpoint.spec.token_config_hash(), versions)

    def _decide(self, endpoint: Endpoint, now: datetime) -> Decision:
        """Must a new token be fetched now, and why (for the log)?"""
        recorded = endpoint.recorded
        why: list[str] = []
        forced = False
        if self._forced_pending(endpoint) and self._not_before_floor(endpoint, now) <= now:
            why.append("refresh requested")
            forced = True
        inputs = self._inputs(endpoint)
        # after a failed fetch, retry at once only when what it used has changed; else wait for backoff
        if inputs != endpoint.failed_inputs:
            if recorded.get("tokenConfigHash") is None:
                why.append("no token yet")
            elif recorded.get("tokenConfigHash") != inputs.config_hash:
                why.append("token settings changed")
            issued_with = recorded.get("sourceVersions") or {}
            changed = [name for name, version in inputs.source_versions if issued_with.get(name) != version]
            if changed and recorded.get("tokenConfigHash") is not None:
                why.append(f"{', '.join(changed)} changed")
        if endpoint.refresh_at is not None and endpoint.refresh_at <= now:
            why.append("refresh due")
        return Decision(tuple(why), forced)

    # -- the one job the scheduler runs -----------------------------------------------------------

    async def _reconcile_or_retry(self, key: Key) -> None:
        """An unexpected error (the apiserver gone, a bug) must not leave an endpoint unscheduled."""
        try:
            await self.reconcile(key)
        except Exception as exc:
            endpoint = self.endpoints.get(key)
            if endpoint is None:
                return
            endpoint.failures += 1
            delay = schedule.backoff_delay(failures=endpoint.failures, permanent=False, rng=self.rng)
            # the operator's own errors (KubeError, TargetError) say what failed without secrets; anything
            # else is unexpected and its text may quote data, so only its type is logged
            detail = str(exc) if isinstance(exc, kube.KubeError | TargetError) else type(exc).__name__
            logger.error("Reconciling %s/%s failed (%s); retrying in %.0f s.", *key, detail, delay)
            self.scheduler.schedule(key, time.time() + delay, keep_earlier=True)

    async def reconcile(self, key: Key) -> None:
        endpoint = self.endpoints.get(key)
        if endpoint is None:
            return
        now = self.clock()
        if endpoint.deleting:
            if api.FINALIZER in endpoint.finalizers:
                await self._clean_up(endpoint)
            return
        if endpoint.spec is None:
            await self._fail(endpoint, api.Reason.INVALID_SPEC, endpoint.spec_error or "invalid spec",
                             now=now, retry_at=None)
            return
        if endpoint.spec.suspend:
            await self._suspend(endpoint, now)
            return
        if api.FINALIZER not in endpoint.finalizers:
            await self._add_finalizer(endpoint)

        decision = self._decide(endpoint, now)
        if not decision.fetch and not endpoint.targets_dirty \
                and endpoint.recorded.get("observedGeneration") == endpoint.generation:
            self._plan(endpoint, startup=False)  # woken by an event that changed nothing that matters
            return
        first = endpoint.recorded.get("tokenFingerprint") is None
        token = endpoint.token if endpoint.token is not None and endpoint.token.valid_at(now) else None
        if not decision.fetch and token is None:
            token = await self._read_back(endpoint, now)
            if token is None:
                decision = Decision(("the targets lost the token",), decision.forced)
        if decision.fetch:
            logger.info("Fetching a token for %s/%s: %s.", *key, "; ".join(decision.why))
            token = await self._fetch(endpoint, decision, now)
            if token is None:
                return
        assert token is not None
        reason = api.Reason.TOKEN_ISSUED if first else api.Reason.TOKEN_REFRESHED
        if not decision.fetch:
            ready = status.current_ready(endpoint.recorded)
            if ready is not None and ready.get("status") == "True":
                reason = api.Reason(ready["reason"])
        await self._write_targets(endpoint, token, now, reason=reason)

    async def _fetch(self, endpoint: Endpoint, decision: Decision, now: datetime) -> IssuedToken | None:
        assert endpoint.spec is not None
        spec = endpoint.spec
        if decision.forced:
            endpoint.last_forced = now.timestamp()
        handled_request = endpoint.refresh_request
        endpoint.reactive_fingerprint = None
        inputs = self._inputs(endpoint)
        started = time.monotonic()
        endpoint.fetching = True
        try:
            loaded = await credentials.load(self.client, endpoint.namespace, spec,
                                            refresh_token=endpoint.refresh_token)
            response = await self.token_client.fetch(loaded.request)
        except credentials.CredentialsError as exc:
            # a missing Secret is retried when it appears (an event); the slow retry is a safety net
            retry_at = now + timedelta(seconds=self.settings.credentials_retry_seconds
                                       * self.rng.uniform(0.9, 1.0))
            await self._fetch_failed(endpoint, exc.reason, exc.message, now=now, inputs=inputs,
                                     retry_at=retry_at, handled_request=handled_request)
            return None
        except tokens.TokenError as exc:
            metrics.TOKEN_REQUESTS.labels(result=str(exc.reason)).inc()
            retry_at = schedule.retry_time(now=now, failures=endpoint.failures + 1, permanent=exc.permanent,
                                           expires_at=endpoint.served_until, rng=self.rng)
            if exc.retry_after_seconds is not None:  # the server said when to come back (429, 503)
                retry_at = max(retry_at, now + timedelta(seconds=min(exc.retry_after_seconds, _MAX_RETRY_AFTER)))
            await self._fetch_failed(endpoint, exc.reason, str(exc), now=now, inputs=inputs,
                                     retry_at=retry_at, handled_request=handled_request)
            return None
        except kube.KubeError as exc:
            retry_at = schedule.retry_time(now=now, failures=endpoint.failures + 1, permanent=False,
                                           expires_at=endpoint.served_until, rng=self.rng)
            await self._fetch_failed(endpoint, api.Reason.CREDENTIALS_NOT_FOUND,
                                     f"cannot read the referenced Secrets: {exc}", now=now, inputs=inputs,
                                     retry_at=retry_at, handled_request=handled_request)
            return None
        except Exception as exc:
            # a library raised what the token client does not classify (a bug to fix, not a reason to
            # leave the status silent); its text may quote input, so only its type is shown
            logger.error("Unexpected %s while fetching the token of %s/%s.", type(exc).__name__, *endpoint.key)
            retry_at = schedule.retry_time(now=now, failures=endpoint.failures + 1, permanent=False,
                                           expires_at=endpoint.served_until, rng=self.rng)
            await self._fetch_failed(endpoint, api.Reason.TOKEN_REQUEST_FAILED,
                                     f"unexpected {type(exc).__name__} while requesting the token", now=now,
                                     inputs=inputs, retry_at=retry_at, handled_request=handled_request)
            return None
        finally:
            endpoint.fetching = False
            metrics.TOKEN_REQUEST_SECONDS.observe(time.monotonic() - started)
        metrics.TOKEN_REQUESTS.labels(result="issued").inc()
        access_token = response.access_token.get_secret_value()
        expires_at, _source = schedule.token_expiry(
            issued_at=now, expires_in=response.expires_in, jwt_exp=tokens.jwt_expiry(access_token),
            default_expires_in=spec.refresh.default_expires_in_seconds)
        if response.refresh_token is not None:
            endpoint.refresh_token = response.refresh_token
        token = IssuedToken(access_token=response.access_token, token_type=response.token_type,
                            scope=response.scope or (" ".join(spec.scopes) or None), issued_at=now,
                            expires_at=expires_at, fingerprint=tokens.fingerprint(access_token))
        endpoint.failed_inputs = None
        endpoint.refresh_at = schedule.refresh_time(
            issued_at=now, expires_at=expires_at, refresh_before_seconds=spec.refresh.refresh_before_seconds,
            refresh_before_percent=spec.refresh.refresh_before_percent, rng=self.rng)
        # what the token was made from is recorded now (a failed write is retried with this token, not a new
        # one); what the token is, only once a target holds it (_write_targets): the status describes the
        # token gateways can read, and gateways report its fingerprint
        endpoint.recorded.update({"tokenConfigHash": inputs.config_hash, "sourceVersions": loaded.source_versions,
                                  "lastRefreshRequest": handled_request})
        endpoint.token = token
        return token

    async def _read_back(self, endpoint: Endpoint, now: datetime) -> IssuedToken | None:
        """After a restart the token is only in the targets: take it from there to rewrite them."""
        candidates: list[IssuedToken | None] = []
        name = endpoint.recorded_secret_name or endpoint.secret_name
        try:
            if name is not None:
                candidates.append(await self.secret_target.read(endpoint.owner, name))
            if self.redis is not None and (endpoint.recorded.get("targets") or {}).get("redis"):
                candidates.append(await self.redis.read(endpoint.owner))
        except (kube.KubeError, TargetError):
            pass
        for token in candidates:
            if token is not None and token.fingerprint == endpoint.recorded.get("tokenFingerprint") \
                    and token.valid_at(now):
                endpoint.token = token
                return token
        return None

    async def _write_targets(self, endpoint: Endpoint, token: IssuedToken, now: datetime, *,
                             reason: api.Reason) -> None:
        assert endpoint.spec is not None
        spec = endpoint.spec
        failures: list[str] = []
        written: dict[str, Any] = {"secret": None, "redis": None}
        old_name = endpoint.recorded_secret_name
        target = spec.secret_target(endpoint.name)
        if target is not None and endpoint.secret_name is not None:
            try:
                await self.secret_target.write(endpoint.owner, endpoint.secret_name, token,
                                               labels=target.labels, annotations=target.annotations)
                written["secret"] = {"name": endpoint.secret_name}
            except TargetError as exc:
                failures.append(str(exc))
        if spec.redis_enabled and self.redis is None:
            failures.append("Redis: the Redis target is enabled but this operator has no Redis "
                            "configured (set SEP_REDIS_URL, SEP_REDIS_HOST or SEP_REDIS_SENTINELS)")
        elif spec.redis_enabled and self.redis is not None:
            try:
                await self.redis.write(endpoint.owner, token)
                written["redis"] = {"key": self.redis.key(endpoint.namespace, endpoint.name)}
            except TargetError as exc:
                failures.append(str(exc))
        elif self.redis is not None and (endpoint.recorded.get("targets") or {}).get("redis"):
            await self._delete_redis(endpoint)  # the Redis target was switched off
        if old_name and old_name != endpoint.secret_name and (written["secret"] or target is None):
            # only once the token is in its new place: the old Secret may be all gateways have
            try:
                await self.secret_target.delete(endpoint.owner, old_name)
            except TargetError as exc:
                logger.warning("Could not remove the old token Secret of %s/%s: %s",
                               endpoint.namespace, endpoint.name, exc)
        if written["secret"] or written["redis"]:
            endpoint.recorded.update({
                "tokenType": token.token_type, "scope": token.scope, "expiresAt": token.expires_at_text,
                "lastRefreshTime": status.timestamp(token.issued_at), "tokenFingerprint": token.fingerprint,
            })
        if failures:
            endpoint.failures += 1
            endpoint.rewrite_at = schedule.retry_time(now=now, failures=endpoint.failures, permanent=False,
                                                      expires_at=token.expires_at, rng=self.rng)
            await self._report_failure(endpoint, api.Reason.TARGET_WRITE_FAILED, "; ".join(failures),
                                       now=now, next_action=endpoint.rewrite_at, extra={"targets": written})
            return
        endpoint.targets_dirty = False
        endpoint.rewrite_at = None
        endpoint.failures = 0
        refresh_at = endpoint.refresh_at or now
        message = (f"token valid until {status.timestamp(token.expires_at)}; "
                   f"next refresh at {status.timestamp(refresh_at)}")
        hint = self.index.unwatched_hint(endpoint.namespace, endpoint.sources)
        if hint:
            message = f"{message}; {hint}"
        await self._publish(endpoint, ready=True, reason=reason, message=message, now=now, extra={
            "targets": written, "consecutiveFailures": 0, "nextRefreshTime": status.timestamp(refresh_at),
        })
        # keep_earlier: an event that came in during this run (a rotated Secret) still gets its rerun
        self.scheduler.schedule(endpoint.key, refresh_at.timestamp(), keep_earlier=True)

    # -- failure, suspension, deletion ----------------------------------------------------------

    async def _fetch_failed(self, endpoint: Endpoint, reason: api.Reason, message: str, *, now: datetime,
                            inputs: Inputs, retry_at: datetime, handled_request: str | None) -> None:
        endpoint.failures += 1
        endpoint.failed_inputs = inputs
        endpoint.refresh_at = retry_at
        endpoint.recorded["lastRefreshRequest"] = handled_request
        await self._report_failure(endpoint, reason, message, now=now, next_action=retry_at,
                                   extra={"lastRefreshRequest": handled_request})

    async def _fail(self, endpoint: Endpoint, reason: api.Reason, message: str, *, now: datetime,
                    retry_at: datetime | None) -> None:
        """A failure that no retry can mend (invalid spec): report it once, wait for a change."""
        endpoint.failures += 1
        self.scheduler.cancel(endpoint.key)
        await self._report_failure(endpoint, reason, message, now=now, next_action=retry_at, extra={})

    async def _report_failure(self, endpoint: Endpoint, reason: api.Reason, message: str, *,
                              now: datetime, next_action: datetime | None, extra: Mapping[str, Any]) -> None:
        metrics.REFRESH_FAILURES.labels(reason=str(reason)).inc()
        logger.warning("%s/%s is not ready (%s): %s", endpoint.namespace, endpoint.name, reason, message)
        expires_at = endpoint.served_until
        if next_action is not None:
            self.scheduler.schedule(endpoint.key, next_action.timestamp(), keep_earlier=True)
        await self._publish(endpoint, ready=False, reason=reason,
                            message=f"{message}; {status.still_usable(expires_at, now)}", now=now, extra={
                                "consecutiveFailures": endpoint.failures,
                                "lastFailureTime": status.timestamp(now),
                                "nextRefreshTime": status.timestamp(next_action) if next_action else None,
                                **extra})

    async def _suspend(self, endpoint: Endpoint, now: datetime) -> None:
        self.scheduler.cancel(endpoint.key)
        expires_at = endpoint.served_until
        await self._publish(endpoint, ready=False, reason=api.Reason.SUSPENDED,
                            message=f"spec.suspend is true: no token is requested; "
                                    f"{status.still_usable(expires_at, now)}",
                            now=now, extra={"nextRefreshTime": None})

    async def _add_finalizer(self, endpoint: Endpoint) -> None:
        await self._change_finalizers(endpoint, lambda present: [*present, api.FINALIZER]
                                      if api.FINALIZER not in present else present)

    async def _change_finalizers(self, endpoint: Endpoint, change: Callable[[list[str]], list[str]]) -> None:
        """Patch the finalizer list with the resourceVersion as precondition, so a finalizer another
        controller adds at the same moment is not overwritten; on a conflict, read again and retry."""
        for _ in range(5):
            wanted = change(endpoint.finalizers)
            if wanted == endpoint.finalizers:
                return
            try:
                patched = await self.client.patch_endpoint(endpoint.namespace, endpoint.name, {"metadata": {
                    "finalizers": wanted or None, "resourceVersion": endpoint.resource_version or None}})
            except kube.KubeError as exc:
                if exc.not_found:
                    endpoint.finalizers = []
                    return
                if not exc.conflict:
                    raise
                current = await self.client.get_endpoint(endpoint.namespace, endpoint.name)
                if current is None:
                    endpoint.finalizers = []
                    return
                endpoint.finalizers = list(current["metadata"].get("finalizers") or ())
                endpoint.resource_version = str(current["metadata"]["resourceVersion"])
                continue
            endpoint.finalizers = wanted
            endpoint.resource_version = str(patched.get("metadata", {}).get("resourceVersion", ""))
            return
        raise kube.KubeError(409, "Conflict", "the finalizers kept changing; will retry")

    async def _clean_up(self, endpoint: Endpoint) -> None:
        """Deletion: remove what the endpoint wrote, then let Kubernetes delete it."""
        self.scheduler.cancel(endpoint.key)
        names = {endpoint.secret_name, endpoint.recorded_secret_name}
        for name in filter(None, names):
            await self.secret_target.delete(endpoint.owner, name)
        if self.redis is not None and ((endpoint.spec is not None and endpoint.spec.redis_enabled)
                                       or (endpoint.recorded.get("targets") or {}).get("redis")):
            await self._delete_redis(endpoint)  # best effort: the key expires with the token anyway
        await self._change_finalizers(endpoint, lambda present: [f for f in present if f != api.FINALIZER])
        logger.info("Cleaned up after %s/%s.", endpoint.namespace, endpoint.name)

    async def _delete_redis(self, endpoint: Endpoint) -> None:
        assert self.redis is not None
        try:
            await self.redis.delete(endpoint.owner)
        except TargetError as exc:
            logger.warning("Could not remove the Redis key of %s/%s: %s", endpoint.namespace, endpoint.name, exc)

    # -- status and events ------------------------------------------------------------------------

    async def _publish(self, endpoint: Endpoint, *, ready: bool, reason: api.Reason, message: str,
                       now: datetime, extra: Mapping[str, Any]) -> None:
        """Patch the status if anything a reader cares about changed; post an Event on transitions."""
        previous = status.current_ready(endpoint.recorded)
        conditions = status.ready_condition(ready=ready, reason=reason, message=message,
                                            generation=endpoint.generation, now=now,
                                            previous=endpoint.recorded.get("conditions"))
        patch: dict[str, Any] = {
            "observedGeneration": endpoint.generation, "conditions": conditions,
            **{name: endpoint.recorded.get(name) for name in _TOKEN_FIELDS}, **extra,
        }
        if all(_pruned(endpoint.recorded.get(name)) == _pruned(value) for name, value in patch.items()):
            return
        transition = previous is None or previous.get("reason") != str(reason) \
            or previous.get("status") != ("True" if ready else "False")
        try:
            await self.client.patch_endpoint_status(endpoint.namespace, endpoint.name, patch)
        except kube.KubeError as exc:
            if not exc.not_found:  # not found: deleted meanwhile, and the DELETED event follows
                logger.warning("Could not write the status of %s/%s: %s",
                               endpoint.namespace, endpoint.name, exc)
                self.scheduler.schedule(endpoint.key, time.time() + 5)
            return
        endpoint.recorded.update(_pruned(patch))  # as the apiserver stores it: a merge patch's null deletes
        if transition:
            try:
                await self.client.post_event(
                    namespace=endpoint.namespace, name=endpoint.name, uid=endpoint.uid,
                    event_type="Normal" if ready else "Warning", reason=str(reason), message=message,
                    component=self.settings.event_component)
            except kube.KubeError as exc:
                logger.debug("Could not post an event for %s/%s: %s", endpoint.namespace, endpoint.name, exc)

    def _index(self, endpoint: Endpoint) -> None:
        """Keep the reverse maps (source -> endpoints, token Secret -> endpoint) in step with the spec."""
        key, namespace = endpoint.key, endpoint.namespace
        sources = endpoint.spec.referenced_sources() if endpoint.spec is not None else frozenset()
        for ref in endpoint.sources - sources:
            users = self.users_of_source.get((namespace, ref))
            if users is not None:
                users.discard(key)
                if not users:
                    del self.users_of_source[(namespace, ref)]
        for ref in sources - endpoint.sources:
            self.users_of_source.setdefault((namespace, ref), set()).add(key)
        endpoint.sources = sources
        secret_name = endpoint.spec.secret_target_name(endpoint.name) if endpoint.spec is not None else None
        if endpoint.secret_name != secret_name:
            if self.owner_of_secret.get((namespace, endpoint.secret_name or "")) == key:
                del self.owner_of_secret[(namespace, endpoint.secret_name or "")]
            if secret_name is not None:
                self.owner_of_secret[(namespace, secret_name)] = key
            if endpoint.spec is not None:
                endpoint.secret_name = secret_name


_MAX_RETRY_AFTER = 3600.0  # a server's Retry-After is honoured up to an hour

_TOKEN_FIELDS = ("tokenType", "scope", "expiresAt", "lastRefreshTime", "nextRefreshTime", "tokenFingerprint",
                 "tokenConfigHash", "sourceVersions", "lastRefreshRequest")


def _pruned(value: Any) -> Any:
    """``value`` without null entries in mappings: what a JSON merge patch leaves on the server."""
    if isinstance(value, Mapping):
        return {key: _pruned(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_pruned(item) for item in value]
    return value
