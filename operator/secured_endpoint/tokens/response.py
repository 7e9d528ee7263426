"""Reading a token endpoint's answer (RFC 6749 §5.1 success, §5.2 error) into a TokenResponse or a
classified TokenError; plus the small token helpers the controller needs (JWT expiry, fingerprint)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from pydantic import SecretStr

from secured_endpoint.tokens.errors import (
    InvalidCredentialsError,
    InvalidTokenResponseError,
    TokenError,
    TokenRequestFailedError,
    redact_text,
    sanitize_excerpt,
)
from secured_endpoint_gateway.wire import fingerprint as fingerprint  # re-exported: the gateways' formula too

MAX_RESPONSE_BYTES = 1024 * 1024  # a token response is a few KiB; more is a misbehaving server

# OAuth error codes that mean "these credentials will not work" (docs/contract.md §1: InvalidCredentials).
CREDENTIAL_ERRORS = frozenset({"invalid_client", "invalid_grant", "unauthorized_client"})
# OAuth error codes that mean "try again later" whatever the HTTP status says.
TRANSIENT_ERRORS = frozenset({"server_error", "temporarily_unavailable", "slow_down"})
# Fields of a response body whose values are secrets and must never reach a message.
_SECRET_FIELDS = ("access_token", "refresh_token", "id_token")

_VSCHARS = re.compile(r"[\x20-\x7e]+")
_TOKEN_TYPE = re.compile(r"[\x21-\x7e]{1,100}")
_JWT_SHAPE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class TokenResponse:
    """A successful token response. Secrets are SecretStr, so a repr or a log line never shows them."""

    access_token: SecretStr
    token_type: str
    expires_in: int | None
    scope: str | None
    refresh_token: SecretStr | None


# the IANA "OAuth Access Token Types" registry (and MAC from its draft): safe to name in a message
_KNOWN_TOKEN_TYPES = frozenset({"n_a", "pop", "dpop", "mac"})

def parse_token_response(status_code: int, content_type: str | None, body: bytes) -> TokenResponse:
    """Turn an HTTP answer of a token endpoint into a TokenResponse, or raise a TokenError subclass.

    Any input raises nothing but a TokenError: the caller may hand over whatever the network gave it.
    """
    if len(body) > MAX_RESPONSE_BYTES:
        raise InvalidTokenResponseError(
            f"token response is larger than {MAX_RESPONSE_BYTES // 1024} KiB (HTTP {status_code})",
            status_code=status_code,
        )
    if 300 <= status_code < 400:
        # Following a redirect would re-send credentials to wherever it points; a token URL never moves.
        raise InvalidTokenResponseError(
            f"token endpoint answered with a redirect (HTTP {status_code}); redirects are not followed",
            status_code=status_code,
        )
    document = _json_object(body)
    if 200 <= status_code < 300:
        if document is None:
            raise InvalidTokenResponseError(
                f"token response is not a JSON object ({_describe_body(content_type, body)}, "
                f"HTTP {status_code})",
                status_code=status_code,
            )
        if "error" in document and "access_token" not in document:
            raise _error_from_document(status_code, document)
        return _success(status_code, document)
    if 400 <= status_code < 600:
        if document is not None and isinstance(document.get("error"), str):
            raise _error_from_document(status_code, document)
        raise _error_from_status(status_code, content_type, body)
    raise InvalidTokenResponseError(
        f"token endpoint answered with unexpected HTTP {status_code}", status_code=status_code
    )


def _json_object(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or None when it is anything else (HTML, array, garbage, empty)."""
    try:
        document = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return document if isinstance(document, dict) else None


def _describe_body(content_type: str | None, body: bytes) -> str:
    """A description of a body that is not a token response; the body itself is never included."""
    if not body.strip():
        return "empty body"
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type:
        return f"content type {sanitize_excerpt(media_type, 60)}"
    return "no content type"


def _success(status_code: int, document: dict[str, Any]) -> TokenResponse:
    def invalid(problem: str) -> InvalidTokenResponseError:
        return InvalidTokenResponseError(f"token response {problem} (HTTP {status_code})",
                                         status_code=status_code)

    access_token = document.get("access_token")
    if access_token is None:
        raise invalid("has no access_token")
    if not isinstance(access_token, str):
        raise invalid("has an access_token that is not a string")
    if not access_token.strip():
        raise invalid("has an empty access_token")
    if not _VSCHARS.fullmatch(access_token):
        # RFC 6749 A.12; anything else could break (or inject into) the Authorization header gateways build.
        raise invalid("has an access_token with characters outside printable ASCII")

    token_type = document.get("token_type")
    if token_type is None:
        raise invalid("has no token_type")
    if not isinstance(token_type, str) or not token_type.strip():
        raise invalid("has a token_type that is not a non-empty string")
    token_type = token_type.strip()
    if not _TOKEN_TYPE.fullmatch(token_type):
        raise invalid("has a token_type that is not a short printable name")
    # RFC 6749 §5.1: token_type is case insensitive. Only Bearer (RFC 6750) can be used by a gateway as is:
    # a DPoP or MAC token needs a proof computed per request, which a token in a Secret cannot carry.
    if token_type.lower() != "bearer":
        # named only when it is a registered type: a broken server may put anything here, even the token
        known = token_type.lower() in _KNOWN_TOKEN_TYPES
        shown = f"token_type {token_type!r}" if known else "an unsupported token_type"
        raise invalid(f"has {shown}; only Bearer tokens can be handed to gateways")
    token_type = "Bearer"

    refresh_token = document.get("refresh_token")
    return TokenResponse(
        access_token=SecretStr(access_token),
        token_type=token_type,
        expires_in=_expires_in(document.get("expires_in"), invalid),
        scope=_scope(document.get("scope")),
        refresh_token=SecretStr(refresh_token) if isinstance(refresh_token, str) and refresh_token else None,
    )


