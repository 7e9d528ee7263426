"""The OAuth 2.0 token client: one POST to a token endpoint (RFC 6749 §4.3, §4.4, §6), classified errors.

Client authentication: client_secret_basic/post (RFC 6749 §2.3.1), client_secret_jwt/private_key_jwt
(RFC 7523 §2.2, a fresh assertion per request) and tls_client_auth (RFC 8705 §2, the client certificate of a
mutual-TLS connection; a client certificate can also accompany any other method).

A single TokenClient serves every SecuredEndpoint. It keeps one ``httpx.AsyncClient`` per *connection
identity* — trust store (the bundle's sha256), client certificate (a digest of certificate and key) and
proxy (URL and a digest of its credentials) — in a bounded LRU. Ten thousand endpoints that share three CAs
share three SSL contexts and their connection pools, and two endpoints with different client certificates
or proxies never share a connection.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import logging
import ssl
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self, TypeVar
from urllib.parse import quote_plus

import httpx
from pydantic import SecretStr

from secured_endpoint import __version__, api, schedule
from secured_endpoint.tokens.errors import (
    InvalidCredentialsError,
    InvalidTokenResponseError,
    TokenError,
    TokenRequestFailedError,
    TrustStoreInvalidError,
    sanitize_excerpt,
)
from secured_endpoint.tokens.keys import CLIENT_ASSERTION_TYPE, ClientAssertion, ClientCertificate
from secured_endpoint.tokens.proxy import ProxyConfig, environment_proxy, environment_snapshot
from secured_endpoint.tokens.response import MAX_RESPONSE_BYTES, TokenResponse, parse_token_response

log = logging.getLogger(__name__)

DEFAULT_USER_AGENT = f"secured-endpoint-operator/{__version__}"
_SYSTEM_TRUST = "system"  # pool key of the client that trusts the default CA bundle


@dataclass(frozen=True)
class TokenRequest:
    """Everything one token request needs. Secrets are SecretStr, so ``repr()`` never shows them."""

    token_url: str
    grant_type: api.GrantType
    client_auth_method: api.ClientAuthMethod
    client_id: str
    # ClientSecretBasic/Post; None for the methods that do not use it.
    client_secret: SecretStr | None
    username: str | None = None
    password: SecretStr | None = None
    scopes: tuple[str, ...] = ()
    audience: str | None = None
    # Extra form fields ("Add Parameter"); values may come from Secrets.
    parameters: tuple[tuple[str, SecretStr], ...] = ()
    # PEM bundle that replaces the system CAs for this token URL; long and not secret, so not in repr.
    trust_store_pem: bytes | None = field(default=None, repr=False)
    # Password grant only: tried first (RFC 6749 §6); the password is the fallback.
    refresh_token: SecretStr | None = None
    # ClientSecretJWT / PrivateKeyJWT: how to sign the client assertion (its key is hidden from repr).
    client_assertion: ClientAssertion | None = None
    # Presented in the TLS handshake: TLSClientAuth, or mutual TLS beside another method.
    client_certificate: ClientCertificate | None = None
    # The endpoint's own proxy; None: the TokenClient's environment (HTTPS_PROXY... with NO_PROXY).
    proxy: ProxyConfig | None = None

    def __post_init__(self) -> None:
        if self.grant_type is api.GrantType.PASSWORD and (self.username is None or self.password is None):
            raise ValueError("the password grant needs a username and a password")
        method = self.client_auth_method
        if method in (api.ClientAuthMethod.CLIENT_SECRET_BASIC, api.ClientAuthMethod.CLIENT_SECRET_POST) \
                and self.client_secret is None:
            raise ValueError(f"{method} needs a client secret")
        if method is api.ClientAuthMethod.CLIENT_SECRET_JWT and (
                self.client_assertion is None or not self.client_assertion.is_hmac):
            raise ValueError("ClientSecretJWT needs a client assertion signed with the client secret")
        if method is api.ClientAuthMethod.PRIVATE_KEY_JWT and (
                self.client_assertion is None or self.client_assertion.is_hmac):
            raise ValueError("PrivateKeyJWT needs a client assertion signed with a private key")
        if method is api.ClientAuthMethod.TLS_CLIENT_AUTH and self.client_certificate is None:
            raise ValueError("TLSClientAuth needs a client certificate")
        if self.client_certificate is not None and not self.token_url.lower().startswith("https:"):
            raise ValueError("a client certificate needs an https token URL")

    def secret_values(self) -> list[str]:
        """Every secret this request carries, as given and as sent in the form, to scrub them from
        error messages."""
        secrets = [self.client_secret, self.password, self.refresh_token,
                   *(value for _, value in self.parameters)]
        values = [secret.get_secret_value() for secret in secrets if secret is not None]
        if self.proxy is not None:
            values += self.proxy.secret_values()
        return values + [form_urlencode(value) for value in values]


def form_urlencode(value: str) -> str:
    """RFC 6749 Appendix B: UTF-8, space as '+', every octet but ALPHA / DIGIT / "*-._" percent-encoded."""
    return quote_plus(value, safe="*").replace("~", "%7E")


def basic_authorization(client_id: str, client_secret: str) -> str:
    """The Authorization header of ClientSecretBasic (RFC 6749 §2.3.1): both parts are form-urlencoded
    *before* base64, so a ':' in the client id cannot be confused with the separator."""
    credentials = f"{form_urlencode(client_id)}:{form_urlencode(client_secret)}"
    return "Basic " + base64.b64encode(credentials.encode("ascii")).decode("ascii")


def build_ssl_context(trust_store_pem: bytes) -> ssl.SSLContext:
    """An SSL context that trusts exactly the certificates in the bundle (no system CAs)."""
    try:
        pem = trust_store_pem.decode("ascii")
    except UnicodeDecodeError:
        raise TrustStoreInvalidError("the trust store is not a PEM bundle (not ASCII text)") from None
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise TrustStoreInvalidError("the trust store contains no PEM certificate")
    try:
        context = ssl.create_default_context(cadata=pem)
    except (ssl.SSLError, ValueError) as exc:
        detail = sanitize_excerpt(getattr(exc, "reason", None) or str(exc), 80)
        raise TrustStoreInvalidError(f"the trust store cannot be parsed as a PEM bundle: {detail}") from None
    if context.cert_store_stats().get("x509", 0) == 0:
        raise TrustStoreInvalidError("the trust store contains no usable certificate")
    return context


@dataclass
class _PooledClient:
    """An httpx client of the pool; closed only when evicted *and* no request uses it any more."""

    http: httpx.AsyncClient
    in_use: int = 0
    evicted: bool = False


class TokenClient:
    """Fetches access tokens. Create one per process; ``await aclose()`` (or ``async with``) at the end."""

    def __init__(
        self,
        *,
        timeout: float = 10.0,
        connect_timeout: float = 5.0,
        user_agent: str = DEFAULT_USER_AGENT,
        max_clients: int = 64,
        trust_env: bool = True,
        proxy_environment: Mapping[str, str] | None = None,
    ) -> None:
        """``trust_env``: honour HTTPS_PROXY/HTTP_PROXY/ALL_PROXY/NO_PROXY (see ``tokens.proxy``; a
        request's own proxy overrides them) and SSL_CERT_FILE/SSL_CERT_DIR for the system trust, as
        cluster egress set-ups expect. ``proxy_environment``: those variables from elsewhere than
        ``os.environ`` (tests). A trust store always replaces the system CAs."""
        if timeout <= 0 or connect_timeout <= 0 or max_clients < 1:
            raise ValueError("timeouts must be positive and max_clients at least 1")
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._user_agent = user_agent
        self._max_clients = max_clients
        self._trust_env = trust_env
        self._proxy_environment: dict[str, str] = (
            environment_snapshot(proxy_environment) if trust_env or proxy_environment is not None else {})
        self._pool: OrderedDict[str, _PooledClient] = OrderedDict()
        self._closed = False

    @property
    def pool_size(self) -> int:
        """How many httpx clients (one per distinct trust store, client certificate and proxy) are open."""
        return len(self._pool)

    def proxy_for(self, request: TokenRequest) -> ProxyConfig | None:
        """The proxy ``request`` goes through: its own, else the environment's for its URL, else none."""
        if request.proxy is not None:
            return request.proxy
        if not self._proxy_environment:
            return None
        return environment_proxy(request.token_url, self._proxy_environment)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        pooled, self._pool = list(self._pool.values()), OrderedDict()
        for client in pooled:
            await client.http.aclose()

    async def fetch(self, request: TokenRequest) -> TokenResponse:
        """Obtain a token, or raise a TokenError subclass whose message holds none of the request's secrets.

        Password grant with a refresh token: the refresh token is tried first; when the server refuses
        it for good (invalid_grant, or any other permanent error) the password grant follows. A refresh
        answer without a new refresh token keeps the old one (RFC 6749 §6).
        """
        sent: list[str] = []  # client assertions sent: credentials too, scrubbed from messages like the rest
        try:
            if request.grant_type is api.GrantType.PASSWORD and request.refresh_token is not None:
                try:
                    response = await self._post(request, _refresh_form(request, request.refresh_token), sent)
                except TokenError as exc:
                    if not exc.permanent:
                        raise
                    log.debug("refresh token refused by %s (%s); using the password grant",
                              _host(request.token_url), exc.oauth_error or exc.status_code)
                else:
                    if response.refresh_token is None:
                        response = dataclasses.replace(response, refresh_token=request.refresh_token)
                    return response
            return await self._post(request, _grant_form(request), sent)
        except TokenError as exc:
            exc.redact([*request.secret_values(), *sent])
            raise

    async def _post(self, request: TokenRequest, form: list[tuple[str, str]], sent: list[str]) -> TokenResponse:
        host = _host(request.token_url)
        if _has_userinfo(request.token_url):
            # httpx would turn user:password@ into its own Basic header, replacing the client's.
            raise TokenRequestFailedError(f"the token URL of {host} must not contain user credentials",
                                          permanent=True)
        headers = {
            "Accept": "application/json",
            "Content-Type": "application/x-www-form-urlencoded",
            "User-Agent": self._user_agent,
        }
        form = _authenticate_client(request, form, headers, sent)
        body = "&".join(f"{form_urlencode(name)}={form_urlencode(value)}" for name, value in form).encode()
        proxy = self.proxy_for(request)
        log.debug("token request to %s (grant_type=%s, client_id=%s, client auth %s%s)", host, form[0][1],
                  request.client_id, request.client_auth_method, f", via {proxy.label}" if proxy else "")

        async with self._client_for(request.trust_store_pem, request.client_certificate, proxy) as http:
            try:
                # httpx timeouts are per network operation; the outer deadline bounds the whole exchange.
                async with asyncio.timeout(self._timeout):
                    stream = http.stream("POST", request.token_url, content=body, headers=headers)
                    async with stream as answer:
                        content = await _read_limited(answer)
            except TimeoutError:
                via = f" via {proxy.label}" if proxy is not None else ""
                raise TokenRequestFailedError(
                    f"token request to {host}{via} timed out after {self._timeout:g}s") from None
            except (httpx.HTTPError, ssl.SSLError) as exc:
                # an ssl.SSLError can escape httpx unwrapped: a TLS 1.3 alert arriving on the first read
                trust = "the system CAs" if request.trust_store_pem is None else "the trust store"
                raise _transport_error(exc, host, trust, self._timeout, self._connect_timeout, proxy=proxy,
                                       client_certificate=request.client_certificate is not None) from None
        if proxy is not None and answer.status_code == 407:  # plain http through the proxy
            raise _proxy_refused(proxy, host, "407 Proxy Authentication Required")
        try:
            return parse_token_response(answer.status_code, answer.headers.get("content-type"), content)
        except TokenError as exc:
            exc.retry_after_seconds = schedule.parse_retry_after(answer.headers.get("retry-after"))
            raise

    @asynccontextmanager
    async def _client_for(self, trust_store_pem: bytes | None, client_certificate: ClientCertificate | None,
                          proxy: ProxyConfig | None) -> AsyncIterator[httpx.AsyncClient]:
        if self._closed:
            raise RuntimeError("TokenClient is closed")
        key = "|".join((
            _SYSTEM_TRUST if trust_store_pem is None else hashlib.sha256(trust_store_pem).hexdigest(),
            "-" if client_certificate is None else client_certificate.identity,
            "-" if proxy is None else proxy.pool_key,
        ))
        pooled = self._pool.get(key)
        if pooled is None:
            pooled = _PooledClient(self._new_http_client(
                self._ssl_context(trust_store_pem, client_certificate), proxy))
            self._pool[key] = pooled
            await self._evict_beyond_limit()
        else:
            self._pool.move_to_end(key)
        pooled.in_use += 1
        try:
            yield pooled.http
        finally:
            pooled.in_use -= 1
            if pooled.evicted and pooled.in_use == 0:
                await pooled.http.aclose()

    async def _evict_beyond_limit(self) -> None:
        while len(self._pool) > self._max_clients:
            _, oldest = self._pool.popitem(last=False)
            oldest.evicted = True
            if oldest.in_use == 0:
                await oldest.http.aclose()

    def _system_ssl_context(self) -> ssl.SSLContext:
        # certifi's CA bundle, or SSL_CERT_FILE/SSL_CERT_DIR when trust_env is on.
        return httpx.create_ssl_context(trust_env=self._trust_env)

    def _ssl_context(self, trust_store_pem: bytes | None,
                     client_certificate: ClientCertificate | None) -> ssl.SSLContext:
        context = (self._system_ssl_context() if trust_store_pem is None
                   else build_ssl_context(trust_store_pem))
        if client_certificate is not None:
            client_certificate.load_into(context)
        return context

    def _new_http_client(self, verify: ssl.SSLContext, proxy: ProxyConfig | None) -> httpx.AsyncClient:
        # Verification is never switched off. trust_env=False: the proxy is decided in proxy_for() and the
        # system trust in _system_ssl_context(); httpx would otherwise also add .netrc credentials.
        return httpx.AsyncClient(
            verify=verify,
            proxy=proxy.httpx_proxy(self._system_ssl_context()) if proxy is not None else None,
            follow_redirects=False,
            trust_env=False,
            timeout=httpx.Timeout(self._timeout, connect=self._connect_timeout),
        )


def _authenticate_client(request: TokenRequest, form: list[tuple[str, str]], headers: dict[str, str],
                         sent: list[str]) -> list[tuple[str, str]]:
    """Add the client authentication of ``request`` to the form or the headers."""
    method = request.client_auth_method
    if method is api.ClientAuthMethod.CLIENT_SECRET_BASIC:
        assert request.client_secret is not None  # checked in TokenRequest.__post_init__
        headers["Authorization"] = basic_authorization(request.client_id, request.client_secret.get_secret_value())
        return form
    if method is api.ClientAuthMethod.CLIENT_SECRET_POST:
        assert request.client_secret is not None
        return [*form, ("client_id", request.client_id),
                ("client_secret", request.client_secret.get_secret_value())]
    if method in (api.ClientAuthMethod.CLIENT_SECRET_JWT, api.ClientAuthMethod.PRIVATE_KEY_JWT):
        assert request.client_assertion is not None
        # RFC 7523 §3: a new jti every time; client_id is optional there and sent for servers that want it.
        assertion = request.client_assertion.create(request.client_id, request.token_url)
        sent.append(assertion)
        return [*form, ("client_id", request.client_id), ("client_assertion_type", CLIENT_ASSERTION_TYPE),
                ("client_assertion", assertion)]
    # TLSClientAuth (RFC 8705 §2): the certificate authenticates; client_id is still sent.
    return [*form, ("client_id", request.client_id)]


def _grant_form(request: TokenRequest) -> list[tuple[str, str]]:
    if request.grant_type is api.GrantType.PASSWORD:
        # Both are checked in TokenRequest.__post_init__; the asserts tell the type checker.
        assert request.username is not None
        assert request.password is not None
        form = [("grant_type", "password"), ("username", request.username),
                ("password", request.password.get_secret_value())]
    else:
        form = [("grant_type", "client_credentials")]
    return form + _common_fields(request)


def _refresh_form(request: TokenRequest, refresh_token: SecretStr) -> list[tuple[str, str]]:
    return [("grant_type", "refresh_token"), ("refresh_token", refresh_token.get_secret_value()),
            *_common_fields(request)]


def _common_fields(request: TokenRequest) -> list[tuple[str, str]]:
    fields: list[tuple[str, str]] = []
    if request.scopes:
        fields.append(("scope", " ".join(request.scopes)))
    if request.audience:
        fields.append(("audience", request.audience))
    fields.extend((name, value.get_secret_value()) for name, value in request.parameters)
    return fields


async def _read_limited(answer: httpx.Response) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in answer.aiter_bytes():
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise InvalidTokenResponseError(
                f"token response is larger than {MAX_RESPONSE_BYTES // 1024} KiB (HTTP {answer.status_code})",
                status_code=answer.status_code,
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _has_userinfo(token_url: str) -> bool:
    try:
        return bool(httpx.URL(token_url).userinfo)
    except (httpx.InvalidURL, TypeError):
        return False  # httpx refuses the URL itself a moment later, with a clear error


def _host(token_url: str) -> str:
    """host[:port] of the token URL, without user info, path or query (which might carry secrets)."""
    try:
        url = httpx.URL(token_url)
    except (httpx.InvalidURL, TypeError):
        return "the token URL"
    if not url.host:
        return "the token URL"
    host = f"[{url.host}]" if ":" in url.host else url.host
    return f"{host}:{url.port}" if url.port else host


# TLS alerts by which a server refuses the client certificate (or the lack of one).
_CLIENT_CERTIFICATE_ALERTS = frozenset({
    "TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED", "SSLV3_ALERT_CERTIFICATE_REVOKED", "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
    "TLSV1_ALERT_ACCESS_DENIED", "TLSV13_ALERT_CERTIFICATE_REQUIRED",
})


def _transport_error(
    exc: httpx.HTTPError | ssl.SSLError, host: str, trust: str, timeout: float, connect_timeout: float, *,
    proxy: ProxyConfig | None = None, client_certificate: bool = False,
) -> TokenError:
    via = f" via {proxy.label}" if proxy is not None else ""
    refused = _client_certificate_refused(exc, host, client_certificate)
    if refused is not None:
        return refused
    if isinstance(exc, ssl.SSLError):
        detail = sanitize_excerpt(str(exc.reason or exc), 100)
        return TokenRequestFailedError(f"TLS with {host}{via} failed: {detail}")
    if isinstance(exc, httpx.ProxyError) and proxy is not None:
        return _proxy_refused(proxy, host, sanitize_excerpt(str(exc), 100))
    if isinstance(exc, httpx.ConnectTimeout):
        if proxy is not None:
            return TokenRequestFailedError(
                f"connecting to {proxy.label} for {host} timed out after {connect_timeout:g}s")
        return TokenRequestFailedError(f"connecting to {host} timed out after {connect_timeout:g}s")
    if isinstance(exc, httpx.TimeoutException):
        return TokenRequestFailedError(f"token request to {host}{via} timed out after {timeout:g}s")
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return TokenRequestFailedError("the token URL is not a valid http(s) URL", permanent=True)
    if isinstance(exc, httpx.ConnectError):
        verify_error = _find_cause(exc, ssl.SSLCertVerificationError)
        if verify_error is not None:
            problem = verify_error.verify_message or verify_error.reason or "failed"
            detail = sanitize_excerpt(str(problem), 100)
            if proxy is not None and proxy.url.startswith("https:"):
                # httpx does not say which of the two handshakes failed
                return TrustStoreInvalidError(
                    f"a certificate does not verify ({detail}): that of {proxy.label}, checked against the "
                    f"system CAs, or that of {host}, checked against {trust}")
            return TrustStoreInvalidError(
                f"the certificate of {host} does not verify against {trust}: {detail}")
        tls_error = _find_cause(exc, ssl.SSLError)
        if tls_error is not None:
            detail = sanitize_excerpt(str(tls_error.reason or tls_error), 100)
            return TokenRequestFailedError(f"TLS handshake with {host}{via} failed: {detail}")
        if proxy is not None:  # the TCP connection goes to the proxy; the proxy answers for the rest
            return TokenRequestFailedError(
                f"cannot connect to {proxy.label} for {host}: {sanitize_excerpt(str(exc), 100)}")
        return TokenRequestFailedError(f"cannot connect to {host}: {sanitize_excerpt(str(exc), 100)}")
    if client_certificate and isinstance(exc, httpx.ReadError | httpx.RemoteProtocolError):
        # TLS 1.3: the server judges the client certificate after the handshake; its alert can be lost
        # when it closes the connection at once.
        return TokenRequestFailedError(
            f"{host}{via} closed the connection after the TLS handshake ({type(exc).__name__}); it may have "
            "refused the client certificate")
    return TokenRequestFailedError(
        f"token request to {host}{via} failed: {type(exc).__name__} {sanitize_excerpt(str(exc), 100)}".rstrip())


def _client_certificate_refused(exc: BaseException, host: str, client_certificate: bool) -> TokenError | None:
    """The server ended the handshake over the client certificate: the client is refused (RFC 8705 §2).
    With TLS 1.3 the alert arrives after the handshake, on the first read, so any transport error counts."""
    tls_error = _find_cause(exc, ssl.SSLError)
    reason = getattr(tls_error, "reason", None) if tls_error is not None else None
    if reason not in _CLIENT_CERTIFICATE_ALERTS or isinstance(tls_error, ssl.SSLCertVerificationError):
        return None
    alert = str(reason).split("ALERT_", 1)[-1].replace("_", " ").lower()
    if not client_certificate:
        if reason != "TLSV13_ALERT_CERTIFICATE_REQUIRED":
            return None
        return InvalidCredentialsError(
            f"{host} requires a client certificate (TLS alert: {alert}); set clientCertificateSecretRef")
    return InvalidCredentialsError(f"{host} refused the client certificate (TLS alert: {alert})")


def _proxy_refused(proxy: ProxyConfig, host: str, answer: str) -> TokenError:
    """The proxy answered the CONNECT (or the plain request) with an error status."""
    status = answer.split(" ", 1)[0]
    if status == "407":
        if proxy.username is None:
            hint = ("; set spec.proxy.credentialsSecretRef" if proxy.source == "spec.proxy.url"
                    else f"; give {proxy.source} user:password@")
            return TokenRequestFailedError(f"{proxy.label} asks for credentials ({answer}){hint}", permanent=True)
        return TokenRequestFailedError(f"{proxy.label} refused the proxy credentials ({answer})", permanent=True)
    if status == "403":
        return TokenRequestFailedError(f"{proxy.label} does not allow connections to {host} ({answer})",
                                       permanent=True)
    return TokenRequestFailedError(f"{proxy.label} could not reach {host} ({answer})")


_E = TypeVar("_E", bound=BaseException)


def _find_cause(exc: BaseException, kind: type[_E]) -> _E | None:
    """The first exception of ``kind`` in the cause/context chain (httpx wraps the ssl error)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
