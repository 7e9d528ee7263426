"""The status of a SecuredEndpoint as a typed value, and the pure helpers that change it (docs/contract.md §1).

:class:`EndpointStatus` mirrors the CRD's closed status schema field by field, so the rest of the operator
reads ``recorded.expires_at`` instead of string keys of a dict. It is frozen: a change is a new value
(``dataclasses.replace``), and :func:`merge_patch` turns the difference between what the apiserver holds and
what should be there into the smallest JSON merge patch (RFC 7386), nulls included for what must go.

Conditions follow the Kubernetes API conventions: a list keyed by ``type``; ``lastTransitionTime`` moves only
when ``status`` flips, so GitOps tools and ``kubectl wait`` see a stable object while a token is merely
refreshed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from secured_endpoint import api
from secured_endpoint_gateway import wire


def timestamp(moment: datetime) -> str:
    """RFC 3339 UTC, second precision (what ``kubectl`` prints, the CRD's date-time expects and the token
    Secret's ``expires_at`` holds)."""
    return wire.format_expires_at(moment)


def parse_timestamp(value: Any) -> datetime | None:
    """An RFC 3339 string as an aware UTC datetime; None for anything else (a status is never trusted)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return wire.parse_expires_at(value)
    except ValueError:
        return None


@dataclass(frozen=True)
class Condition:
    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str
    message: str
    observed_generation: int | None
    last_transition_time: str

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Condition:
        generation = raw.get("observedGeneration")
        return cls(type=str(raw.get("type", "")), status=str(raw.get("status", "Unknown")),
                   reason=str(raw.get("reason", "")), message=str(raw.get("message", "")),
                   observed_generation=generation if isinstance(generation, int) else None,
                   last_transition_time=str(raw.get("lastTransitionTime", "")))

    def to_json(self) -> dict[str, Any]:
        return _without_none({
            "type": self.type, "status": self.status, "reason": self.reason, "message": self.message,
            "observedGeneration": self.observed_generation, "lastTransitionTime": self.last_transition_time,
        })


@dataclass(frozen=True)
class EndpointStatus:
    """``status`` of a SecuredEndpoint. Field names are the CRD's, in snake case; None means absent."""

    observed_generation: int | None = None
    conditions: tuple[Condition, ...] = ()
    token_type: str | None = None
    scope: str | None = None
    expires_at: datetime | None = None
    last_refresh_time: datetime | None = None
    next_refresh_time: datetime | None = None
    consecutive_failures: int = 0
    last_failure_time: datetime | None = None
    token_fingerprint: str | None = None
    # what shaped the current token (docs/contract.md §1): a different value means "new token now"
    token_config_hash: str | None = None
    source_versions: Mapping[str, str] = field(default_factory=dict)
    last_refresh_request: str | None = None
    # target kind ("secret", "redis") -> where it holds the token ({"name": ...} / {"key": ...})
    targets: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any] | None) -> EndpointStatus:
        """Read what the apiserver holds; anything malformed counts as absent (never an exception)."""
        raw = raw or {}
        generation = raw.get("observedGeneration")
        failures = raw.get("consecutiveFailures")
        versions = raw.get("sourceVersions")
        targets = raw.get("targets")
        return cls(
            observed_generation=generation if isinstance(generation, int) else None,
            conditions=tuple(Condition.from_json(c) for c in raw.get("conditions") or () if isinstance(c, Mapping)),
            token_type=_text(raw.get("tokenType")),
            scope=_text(raw.get("scope")),
            expires_at=parse_timestamp(raw.get("expiresAt")),
            last_refresh_time=parse_timestamp(raw.get("lastRefreshTime")),
            next_refresh_time=parse_timestamp(raw.get("nextRefreshTime")),
            consecutive_failures=failures if isinstance(failures, int) and failures >= 0 else 0,
            last_failure_time=parse_timestamp(raw.get("lastFailureTime")),
            token_fingerprint=_text(raw.get("tokenFingerprint")),
            token_config_hash=_text(raw.get("tokenConfigHash")),
            source_versions={str(k): str(v) for k, v in versions.items() if isinstance(v, str)}
            if isinstance(versions, Mapping) else {},
            last_refresh_request=_text(raw.get("lastRefreshRequest")),
            targets={str(kind): {str(k): str(v) for k, v in where.items() if isinstance(v, str)}
                     for kind, where in targets.items() if isinstance(where, Mapping)}
            if isinstance(targets, Mapping) else {},
        )

    def to_json(self) -> dict[str, Any]:
        """The status as the apiserver should hold it (absent fields left out)."""
        return _without_none({
            "observedGeneration": self.observed_generation,
            "conditions": [c.to_json() for c in self.conditions] or None,
            "tokenType": self.token_type,
            "scope": self.scope,
            "expiresAt": _stamp(self.expires_at),
            "lastRefreshTime": _stamp(self.last_refresh_time),
            "nextRefreshTime": _stamp(self.next_refresh_time),
            "consecutiveFailures": self.consecutive_failures,
            "lastFailureTime": _stamp(self.last_failure_time),
            "tokenFingerprint": self.token_fingerprint,
            "tokenConfigHash": self.token_config_hash,
            "sourceVersions": dict(self.source_versions) or None,
            "lastRefreshRequest": self.last_refresh_request,
            "targets": {kind: dict(where) for kind, where in self.targets.items() if where} or None,
        })

    @property
    def ready(self) -> Condition | None:
        return next((c for c in self.conditions if c.type == api.CONDITION_READY), None)

    def reported(self, reason: api.Reason, generation: int) -> bool:
        """Does the status already say ``reason`` for this generation of the spec?"""
        ready = self.ready
        return ready is not None and ready.reason == reason and self.observed_generation == generation

    def location(self, kind: str, field_name: str) -> str | None:
        """Where the status says target ``kind`` holds the token (None: it holds none)."""
        return (self.targets.get(kind) or {}).get(field_name)

    def with_ready(self, *, ready: bool, reason: api.Reason, message: str, generation: int,
                   now: datetime) -> EndpointStatus:
        """This status with ``Ready`` set for ``generation``; other condition types are kept as they were."""
        status = "True" if ready else "False"
        old = self.ready
        transition = old.last_transition_time if old is not None and old.status == status \
            and old.last_transition_time else timestamp(now)
        entry = Condition(type=api.CONDITION_READY, status=status, reason=str(reason), message=message,
                          observed_generation=generation, last_transition_time=transition)
        others = tuple(c for c in self.conditions if c.type != api.CONDITION_READY)
        return dataclasses.replace(self, observed_generation=generation, conditions=(entry, *others))


