"""What every target stores, the protocol every target implements, and how a target says it could not.

A target is a place gateways read tokens from: the token Secret (docs/contract.md §2), Redis (§3). The
controller holds a list of them and never names one: for each it asks where this endpoint's token goes
(:meth:`Target.location`), writes there, reads back from there after a restart, and removes what an old
location holds once the token is in its new place. The status records each target's location under
``status.targets.<kind>`` as ``{<field>: <location>}`` (``secret: {name: …}``, ``redis: {key: …}``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from pydantic import SecretStr

from secured_endpoint import api


@dataclass(frozen=True)
class Owner:
    """The SecuredEndpoint a target belongs to."""

    namespace: str
    name: str
    uid: str


@dataclass(frozen=True)
class IssuedToken:
    """A token as the targets hold it. ``repr`` never shows the token (it is a SecretStr)."""

    access_token: SecretStr
    token_type: str
    scope: str | None
    issued_at: datetime
    expires_at: datetime
    fingerprint: str

    @property
    def authorization(self) -> str:
        """The ready-made header value gateways send."""
        return f"{self.token_type} {self.access_token.get_secret_value()}"

    def valid_at(self, moment: datetime) -> bool:
        return self.expires_at > moment


class TargetError(Exception):
    """A target could not be written or read; the message names the target, never the token. ``retry_after``:
    the seconds its server asked to wait before the write is tried again (a Kubernetes ``Retry-After``)."""

    def __init__(self, target: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(f"{target}: {message}")
        self.target = target
        self.message = message
        self.retry_after = retry_after


class Target(Protocol):
    """One place tokens go. Implementations: :class:`~secured_endpoint.targets.secret.SecretTarget`,
    :class:`~secured_endpoint.targets.redis.RedisTarget` (and its stand-in when Redis is not configured)."""

    kind: str  # the key under status.targets
    location_field: str  # the field of status.targets.<kind> that holds the location
    # what it stores disappears by itself when the token expires (a Redis key with PEXPIREAT), so removing it
    # when the endpoint is deleted is best effort and never holds the deletion up
    expires_by_itself: bool

    def location(self, owner: Owner, spec: api.SecuredEndpointSpec) -> str | None:
        """Where this endpoint's token goes (a Secret name, a Redis key); None when the spec does not want
        this target."""
        ...

    async def write(self, owner: Owner, spec: api.SecuredEndpointSpec, location: str, token: IssuedToken) -> None:
        """Store ``token`` at ``location``; raise :class:`TargetError` saying why not."""
        ...

    async def read(self, owner: Owner, location: str) -> IssuedToken | None:
        """The token this endpoint's target holds at ``location``, or None (missing, foreign, unreadable)."""
        ...

    async def delete(self, owner: Owner, location: str) -> None:
        """Remove what this endpoint stored at ``location`` (and nothing that is not its own)."""
        ...

    def lost(self, namespace: str, location: str, fingerprint: str) -> bool:
        """Without I/O, from what the operator watches: is it known that ``location`` no longer holds the token
        with ``fingerprint``? False when it cannot tell."""
        ...

    def forget(self, namespace: str, location: str) -> None:
        """The object at ``location`` was deleted by someone: drop what is remembered about it."""
        ...
