"""What every target (Secret, Redis) stores, and how a target says it could not."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pydantic import SecretStr

from secured_endpoint import status


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

    @property
    def expires_at_text(self) -> str:
        return status.timestamp(self.expires_at)


class TargetError(Exception):
    """A target could not be written or read; the message names the target, never the token."""

    def __init__(self, target: str, message: str) -> None:
        super().__init__(f"{target}: {message}")
        self.target = target
        self.message = message
