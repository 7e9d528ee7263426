"""The token as a gateway sees it, the two source protocols, and parsing of both stored forms.

A token is read either from the Redis hash (docs/contract.md §3: ``expires_at`` in unix seconds) or from the files of
the mounted token Secret (docs/contract.md §2: ``expires_at`` in RFC 3339). Both parse into one frozen
``GatewayToken`` whose ``access_token`` is a pydantic ``SecretStr``, so neither ``repr()``, a log line nor a
traceback shows it; ``authorization`` is the only place the clear text is assembled.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from pydantic import SecretStr

from secured_endpoint_gateway.wire import fingerprint, parse_expires_at


@dataclass(frozen=True)
class GatewayToken:
    """One access token with what a gateway needs to use it and to ask for a new one.

    ``fingerprint`` identifies the token without revealing it (``sha256:`` + 12 hex digits, the value the
    operator puts into ``status.tokenFingerprint``); it is what a refresh request names.
    """

    access_token: SecretStr
    token_type: str
    expires_at: datetime
    fingerprint: str
    scope: str | None = None

    @property
    def authorization(self) -> str:
        """The ``Authorization`` header value, e.g. ``Bearer eyJ...``.

        RFC 6750 spells the scheme ``Bearer``; token servers often answer ``bearer``. Scheme names are
        case-insensitive (RFC 9110 §11.1), but some backends compare them literally, so Bearer is normalised.
        """
        scheme = self.token_type.strip() or "Bearer"
        if scheme.lower() == "bearer":
            scheme = "Bearer"
        return f"{scheme} {self.access_token.get_secret_value()}"

    def expired(self, now: datetime | None = None, skew: float = 0.0) -> bool:
        """True from ``skew`` seconds before ``expires_at`` on (``now`` defaults to the current time)."""
        moment = now if now is not None else datetime.now(UTC)
        return moment >= self.expires_at - timedelta(seconds=skew)

    def seconds_left(self, now: datetime | None = None) -> float:
        moment = now if now is not None else datetime.now(UTC)
        return (self.expires_at - moment).total_seconds()


class AsyncTokenSource(Protocol):
    """What ``TokenAuth`` needs from an asynchronous source (``RedisTokenSource``, ``SecretDirTokenSource``)."""

    async def get(self) -> GatewayToken: ...

    async def request_refresh(self, stale: GatewayToken) -> GatewayToken: ...


class SyncTokenSource(Protocol):
    """The synchronous twin (``SyncRedisTokenSource``, ``SyncSecretDirTokenSource``)."""

    def get(self) -> GatewayToken: ...

    def request_refresh(self, stale: GatewayToken) -> GatewayToken: ...


def _text(value: str | bytes | None) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8") if isinstance(value, bytes) else value


def parse_redis_hash(fields: Mapping[str | bytes, str | bytes]) -> GatewayToken:
    """A token from the fields of ``<prefix>:<namespace>:<name>`` (bytes or str, as the client decodes).

    ValueError names the missing or malformed field (never its value).
    """
    values = {_text(key): _text(value) for key, value in fields.items()}
    access_token = values.get("access_token")
    if not access_token:
        raise ValueError("the hash has no access_token field")
    raw_expiry = values.get("expires_at")
    if not raw_expiry:
        raise ValueError("the hash has no expires_at field")
    try:
        expires_at = datetime.fromtimestamp(float(raw_expiry), UTC)
    except (ValueError, OverflowError, OSError):
        raise ValueError("expires_at is not unix seconds") from None
    return GatewayToken(
        access_token=SecretStr(access_token),
        token_type=values.get("token_type") or "Bearer",
        expires_at=expires_at,
        fingerprint=values.get("fingerprint") or fingerprint(access_token),
        scope=values.get("scope") or None,
    )


def parse_secret_files(files: Mapping[str, str]) -> GatewayToken:
    """A token from the files of the mounted token Secret (whitespace around values is ignored).

    ValueError names the missing or malformed file (never its content).
    """
    access_token = files.get("access_token", "").strip()
    if not access_token:
        raise ValueError("the file access_token is missing or empty")
    raw_expiry = files.get("expires_at", "").strip()
    if not raw_expiry:
        raise ValueError("the file expires_at is missing or empty")
    try:
        expires_at = parse_expires_at(raw_expiry)
    except ValueError:
        raise ValueError("the file expires_at is not an RFC 3339 timestamp") from None
    return GatewayToken(
        access_token=SecretStr(access_token),
        token_type=files.get("token_type", "").strip() or "Bearer",
        expires_at=expires_at,
        fingerprint=files.get("fingerprint", "").strip() or fingerprint(access_token),
        scope=None,
    )


class RefreshCooldown:
    """Remembers stale fingerprints whose refresh went unanswered, for ``seconds``.

    Without it, an operator that is down (or an endpoint with ``reactive: false``) would add the whole
    refresh wait to every request that gets a 401. Dict operations are atomic under the GIL; the sync
    sources share one instance between threads.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._failed: dict[str, float] = {}  # fingerprint -> monotonic time of the unanswered refresh

    def since(self, fingerprint: str) -> float | None:
        """Seconds since an unanswered refresh of ``fingerprint``, while that is within the cooldown."""
        failed_at = self._failed.get(fingerprint)
        if failed_at is None:
            return None
        ago = time.monotonic() - failed_at
        return ago if ago < self.seconds else None

    def failed(self, fingerprint: str) -> None:
        now = time.monotonic()
        for known, failed_at in list(self._failed.items()):
            if now - failed_at >= self.seconds:
                self._failed.pop(known, None)
        self._failed[fingerprint] = now

    def answered(self, fingerprint: str) -> None:
        self._failed.pop(fingerprint, None)
