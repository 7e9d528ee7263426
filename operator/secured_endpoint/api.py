"""The SecuredEndpoint API: names, condition reasons and pydantic models of the spec (docs/contract.md §1).

The CRD schema in ``crds/`` refuses most bad input at ``kubectl apply``; these models repeat the rules
the operator relies on, so an object that slipped past (an older CRD, a direct etcd write) becomes
``Ready=False / InvalidSpec`` with a message naming the field instead of a crash.
"""

from __future__ import annotations

import enum
import hashlib
import json
import urllib.parse
from collections.abc import Mapping
from typing import Any, Literal, Self

import httpx
import pydantic
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

GROUP = "secured-endpoint.io"
VERSION = "v1alpha1"
KIND = "SecuredEndpoint"
PLURAL = "securedendpoints"

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "secured-endpoint-operator"
ENDPOINT_ANNOTATION = "secured-endpoint.io/endpoint"  # on target Secrets: the owning endpoint's name
TOKEN_FINGERPRINT_ANNOTATION = "secured-endpoint.io/token-fingerprint"  # on target Secrets: the token's fingerprint
REFRESH_ANNOTATION = "secured-endpoint.io/refresh-requested-at"
FINALIZER = "secured-endpoint.io/cleanup"

CONDITION_READY = "Ready"


class Reason(enum.StrEnum):
    """Reasons of the ``Ready`` condition (docs/contract.md §1 table)."""

    TOKEN_ISSUED = "TokenIssued"
    TOKEN_REFRESHED = "TokenRefreshed"
    CREDENTIALS_NOT_FOUND = "CredentialsNotFound"
    # The Kubernetes API failed or refused while a referenced Secret/ConfigMap was read: nothing is known to be
    # missing (transient; a 403 names the permission).
    CREDENTIALS_UNREADABLE = "CredentialsUnreadable"
    INVALID_CREDENTIALS = "InvalidCredentials"
    TOKEN_REQUEST_FAILED = "TokenRequestFailed"
    INVALID_TOKEN_RESPONSE = "InvalidTokenResponse"
    TRUST_STORE_INVALID = "TrustStoreInvalid"
    TARGET_WRITE_FAILED = "TargetWriteFailed"
    SUSPENDED = "Suspended"
    INVALID_SPEC = "InvalidSpec"
    # The client's own key material (PrivateKeyJWT signing key, TLSClientAuth certificate) is unusable.
    CLIENT_KEY_INVALID = "ClientKeyInvalid"


class GrantType(enum.StrEnum):
    CLIENT_CREDENTIALS = "ClientCredentials"
    PASSWORD = "Password"


class ClientAuthMethod(enum.StrEnum):
    CLIENT_SECRET_BASIC = "ClientSecretBasic"  # RFC 6749 §2.3.1, Authorization: Basic
    CLIENT_SECRET_POST = "ClientSecretPost"  # RFC 6749 §2.3.1, client_secret form field
    CLIENT_SECRET_JWT = "ClientSecretJWT"  # RFC 7523 client assertion signed with the secret (HMAC)
    PRIVATE_KEY_JWT = "PrivateKeyJWT"  # RFC 7523 client assertion signed with a private key
    TLS_CLIENT_AUTH = "TLSClientAuth"  # RFC 8705 §2: the client certificate of a mutual-TLS connection

    @property
    def uses_client_secret(self) -> bool:
        """Whether the client secret (clientSecretRef.clientSecretKey) is read and used."""
        return self in (ClientAuthMethod.CLIENT_SECRET_BASIC, ClientAuthMethod.CLIENT_SECRET_POST,
                        ClientAuthMethod.CLIENT_SECRET_JWT)


class AssertionAlgorithm(enum.StrEnum):
    """JWS algorithms of a client assertion: HS* sign with the client secret (ClientSecretJWT), the others
    with a private key (PrivateKeyJWT)."""

    RS256 = "RS256"
    RS384 = "RS384"
    RS512 = "RS512"
    PS256 = "PS256"
    PS384 = "PS384"
    PS512 = "PS512"
    ES256 = "ES256"
    ES384 = "ES384"
    ES512 = "ES512"
    HS256 = "HS256"
    HS384 = "HS384"
    HS512 = "HS512"

    @property
    def is_hmac(self) -> bool:
        return self.value.startswith("HS")


class TrustStoreFormat(enum.StrEnum):
    PEM = "PEM"
    PKCS12 = "PKCS12"
    JKS = "JKS"


# Form fields the operator sets itself; a user parameter may not override them (docs/contract.md §1, InvalidSpec).
RESERVED_PARAMETERS = frozenset({
    "grant_type", "client_id", "client_secret", "scope", "audience", "username", "password",
    "refresh_token", "client_assertion", "client_assertion_type",
})


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True,
    )


