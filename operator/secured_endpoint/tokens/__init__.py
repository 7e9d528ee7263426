"""OAuth 2.0 token client (RFC 6749): requests, responses and classified errors. No Kubernetes here."""

from secured_endpoint.tokens.client import TokenClient, TokenRequest, basic_authorization, form_urlencode
from secured_endpoint.tokens.errors import (
    InvalidCredentialsError,
    InvalidTokenResponseError,
    TokenError,
    TokenRequestFailedError,
    TrustStoreInvalidError,
)
from secured_endpoint.tokens.response import TokenResponse, fingerprint, jwt_expiry, parse_token_response

__all__ = [
    "InvalidCredentialsError",
    "InvalidTokenResponseError",
    "TokenClient",
    "TokenError",
    "TokenRequest",
    "TokenRequestFailedError",
    "TokenResponse",
    "TrustStoreInvalidError",
    "basic_authorization",
    "fingerprint",
    "form_urlencode",
    "jwt_expiry",
    "parse_token_response",
]
