"""The operator's picture of every SecuredEndpoint, kept current from watch events, and the reverse lookups.

Each :class:`Endpoint` keeps three kinds of state apart:

- :class:`Desired` — what the object asks for (spec, generation, annotations, finalizers), replaced whole on
  every event;
- ``recorded`` — its status as last read or written (:class:`~secured_endpoint.status.EndpointStatus`);
- :class:`Runtime` — the operator's own bookkeeping in memory (the token in hand, due times, backoff).
  Nothing here is needed after a restart: it is rebuilt from ``recorded`` and the targets.

:class:`Registry` also answers the reverse questions watch events ask: which endpoints use this
Secret/ConfigMap, and which endpoint's token a target location holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import SecretStr

from secured_endpoint import api
from secured_endpoint.policy import Inputs
from secured_endpoint.status import EndpointStatus
from secured_endpoint.targets.base import IssuedToken, Owner, Target

Key = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True)
class Desired:
    """What the object asks for, from its metadata and spec."""

    uid: str
    generation: int
    resource_version: str
    spec: api.SecuredEndpointSpec | None  # None: the spec cannot be used (``spec_error`` says why)
    spec_error: str | None
    refresh_request: str | None  # the refresh annotation's value
    deleting: bool
    finalizers: tuple[str, ...]

    @classmethod
    def from_body(cls, body: Mapping[str, Any], previous: Desired | None = None) -> Desired:
        """``previous``: what the same object said before; its parsed spec is kept while the generation stays
        (only a spec change moves it), so the echo of every status write costs no validation."""
        meta = body.get("metadata") or {}
        uid, generation = str(meta.get("uid", "")), int(meta.get("generation") or 0)
        if previous is not None and generation and (previous.uid, previous.generation) == (uid, generation):
            spec, spec_error = previous.spec, previous.spec_error
        else:
            try:
                spec, spec_error = api.parse_spec(body.get("spec") or {}), None
            except api.SpecError as exc:
                spec, spec_error = None, str(exc)
        return cls(uid=uid, generation=generation,
                   resource_version=str(meta.get("resourceVersion", "")), spec=spec, spec_error=spec_error,
                   refresh_request=(meta.get("annotations") or {}).get(api.REFRESH_ANNOTATION),
                   deleting=bool(meta.get("deletionTimestamp")),
                   finalizers=tuple(meta.get("finalizers") or ()))

    @property
    def has_finalizer(self) -> bool:
        return api.FINALIZER in self.finalizers


@dataclass
class Runtime:
    """The operator's bookkeeping for one endpoint; in memory only."""

    token: IssuedToken | None = None  # the newest token (in the targets, or being written there)
    refresh_token: SecretStr | None = None  # password grant; after a restart the password is used again
    failures: int = 0
    refresh_at: datetime | None = None  # when a new token is due (a failed fetch moves it to the retry)
    rewrite_at: datetime | None = None  # when to retry writing the targets with the token in hand
    failed_inputs: Inputs | None = None  # what the last failed fetch used: retry at once only if it changes
    recent_forced: tuple[datetime, ...] = ()  # when the last forced refreshes ran (the floor counts from them)
    reactive_fingerprint: str | None = None  # a gateway reported this token as refused
    fetching: bool = False  # a token request is in flight: it answers every gateway's 401 at once
    targets_dirty: bool = False  # a target must be written again
    throttled_until: datetime | None = None  # a write got a Retry-After: nothing is written for it before then
    # the failure the status reports, while its message says the previous token is still usable: once that token
    # expires, the status must say so (reason, message without the "usable" part, needs a change)
    reported_failure: tuple[api.Reason, str, bool] | None = None
    first_sight: bool = True  # not planned yet since this process started


@dataclass
class Endpoint:
    namespace: str
    name: str
    desired: Desired
    recorded: EndpointStatus  # the operator's view of the status: what is written, and what is about to be
    stored: Mapping[str, Any]  # the status as the apiserver holds it (what a patch is computed against)
    runtime: Runtime = field(default_factory=Runtime)
    sources: frozenset[api.SourceRef] = frozenset()
    locations: Mapping[str, str] = field(default_factory=dict)  # target kind -> where the spec wants the token

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)

    @property
    def owner(self) -> Owner:
        return Owner(self.namespace, self.name, self.desired.uid)

    @property
    def spec(self) -> api.SecuredEndpointSpec | None:
        return self.desired.spec

    def log_fields(self, reason: str | None = None) -> dict[str, Any]:
        """``extra=`` of a log line about this endpoint: in the JSON log format the object (kopf's ``object``
        field: namespace, name, uid) and the Ready reason of a failure as fields of their own."""
        fields: dict[str, Any] = {"k8s_ref": {"apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND,
                                              "namespace": self.namespace, "name": self.name,
                                              "uid": self.desired.uid}}
        if reason is not None:
            fields["reason"] = reason
        return fields

    @property
    def served_until(self) -> datetime | None:
        """Expiry of the newest token a target holds: the status records a token only once one does."""
        return self.recorded.expires_at