class ClientSecretRef(_Model):
    name: str = Field(min_length=1)
    client_id_key: str = Field(default="client_id", min_length=1)
    client_secret_key: str = Field(default="client_secret", min_length=1)


class PasswordSecretRef(_Model):
    name: str = Field(min_length=1)
    username_key: str = Field(default="username", min_length=1)
    password_key: str = Field(default="password", min_length=1)


class KeySelector(_Model):
    name: str = Field(min_length=1)
    key: str = Field(min_length=1)


class ParameterSource(_Model):
    secret_key_ref: KeySelector


class Parameter(_Model):
    name: str = Field(min_length=1)
    value: str | None = None
    value_from: ParameterSource | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.value is None) == (self.value_from is None):
            raise ValueError("exactly one of value and valueFrom must be set")
        if self.name in RESERVED_PARAMETERS:
            raise ValueError(f"{self.name!r} is set by the operator and cannot be a parameter")
        return self


class TrustStore(_Model):
    config_map_ref: KeySelector | None = None
    secret_ref: KeySelector | None = None
    # None: detected from the content (PEM text, a JKS/JCEKS magic number, else PKCS#12).
    format: TrustStoreFormat | None = None
    # Key in the secretRef's Secret that holds the keystore password (PKCS#12, JKS).
    password_key: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.config_map_ref is None) == (self.secret_ref is None):
            raise ValueError("exactly one of configMapRef and secretRef must be set")
        if self.password_key is not None and self.secret_ref is None:
            raise ValueError("passwordKey needs secretRef: the password is read from the same Secret")
        if self.password_key is not None and self.format is TrustStoreFormat.PEM:
            raise ValueError("passwordKey is only allowed for the PKCS12 and JKS formats")
        if self.format is TrustStoreFormat.JKS and self.password_key is None:
            raise ValueError("a JKS trust store needs passwordKey (JKS files are checked with their password)")
        return self


class PrivateKeySecretRef(_Model):
    name: str = Field(min_length=1)
    key: str = Field(default="tls.key", min_length=1)


class ClientAssertion(_Model):
    """RFC 7523 client assertion (PrivateKeyJWT, ClientSecretJWT)."""

    private_key_secret_ref: PrivateKeySecretRef | None = None
    # None: from the key (RSA -> RS256, EC P-256/384/521 -> ES256/384/512); HS256 for ClientSecretJWT.
    algorithm: AssertionAlgorithm | None = None
    key_id: str | None = Field(default=None, min_length=1, max_length=256)
    # The aud claim; None: the tokenUrl (RFC 7523 §3), which every server accepts.
    audience: str | None = Field(default=None, min_length=1, max_length=2048)
    lifetime_seconds: int = Field(default=60, ge=10, le=3600)


class ClientCertificateSecretRef(_Model):
    """A kubernetes.io/tls Secret: keys tls.crt (certificate, then its chain) and tls.key."""

    name: str = Field(min_length=1)


class ProxyCredentialsSecretRef(_Model):
    name: str = Field(min_length=1)
    username_key: str = Field(default="username", min_length=1)
    password_key: str = Field(default="password", min_length=1)


class Proxy(_Model):
    """The HTTP(S) proxy for the token endpoint; replaces HTTPS_PROXY/HTTP_PROXY/NO_PROXY for this endpoint."""

    url: str = Field(min_length=1, max_length=2048)
    credentials_secret_ref: ProxyCredentialsSecretRef | None = None

    @model_validator(mode="after")
    def _valid_url(self) -> Self:
        check_proxy_url(self.url)
        return self


