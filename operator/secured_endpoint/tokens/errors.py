"""Why a token request failed, classified the way the controller needs it.

::

    TokenError                      reason            permanent
    ├── InvalidCredentialsError     InvalidCredentials     yes   invalid_client, invalid_grant,
    │                                                            unauthorized_client, bare HTTP 401
    ├── TokenRequestFailedError     TokenRequestFailed     no    5xx, 429, timeouts, connection/DNS errors
    │                                                      yes   other OAuth errors and other 4xx
    ├── InvalidTokenResponseError   InvalidTokenResponse   no    not an RFC 6749 §5.1 answer, redirects
    ├── TrustStoreInvalidError      TrustStoreInvalid      no    bad PEM bundle, certificate does not verify
    └── ClientKeyInvalidError       ClientKeyInvalid       yes   the signing key or client certificate
                                                                 cannot be used (parse, match, expiry)

``permanent`` means "retrying the same request will not help until the spec or a Secret changes"; the
controller backs off harder instead of hammering the token server (docs/contract.md §5).

Messages are safe to put into a condition, an event or a log line: they name the token URL's host, the
HTTP status and a short sanitized excerpt of the OAuth ``error``/``error_description`` fields, and never a
client secret, a password, a token or a raw response body.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import ClassVar

from secured_endpoint import api

# RFC 6749 §5.2 restricts error and error_description to these characters; anything else is dropped.
_NOT_ERROR_CHAR = re.compile(r"[^\x20-\x21\x23-\x5b\x5d-\x7e]+")
_REDACTED = "[redacted]"


def sanitize_excerpt(text: str, limit: int = 120) -> str:
    """A short, printable excerpt of a server-provided string, fit for a condition message."""
    cleaned = " ".join(_NOT_ERROR_CHAR.sub(" ", text).split())
    if len(cleaned) > limit:
        cleaned = cleaned[: limit - 3].rstrip() + "..."
    return cleaned


def redact_text(text: str, secrets: Iterable[str], *, min_length: int = 4) -> str:
    """``text`` without any of the secrets: verbatim, in their sanitized form, or cut short by an
    excerpt ("abcd..."). Secrets shorter than ``min_length`` cannot be told from ordinary words."""
    forms: set[str] = set()
    for secret in secrets:
        forms.update(form for form in (secret, sanitize_excerpt(secret, len(secret) + 3))
                     if len(form) >= min_length)
    # Longest first, so a secret that contains another one is removed whole.
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, _REDACTED)
        for keep in range(len(form) - 1, min_length - 1, -1):
            truncated = form[:keep].rstrip() + "..."
            if len(truncated) > min_length + 3 and truncated in text:
                text = text.replace(truncated, _REDACTED + "...")
                break
    return text


class TokenError(Exception):
    """Base class: a token could not be obtained. ``str(error)`` is safe to show (see module doc)."""

    reason: ClassVar[api.Reason]
    default_permanent: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        permanent: bool | None = None,
        status_code: int | None = None,
        oauth_error: str | None = None,
        retry_after_seconds: float | None = None,
    ) -> None:
        super().__init__(message)
        self.permanent: bool = self.default_permanent if permanent is None else permanent
        self.status_code = status_code
        # The RFC 6749 §5.2 error code, already sanitized; None when the answer had none.
        self.oauth_error = oauth_error
        # From a Retry-After header of a 429/503 answer, when the server sent one in seconds.
        self.retry_after_seconds = retry_after_seconds

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def redact(self, secrets: Iterable[str]) -> None:
        """Remove every given secret value from the message, in place (defence in depth: a server
        may echo what it was sent, e.g. a client_secret in an error_description)."""
        self.args = (redact_text(self.message, secrets),)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, reason={self.reason.value}, "
            f"permanent={self.permanent}, status_code={self.status_code})"
        )


class InvalidCredentialsError(TokenError):
    """The token server refused the client or the user (retrying with the same secrets is pointless)."""

    reason = api.Reason.INVALID_CREDENTIALS
    default_permanent = True


class TokenRequestFailedError(TokenError):
    """The token server was unreachable, too slow, overloaded, or refused the request itself."""

    reason = api.Reason.TOKEN_REQUEST_FAILED
    default_permanent = False


class InvalidTokenResponseError(TokenError):
    """The answer is not an RFC 6749 §5.1 token response (HTML, bad JSON, no access_token, a redirect...)."""

    reason = api.Reason.INVALID_TOKEN_RESPONSE
    default_permanent = False


class TrustStoreInvalidError(TokenError):
    """The trust store cannot be used, or the token server's certificate does not verify against it."""

    reason = api.Reason.TRUST_STORE_INVALID
    default_permanent = False


class ClientKeyInvalidError(TokenError):
    """The client's own key material — the PrivateKeyJWT signing key, the TLSClientAuth certificate and key —
    cannot be used. Messages describe the problem, never the key."""

    reason = api.Reason.CLIENT_KEY_INVALID
    default_permanent = True