def adopt(endpoint: Endpoint, raw_status: Mapping[str, Any] | None) -> None:
    """Carry on from ``raw_status`` (written by this or another replica): the due times and backoff it records;
    the token itself is read back from the targets when it is needed."""
    recorded = EndpointStatus.from_json(raw_status)
    endpoint.recorded, endpoint.stored = recorded, dict(raw_status or {})
    endpoint.runtime = Runtime(failures=recorded.consecutive_failures, refresh_at=recorded.next_refresh_time,
                               first_sight=endpoint.runtime.first_sight)


class Registry:
    """Every endpoint this replica knows, by key, with the reverse lookups watch events need."""

    def __init__(self, targets: Sequence[Target]) -> None:
        self._targets = targets
        self._endpoints: dict[Key, Endpoint] = {}
        self._users_of_source: dict[tuple[str, api.SourceRef], set[Key]] = {}
        self._owner_of_location: dict[tuple[str, str, str], Key] = {}  # (kind, namespace, location) -> endpoint

    def __len__(self) -> int:
        return len(self._endpoints)

    def __iter__(self) -> Iterator[Endpoint]:
        return iter(tuple(self._endpoints.values()))

    def get(self, key: Key) -> Endpoint | None:
        return self._endpoints.get(key)

    def observe(self, body: Mapping[str, Any], *, adopt_status: bool = False) -> Endpoint:
        """Take in a listed, added or modified object; a new uid (deleted and re-created) starts afresh.

        The status is taken from the object when it is first seen, and with ``adopt_status`` every time: a
        replica that does not lead writes nothing, so the leader's status is the truth it must carry on from
        when it takes over; the leader's own view is ahead of the watch's echo of its writes."""
        meta = body.get("metadata") or {}
        key: Key = (str(meta["namespace"]), str(meta["name"]))
        endpoint = self._endpoints.get(key)
        desired = Desired.from_body(body, endpoint.desired if endpoint is not None else None)
        respecified = endpoint is None or endpoint.desired.spec is not desired.spec
        if endpoint is None or endpoint.desired.uid != desired.uid:
            if endpoint is not None:
                self._unindex(endpoint)
            endpoint = Endpoint(namespace=key[0], name=key[1], desired=desired, recorded=EndpointStatus(),
                                stored={})
            self._endpoints[key] = endpoint
            adopt_status = respecified = True
        if adopt_status:
            adopt(endpoint, body.get("status"))
        endpoint.desired = desired
        if respecified:  # else the reverse maps hold what this very spec references already
            self._index(endpoint)
        return endpoint

    def forget(self, key: Key) -> Endpoint | None:
        endpoint = self._endpoints.pop(key, None)
        if endpoint is not None:
            self._unindex(endpoint)
        return endpoint

    def users_of(self, namespace: str, ref: api.SourceRef) -> list[Endpoint]:
        keys = self._users_of_source.get((namespace, ref), ())
        return [self._endpoints[key] for key in tuple(keys)]

    def owner_of(self, kind: str, namespace: str, location: str) -> Endpoint | None:
        key = self._owner_of_location.get((kind, namespace, location))
        return self._endpoints.get(key) if key is not None else None

    def _index(self, endpoint: Endpoint) -> None:
        """Keep the reverse maps in step with the spec. An invalid spec keeps the previous locations: the
        token Secret it named still belongs to the endpoint and must still be repaired and cleaned up."""
        spec = endpoint.spec
        sources = spec.referenced_sources() if spec is not None else frozenset()
        self._move_sources(endpoint, sources)
        if spec is not None:
            locations = {target.kind: where for target in self._targets
                         if (where := target.location(endpoint.owner, spec)) is not None}
            self._move_locations(endpoint, locations)

    def _unindex(self, endpoint: Endpoint) -> None:
        self._move_sources(endpoint, frozenset())
        self._move_locations(endpoint, {})

    def _move_sources(self, endpoint: Endpoint, sources: frozenset[api.SourceRef]) -> None:
        for ref in endpoint.sources - sources:
            users = self._users_of_source.get((endpoint.namespace, ref))
            if users is not None:
                users.discard(endpoint.key)
                if not users:
                    del self._users_of_source[(endpoint.namespace, ref)]
        for ref in sources - endpoint.sources:
            self._users_of_source.setdefault((endpoint.namespace, ref), set()).add(endpoint.key)
        endpoint.sources = sources

    def _move_locations(self, endpoint: Endpoint, locations: Mapping[str, str]) -> None:
        for kind, where in _changed(endpoint.locations, locations):
            if self._owner_of_location.get((kind, endpoint.namespace, where)) == endpoint.key:
                del self._owner_of_location[(kind, endpoint.namespace, where)]
        for kind, where in locations.items():
            self._owner_of_location[(kind, endpoint.namespace, where)] = endpoint.key
        endpoint.locations = dict(locations)


def _changed(old: Mapping[str, str], new: Mapping[str, str]) -> Iterable[tuple[str, str]]:
    return [(kind, where) for kind, where in old.items() if new.get(kind) != where]


def older_version(seen: str, held: str) -> bool:
    """Is resourceVersion ``seen`` older than ``held``? Only numbers (what etcd gives) are compared: for any
    other form the answer is no, and the event is taken as it comes."""
    return held.isdigit() and seen.isdigit() and int(seen) < int(held)