def _expires_in(value: object, invalid: Callable[[str], InvalidTokenResponseError]) -> int | None:
    """expires_in as whole seconds: a JSON number or (common in the wild) a numeric string."""
    if value is None:
        return None
    if isinstance(value, bool):  # bool is an int subclass; true is not a lifetime
        raise invalid("has an expires_in that is not a number")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise invalid("has an expires_in that is not a number") from None
    if isinstance(value, float):
        if not math.isfinite(value):
            raise invalid("has an expires_in that is not a finite number")
        value = int(value)
    if not isinstance(value, int):
        raise invalid("has an expires_in that is not a number")
    if value < 1:
        raise invalid("has an expires_in that is not positive")
    return value


def _scope(value: object) -> str | None:
    """The granted scope. Informative only, so an odd shape is dropped rather than refused."""
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        value = " ".join(value)
    if isinstance(value, str) and value.strip():
        return " ".join(value.split())
    return None


def _error_from_document(status_code: int, document: dict[str, Any]) -> TokenError:
    """Classify an RFC 6749 §5.2 error response."""
    # A misbehaving server might echo a token in its error text; never pass it on.
    body_secrets = [value for field in _SECRET_FIELDS if isinstance(value := document.get(field), str)]
    raw_error = document.get("error")
    code = sanitize_excerpt(redact_text(raw_error, body_secrets), 60) if isinstance(raw_error, str) else ""
    description = document.get("error_description")
    detail = code or "unknown_error"
    if isinstance(description, str) and (excerpt := sanitize_excerpt(redact_text(description, body_secrets))):
        detail = f"{detail}: {excerpt}"
    message = f"token endpoint refused the request (HTTP {status_code}, {detail})"

    if code in CREDENTIAL_ERRORS:
        return InvalidCredentialsError(message, status_code=status_code, oauth_error=code)
    transient = code in TRANSIENT_ERRORS or _is_transient_status(status_code)
    return TokenRequestFailedError(message, permanent=not transient, status_code=status_code,
                                   oauth_error=code or None)


def _error_from_status(status_code: int, content_type: str | None, body: bytes) -> TokenError:
    """Classify an error status that came without an OAuth error object."""
    described = _describe_body(content_type, body)
    if status_code == 401:
        return InvalidCredentialsError(
            f"token endpoint refused the client credentials (HTTP 401, {described})",
            status_code=status_code,
        )
    return TokenRequestFailedError(
        f"token endpoint answered HTTP {status_code} ({described})",
        permanent=not _is_transient_status(status_code),
        status_code=status_code,
    )


def _is_transient_status(status_code: int) -> bool:
    return status_code >= 500 or status_code in (408, 425, 429)


def jwt_expiry(token: str) -> datetime | None:
    """The ``exp`` claim of a JWT access token as an aware UTC datetime; None for opaque tokens or on any
    decoding problem. The signature is NOT verified: the value only schedules the next refresh."""
    exp = _numeric_claims(token).get("exp")
    if exp is None:
        return None
    try:
        return datetime.fromtimestamp(exp, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


def jwt_lifetime(token: str) -> timedelta | None:
    """``exp - iat`` of a JWT access token: its lifetime by the issuer's own clock, whatever the skew between that
    clock and ours; None without both claims or when ``exp`` is not after ``iat``."""
    claims = _numeric_claims(token)
    exp, iat = claims.get("exp"), claims.get("iat")
    if exp is None or iat is None or exp <= iat:
        return None
    try:
        return timedelta(seconds=exp - iat)
    except OverflowError:
        return None


def _numeric_claims(token: str) -> dict[str, float]:
    """The finite numeric ``exp`` and ``iat`` claims of an unverified JWT (empty for opaque tokens)."""
    if not _JWT_SHAPE.match(token):
        return {}
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except (jwt.PyJWTError, ValueError, TypeError):
        return {}
    if not isinstance(claims, dict):
        return {}
    return {name: float(value) for name in ("exp", "iat") if not isinstance(value := claims.get(name), bool)
            and isinstance(value, int | float) and math.isfinite(value)}