def check_proxy_url(url: str) -> None:
    """ValueError unless ``url`` is http(s)://host[:port][/] without credentials, path, query or fragment."""
    parts = parse_url(url, "proxy.url")
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url) \
            or not url.isascii():
        raise ValueError("proxy.url must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("proxy.url must not carry credentials (user:password@); use credentialsSecretRef")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("proxy.url must be scheme://host[:port] only")


def parse_url(url: str, field: str) -> urllib.parse.SplitResult:
    """``url`` split, once both urllib and the HTTP client (httpx) can use it: a bad port, IPv6 literal or
    IDNA host, or characters that NFKC-normalize into URL delimiters are refused here, as the spec error
    naming ``field`` — whose message never repeats the URL, which may hold credentials."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
        _ = httpx.URL(url).host  # .host decodes an IDNA name (and fails on a bad one)
    except (ValueError, httpx.InvalidURL):  # IDNAError is a UnicodeError, a ValueError
        raise ValueError(f"{field} is not a valid URL (its host or port cannot be parsed)") from None
    if port == 0:
        raise ValueError(f"{field} has port 0")
    return parts


class RefreshPolicy(_Model):
    default_expires_in_seconds: int = Field(default=3600, ge=10, le=366 * 86400)
    refresh_before_seconds: int | None = Field(default=None, ge=0)
    refresh_before_percent: int | None = Field(default=None, ge=1, le=90)
    reactive: bool = True

    @model_validator(mode="after")
    def _not_both(self) -> Self:
        if self.refresh_before_seconds is not None and self.refresh_before_percent is not None:
            raise ValueError("refreshBeforeSeconds and refreshBeforePercent are mutually exclusive")
        return self


class SecretTargetSpec(_Model):
    name: str | None = Field(default=None, min_length=1, max_length=253)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class RedisTargetSpec(_Model):
    enabled: bool = False


class TargetSpec(_Model):
    secret: SecretTargetSpec | None = None
    redis: RedisTargetSpec | None = None


class SecuredEndpointSpec(_Model):
    endpoints: dict[str, str] = Field(default_factory=dict)
    token_url: str = Field(min_length=1)
    allow_insecure_http: bool = False
    grant_type: GrantType = GrantType.CLIENT_CREDENTIALS
    client_auth_method: ClientAuthMethod = ClientAuthMethod.CLIENT_SECRET_BASIC
    client_secret_ref: ClientSecretRef
    password_secret_ref: PasswordSecretRef | None = None
    scopes: list[str] = Field(default_factory=list)
    audience: str | None = None
    parameters: list[Parameter] = Field(default_factory=list)
    client_assertion: ClientAssertion | None = None
    client_certificate_secret_ref: ClientCertificateSecretRef | None = None
    trust_store: TrustStore | None = None
    proxy: Proxy | None = None
    refresh: RefreshPolicy = Field(default_factory=RefreshPolicy)
    suspend: bool = False
    target: TargetSpec = Field(default_factory=TargetSpec)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        url = parse_url(self.token_url, "tokenUrl")
        scheme = url.scheme.lower()
        if scheme not in ("https", "http") or not url.hostname or any(c.isspace() for c in self.token_url):
            raise ValueError("tokenUrl must be an absolute https:// URL with a host")
        if url.username is not None or url.password is not None:
            raise ValueError("tokenUrl must not carry credentials (user:password@); use clientSecretRef")
        if scheme == "http" and not self.allow_insecure_http:
            raise ValueError("tokenUrl must use https (set allowInsecureHttp: true to allow http)")
        if self.grant_type is GrantType.PASSWORD and self.password_secret_ref is None:
            raise ValueError("passwordSecretRef is required when grantType is Password")
        if self.grant_type is not GrantType.PASSWORD and self.password_secret_ref is not None:
            raise ValueError("passwordSecretRef is only allowed when grantType is Password")
        names = [p.name for p in self.parameters]
        if len(names) != len(set(names)):
            raise ValueError("parameter names must be unique")
        self._check_client_auth(scheme)
        return self

    def _check_client_auth(self, scheme: str) -> None:
        method, assertion = self.client_auth_method, self.client_assertion
        jwt_methods = (ClientAuthMethod.PRIVATE_KEY_JWT, ClientAuthMethod.CLIENT_SECRET_JWT)
        if method is ClientAuthMethod.PRIVATE_KEY_JWT and (
                assertion is None or assertion.private_key_secret_ref is None):
            raise ValueError("clientAssertion.privateKeySecretRef is required when clientAuthMethod is "
                             "PrivateKeyJWT")
        if assertion is not None and method not in jwt_methods:
            raise ValueError("clientAssertion is only allowed when clientAuthMethod is PrivateKeyJWT or "
                             "ClientSecretJWT")
        if assertion is not None and method is ClientAuthMethod.CLIENT_SECRET_JWT:
            if assertion.private_key_secret_ref is not None:
                raise ValueError("clientAssertion.privateKeySecretRef is only allowed with PrivateKeyJWT "
                                 "(ClientSecretJWT signs with the client secret)")
            if assertion.algorithm is not None and not assertion.algorithm.is_hmac:
                raise ValueError("clientAssertion.algorithm must be HS256, HS384 or HS512 with ClientSecretJWT")
        if (method is ClientAuthMethod.PRIVATE_KEY_JWT and assertion is not None
                and assertion.algorithm is not None and assertion.algorithm.is_hmac):
            raise ValueError("clientAssertion.algorithm must be an RS, PS or ES algorithm with PrivateKeyJWT")
        if method is ClientAuthMethod.TLS_CLIENT_AUTH and self.client_certificate_secret_ref is None:
            raise ValueError("clientCertificateSecretRef is required when clientAuthMethod is TLSClientAuth")
        if self.client_certificate_secret_ref is not None and scheme != "https":
            raise ValueError("clientCertificateSecretRef needs an https:// tokenUrl")

    # -- derived views the controller relies on -------------------------------------------------

    def secret_target(self, endpoint_name: str) -> SecretTargetSpec | None:
        """The Secret target, or None when only Redis is asked for. No target at all means a Secret."""
        if self.target.secret is not None:
            return self.target.secret
        if self.target.redis is not None and self.target.redis.enabled:
            return None
        return SecretTargetSpec()

    def secret_target_name(self, endpoint_name: str) -> str | None:
        target = self.secret_target(endpoint_name)
        if target is None:
            return None
        return target.name or f"{endpoint_name}-token"

    @property
    def redis_enabled(self) -> bool:
        return self.target.redis is not None and self.target.redis.enabled

    def referenced_sources(self) -> frozenset[SourceRef]:
        """Every Secret/ConfigMap whose content goes into the token request (a change to any of them — a
        rotated signing key or client certificate included — means a new token at once)."""
        refs = {SourceRef("Secret", self.client_secret_ref.name)}
        if self.client_assertion is not None and self.client_assertion.private_key_secret_ref is not None:
            refs.add(SourceRef("Secret", self.client_assertion.private_key_secret_ref.name))
        if self.client_certificate_secret_ref is not None:
            refs.add(SourceRef("Secret", self.client_certificate_secret_ref.name))
        if self.proxy is not None and self.proxy.credentials_secret_ref is not None:
            refs.add(SourceRef("Secret", self.proxy.credentials_secret_ref.name))
        if self.password_secret_ref is not None:
            refs.add(SourceRef("Secret", self.password_secret_ref.name))
        for parameter in self.parameters:
            if parameter.value_from is not None:
                refs.add(SourceRef("Secret", parameter.value_from.secret_key_ref.name))
        if self.trust_store is not None:
            if self.trust_store.config_map_ref is not None:
                refs.add(SourceRef("ConfigMap", self.trust_store.config_map_ref.name))
            if self.trust_store.secret_ref is not None:
                refs.add(SourceRef("Secret", self.trust_store.secret_ref.name))
        return frozenset(refs)

    def token_config_hash(self) -> str:
        """A digest of every field that shapes the token: when it changes, a new token is due at once."""
        relevant = self.model_dump(
            mode="json", by_alias=True,
            include={"token_url", "allow_insecure_http", "grant_type", "client_auth_method",
                     "client_secret_ref", "password_secret_ref", "scopes", "audience", "parameters",
                     "trust_store", "client_assertion", "client_certificate_secret_ref", "proxy"},
        )
        # Fields added later count only when set, so an operator upgrade keeps every existing digest
        # (and does not fetch ten thousand tokens at once).
        for key in ("clientAssertion", "clientCertificateSecretRef", "proxy"):
            if relevant.get(key) is None:
                relevant.pop(key, None)
        if isinstance(relevant.get("trustStore"), dict):
            for key in ("format", "passwordKey"):
                if relevant["trustStore"].get(key) is None:
                    relevant["trustStore"].pop(key, None)
        canonical = json.dumps(relevant, sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()[:16]


class SourceRef(tuple[str, str]):
    """``(kind, name)`` of a Secret or ConfigMap in the endpoint's own namespace."""

    __slots__ = ()

    def __new__(cls, kind: Literal["Secret", "ConfigMap"] | str, name: str) -> SourceRef:
        return super().__new__(cls, (kind, name))

    @property
    def kind(self) -> str:
        return self[0]

    @property
    def name(self) -> str:
        return self[1]

    def __str__(self) -> str:
        return f"{self[0]}/{self[1]}"


class SpecError(ValueError):
    """The spec passed the schema (or bypassed it) but cannot work; the message names the field."""


def parse_spec(raw: Mapping[str, Any]) -> SecuredEndpointSpec:
    """Validate a raw spec; errors name the field and never echo input values."""
    try:
        return SecuredEndpointSpec.model_validate(dict(raw))
    except pydantic.ValidationError as exc:
        parts = []
        for error in exc.errors(include_input=False, include_url=False):
            location = ".".join(str(item) for item in error["loc"])
            message = str(error["msg"]).removeprefix("Value error, ")
            parts.append(f"spec.{location}: {message}" if location else f"spec: {message}")
        raise SpecError("; ".join(parts)) from None
