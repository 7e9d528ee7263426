"""OAuth 2.0 token client (RFC 6749): requests, responses and classified errors. No Kubernetes here."""

from secured_endpoint.tokens.client import TokenClient, TokenRequest, basic_authorization, form_urlencode
from secured_endpoint.tokens.errors import (
    ClientKeyInvalidError,
    InvalidCredentialsError,
    InvalidTokenResponseError,
    TokenError,
    TokenRequestFailedError,
    TrustStoreInvalidError,
)
from secured_endpoint.tokens.keys import CLIENT_ASSERTION_TYPE, ClientAssertion, ClientCertificate
from secured_endpoint.tokens.proxy import ProxyConfig
from secured_endpoint.tokens.response import (
    TokenResponse,
    fingerprint,
    jwt_expiry,
    jwt_lifetime,
    parse_token_response,
)
from secured_endpoint.tokens.truststore import to_pem_bundle

__all__ = [
    "CLIENT_ASSERTION_TYPE",
    "ClientAssertion",
    "ClientCertificate",
    "ClientKeyInvalidError",
    "InvalidCredentialsError",
    "InvalidTokenResponseError",
    "ProxyConfig",
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
    "jwt_lifetime",
    "parse_token_response",
    "to_pem_bundle",
]