# kstatus' "abnormal-true" conditions (sigs.k8s.io/cli-utils/pkg/kstatus), which Flux and other GitOps tools read
# beside Ready: present and True only while they apply, removed otherwise.
CONDITION_RECONCILING = "Reconciling"
CONDITION_STALLED = "Stalled"
RETRYING = "Retrying"  # the Reconciling reason while a timed retry is planned


def with_condition(current: EndpointStatus, *, type: str, status: str, reason: str, message: str,
                   generation: int, now: datetime) -> EndpointStatus:
    """``current`` with condition ``type`` set for ``generation``; ``lastTransitionTime`` moves only when
    ``status`` flips. Other conditions keep their place; a new one goes last."""
    old = next((c for c in current.conditions if c.type == type), None)
    transition = old.last_transition_time if old is not None and old.status == status \
        and old.last_transition_time else timestamp(now)
    entry = Condition(type=type, status=status, reason=reason, message=message, observed_generation=generation,
                      last_transition_time=transition)
    if old is None:
        return dataclasses.replace(current, conditions=(*current.conditions, entry))
    return dataclasses.replace(current, conditions=tuple(entry if c.type == type else c for c in current.conditions))


def without_condition(current: EndpointStatus, type: str) -> EndpointStatus:
    return dataclasses.replace(current, conditions=tuple(c for c in current.conditions if c.type != type))


def with_health(current: EndpointStatus, *, ready: bool, reason: str, message: str, generation: int,
                now: datetime, needs_change: bool = False, retry_at: datetime | None = None) -> EndpointStatus:
    """``Ready`` plus kstatus' ``Reconciling``/``Stalled`` for ``generation``, so that every GitOps tool reads
    the same verdict (docs/contract.md §1.4):

    - Ready True: neither is present (the endpoint is current);
    - ``Suspended``: neither (nothing is in progress, nothing failed: the user asked for the pause);
    - a failure only a change can mend (``needs_change``: a missing or unusable Secret, refused credentials,
      an invalid spec, a permanent OAuth error): ``Stalled=True`` with the Ready reason;
    - any other failure, retried by itself at ``retry_at``: ``Reconciling=True``, reason ``Retrying``.
    """
    status = dataclasses.replace(current, observed_generation=generation)
    status = with_condition(status, type=api.CONDITION_READY, status="True" if ready else "False", reason=reason,
                            message=message, generation=generation, now=now)
    if ready or reason == api.Reason.SUSPENDED:
        return without_condition(without_condition(status, CONDITION_RECONCILING), CONDITION_STALLED)
    if needs_change:
        status = with_condition(status, type=CONDITION_STALLED, status="True", reason=reason, message=message,
                                generation=generation, now=now)
        return without_condition(status, CONDITION_RECONCILING)
    retry = f"retrying at {timestamp(retry_at)}" if retry_at is not None else "retrying"
    status = with_condition(status, type=CONDITION_RECONCILING, status="True", reason=RETRYING,
                            message=f"{retry} after {reason}", generation=generation, now=now)
    return without_condition(status, CONDITION_STALLED)


def still_usable(expires_at: datetime | None, now: datetime) -> str:
    """The sentence that tells a reader of a failure whether gateways still hold a working token."""
    if expires_at is None or expires_at <= now:
        return "no valid token is in the targets"
    return f"the previous token stays usable until {timestamp(expires_at)}"


def merge_patch(current: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns ``current`` into ``wanted``: changed keys, nested maps
    diffed, lists replaced whole, ``None`` for keys to remove. Empty when nothing differs."""
    patch: dict[str, Any] = {}
    for key in current.keys() - wanted.keys():
        patch[key] = None
    for key, value in wanted.items():
        old = current.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            nested = merge_patch(old, value)
            if nested:
                patch[key] = nested
        elif old != value:
            patch[key] = value
    return patch


def _stamp(moment: datetime | None) -> str | None:
    return timestamp(moment) if moment is not None else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _without_none(values: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}
