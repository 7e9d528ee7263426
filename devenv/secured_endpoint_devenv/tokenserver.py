"""A small but real OAuth 2.0 token server (RFC 6749) for tests and the ``demo`` command.

Standard library HTTP server in a background thread; ``cryptography`` for its own CA and server
certificate, PyJWT for JWT access tokens. It is strict where the operator must be correct (client
authentication per §2.3.1, error responses per §5.2) and has knobs to misbehave on purpose::

    with TokenServer(tls=True) as server:
        server.add_client("orders", "s3cret")
        server.fault = "503"            # every token request now answers 503
        server.go_down(); server.come_up()   # refuse connections for a while, same port afterwards

Endpoints:

- ``POST /oauth2/token`` — grants ``client_credentials``, ``password`` and ``refresh_token``; client
  authentication ``client_secret_basic`` (both parts form-urlencoded before base64),
  ``client_secret_post``, ``client_secret_jwt`` and ``private_key_jwt`` (RFC 7523: the assertion's
  signature, iss/sub, aud = token URL or issuer, exp, and jti replay are checked) and, with TLS,
  ``tls_client_auth`` (RFC 8705 §2: the handshake asks for a client certificate, ``ssl.CERT_OPTIONAL``,
  verified against the server's client CA and the certificates registered with ``add_client``; the
  certificate's SHA-256 fingerprint or subject DN names the client).
- ``GET /api/echo`` — a tiny protected backend: 200 with a currently valid ``Authorization: Bearer``
  token, 401 (RFC 6750) otherwise.
- ``GET /healthz``, ``GET /admin/stats``, ``POST /admin/config`` (JSON knobs), ``POST /admin/revoke-all``,
  ``GET /.well-known/oauth-authorization-server`` (RFC 8414, token endpoint only).

The admin surface has no authentication: a development tool, bound to loopback by default. Never expose it.

Refresh tokens: issued for the password grant while ``issue_refresh_tokens`` is on (the default) and then
rotated — each use revokes the presented refresh token and returns a new one (single use, as the OAuth 2.0
Security BCP recommends). While ``issue_refresh_tokens`` is off, a refresh token already issued stays
reusable and refresh answers carry none. Client credentials grants never get one (RFC 6749 §4.4.3).

Run ``python -m secured_endpoint_devenv.tokenserver --help`` for the command line.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import secrets
import signal
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import Message
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Literal, Self, get_args
from urllib.parse import parse_qsl, unquote_plus, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from secured_endpoint_devenv.loopback import LoopbackHTTPServer

TOKEN_PATH = "/oauth2/token"
AuthMethod = Literal["basic", "post", "client_secret_jwt", "private_key_jwt", "tls_client_auth"]
AUTH_METHODS: frozenset[str] = frozenset(get_args(AuthMethod))
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
_SIGNATURE_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
MAX_ASSERTION_LIFETIME_SECONDS = 3600 + 60
TokenFormat = Literal["opaque", "jwt"]
Fault = Literal[
    "500", "503", "429", "bad_json", "html", "missing_access_token", "missing_token_type",
    "invalid_client", "invalid_grant", "invalid_scope", "redirect", "empty_body", "echo_request",
]
FAULTS: frozenset[str] = frozenset(get_args(Fault))
GRANT_TYPES = frozenset({"client_credentials", "password", "refresh_token"})
_MAX_REQUEST_BYTES = 64 * 1024
_REALM = 'realm="secured-endpoint-devenv"'


# -- certificates ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertificateAuthority:
    """A throwaway CA. ``cert_pem`` is what a client puts into its trust store."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue_server_certificate(self, hosts: Iterable[str]) -> tuple[bytes, bytes]:
        """A server certificate for ``hosts`` (DNS names or IP addresses): ``(cert_pem, key_pem)``."""
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = []
        for host in dict.fromkeys(hosts):  # unique, order kept
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "token server")]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem

    def issue_client_certificate(self, common_name: str, *, key_type: Literal["ec", "rsa"] = "ec",
                                 not_before: dt.datetime | None = None,
                                 not_after: dt.datetime | None = None) -> tuple[bytes, bytes]:
        """A TLS client certificate (EKU clientAuth) for ``common_name``: ``(cert_pem, key_pem)``, the
        shape of a kubernetes.io/tls Secret's tls.crt and tls.key."""
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
            ec.generate_private_key(ec.SECP256R1()) if key_type == "ec"
            else rsa.generate_private_key(public_exponent=65537, key_size=2048))
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - dt.timedelta(hours=1))
            .not_valid_after(not_after or now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem


def generate_ca(common_name: str = "secured-endpoint devenv CA", *, not_before: dt.datetime | None = None,
                not_after: dt.datetime | None = None) -> CertificateAuthority:
    """A new self-signed CA; also handy in tests as a trust store that matches nothing (or, with a
    ``not_after`` in the past, as an expired one)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(hours=1))
        .not_valid_after(not_after or now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(cert=cert, key=key)


def _key_usage(*, digital_signature: bool = False, key_cert_sign: bool = False,
               crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=key_cert_sign, crl_sign=crl_sign,
        encipher_only=False, decipher_only=False,
    )


def _server_ssl_context(cert_pem: bytes, key_pem: bytes, client_ca_pem: bytes | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if client_ca_pem is not None:
        # Ask every client for a certificate (tls_client_auth) without requiring one (the other methods).
        context.verify_mode = ssl.CERT_OPTIONAL
        context.load_verify_locations(cadata=client_ca_pem.decode("ascii"))
    # load_cert_chain reads files only; the files live just long enough to be read.
    with tempfile.TemporaryDirectory(prefix="tokenserver-") as directory:
        cert_file, key_file = Path(directory, "tls.crt"), Path(directory, "tls.key")
        cert_file.write_bytes(cert_pem)
        key_file.write_bytes(key_pem)
        context.load_cert_chain(cert_file, key_file)
    return context


# -- knobs and records -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Knobs:
    """How the server behaves; replaced as a whole, so a request always sees one consistent set."""

    lifetime_seconds: int = 3600
    omit_expires_in: bool = False
    token_format: TokenFormat = "opaque"
    issue_refresh_tokens: bool = True
    delay_seconds: float = 0.0
    fault: Fault | None = None
    # How many token requests the fault still applies to; None = until it is cleared.
    fault_count: int | None = None
    # The server's clock runs this many seconds ahead (negative: behind) in the JWTs it issues (iat, exp); the
    # token still lives lifetime_seconds of real time, and expires_in is unaffected.
    clock_skew_seconds: float = 0.0

    def __post_init__(self) -> None:
        def is_int(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not is_int(self.lifetime_seconds) or self.lifetime_seconds < 1:
            raise ValueError("lifetime_seconds must be a positive integer")
        if not isinstance(self.omit_expires_in, bool) or not isinstance(self.issue_refresh_tokens, bool):
            raise ValueError("omit_expires_in and issue_refresh_tokens must be booleans")
        if self.token_format not in get_args(TokenFormat):
            raise ValueError(f"token_format must be one of {sorted(get_args(TokenFormat))}")
        is_number = is_int(self.delay_seconds) or isinstance(self.delay_seconds, float)
        if not is_number or self.delay_seconds < 0:
            raise ValueError("delay_seconds must be a number >= 0")
        if self.fault is not None and self.fault not in FAULTS:
            raise ValueError(f"fault must be null or one of {sorted(FAULTS)}")
        if self.fault_count is not None and (not is_int(self.fault_count) or self.fault_count < 1):
            raise ValueError("fault_count must be null or a positive integer")
        if not (is_int(self.clock_skew_seconds) or isinstance(self.clock_skew_seconds, float)):
            raise ValueError("clock_skew_seconds must be a number")


@dataclass(frozen=True)
class RecordedRequest:
    """One request to the token endpoint, as the server saw it. Test-only: ``form`` holds what was sent,
    secrets included (hidden from repr)."""

    time: float
    grant_type: str | None
    client_id: str | None
    auth_method: AuthMethod | None
    form: dict[str, str] = field(repr=False)
    status: int
    error: str | None  # the RFC 6749 §5.2 error code answered, if any
    # The access/refresh token the answer carried (also in faulty answers), to check that none leaks.
    access_token: str | None = field(default=None, repr=False)
    refresh_token: str | None = field(default=None, repr=False)
    # A client assertion's header and claims as received (also when refused); None without one.
    assertion_header: dict[str, Any] | None = field(default=None, repr=False)
    assertion_claims: dict[str, Any] | None = field(default=None, repr=False)
    # "sha256:<hex>" of the TLS client certificate presented on the connection, if any.
    client_certificate: str | None = None


@dataclass(frozen=True)
class IssuedToken:
    access_token: str = field(repr=False)
    client_id: str
    subject: str
    scope: str | None
    audience: str | None
    issued_at: float
    expires_at: float


@dataclass(frozen=True)
class _Client:
    client_id: str
    secret: str | None
    auth_methods: frozenset[str]
    grant_types: frozenset[str] | None
    scopes: frozenset[str] | None
    assertion_keys: tuple[PublicKeyTypes, ...] = ()
    tls_fingerprints: frozenset[str] = frozenset()
    tls_subjects: frozenset[str] = frozenset()


@dataclass(frozen=True)
class _Presented:
    """The client credentials of one request, as presented, not yet checked."""

    client_id: str | None
    method: AuthMethod | None
    secret: str | None = None
    assertion: str | None = None
    assertion_header: dict[str, Any] | None = None
    assertion_claims: dict[str, Any] | None = None


@dataclass(frozen=True)
class _RefreshGrant:
    client_id: str
    username: str
    scope: str | None
    audience: str | None


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes = b""
    content_type: str = "application/json;charset=UTF-8"
    headers: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None
    access_token: str | None = None
    refresh_token: str | None = None

    @classmethod
    def json(cls, status: int, document: object, **kwargs: Any) -> _Reply:
        return cls(status, json.dumps(document).encode(), **kwargs)


class _OAuthError(Exception):
    """An RFC 6749 §5.2 error answer, raised inside request handling."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error, self.description, self.status = error, description, status

    def reply(self) -> _Reply:
        headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
        if self.status == 401:
            headers["WWW-Authenticate"] = f"Basic {_REALM}"
        return _Reply.json(self.status, {"error": self.error, "error_description": self.description},
                           headers=headers, error=self.error)


# -- the server ------------------------------------------------------------------------------------------


class TokenServer:
    """An RFC 6749 token server on loopback. Thread-safe; every knob may change while it runs.

    ``tls``: serve https with a CA of its own (``ca_pem``); the certificate names 127.0.0.1, localhost,
    ``host`` and ``tls_hosts`` (e.g. a Service DNS name when the demo runs it in a cluster). ``port`` 0
    picks a free port at the first ``start()`` and keeps it from then on. IPv4 only.
    """

    def __init__(self, *, tls: bool = False, host: str = "127.0.0.1", port: int = 0,
                 tls_hosts: Sequence[str] = ()) -> None:
        self._host = host
        self._port = port
        self._lock = threading.RLock()
        self._knobs = Knobs()
        self._clients: dict[str, _Client] = {}
        self._users: dict[str, str] = {}
        self._tokens: dict[str, IssuedToken] = {}
        self._revoked: set[str] = set()
        self._refresh_grants: dict[str, _RefreshGrant] = {}
        self._requests: list[RecordedRequest] = []
        self._jwt_key = secrets.token_bytes(32)
        self._http: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._seen_jtis: dict[str, float] = {}  # client assertion jti -> exp, against replays
        self._ca: CertificateAuthority | None = None
        self._client_ca: CertificateAuthority | None = None
        self._ssl_context: ssl.SSLContext | None = None
        if tls:
            self._ca = generate_ca()
            self._client_ca = generate_ca("secured-endpoint devenv client CA")
            wildcard = host in ("", "0.0.0.0")  # noqa: S104 - a name check, nothing is bound here
            sans = ["127.0.0.1", "localhost", *([] if wildcard else [host]), *tls_hosts]
            self._ssl_context = _server_ssl_context(*self._ca.issue_server_certificate(sans),
                                                    client_ca_pem=self._client_ca.cert_pem)

    # -- lifecycle --

    def start(self) -> Self:
        """Listen (again). After the first start the port is fixed, so ``come_up`` keeps the URL."""
        with self._lock:
            if self._http is not None:
                return self
            http = _HTTPServer((self._host, self._port), self, self._ssl_context)
            self._port = http.server_address[1]
            thread = threading.Thread(target=http.serve_forever, kwargs={"poll_interval": 0.05},
                                      name=f"tokenserver:{self._port}", daemon=True)
            thread.start()
            self._http, self._thread = http, thread
        return self

    def stop(self) -> None:
        """Stop listening and drop every open connection; state (clients, tokens) is kept."""
        with self._lock:
            http, thread = self._http, self._thread
            self._http = self._thread = None
        if http is not None:
            http.close_all()
        if thread is not None:
            thread.join(timeout=5)

    go_down = stop  # "the token server is down": connections are refused
    come_up = start  # back on the same port

    @property
    def is_up(self) -> bool:
        return self._http is not None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- addresses --

    @property
    def port(self) -> int:
        if self._port == 0:
            raise RuntimeError("the token server has not been started yet")
        return self._port

    @property
    def url(self) -> str:
        """Base URL, e.g. ``https://127.0.0.1:41234``."""
        scheme = "https" if self._ssl_context is not None else "http"
        host = "127.0.0.1" if self._host in ("", "0.0.0.0") else self._host  # noqa: S104
        return f"{scheme}://{host}:{self.port}"

    @property
    def token_url(self) -> str:
        return self.url + TOKEN_PATH

    @property
    def ca_pem(self) -> bytes:
        """The CA that signed the server certificate (TLS only): the trust store a client needs."""
        if self._ca is None:
            raise RuntimeError("the token server runs without TLS")
        return self._ca.cert_pem

    @property
    def client_ca(self) -> CertificateAuthority:
        """The CA whose client certificates the server accepts for tls_client_auth (TLS only)."""
        if self._client_ca is None:
            raise RuntimeError("the token server runs without TLS")
        return self._client_ca

    def issue_client_certificate(self, common_name: str, **options: Any) -> tuple[bytes, bytes]:
        """A client certificate from the server's client CA: ``(cert_pem, key_pem)`` (TLS only)."""
        return self.client_ca.issue_client_certificate(common_name, **options)

    # -- registries --

    def add_client(self, client_id: str, client_secret: str | None = None, *,
                   auth_methods: Collection[AuthMethod] | None = None,
                   grant_types: Collection[str] | None = None,
                   scopes: Collection[str] | None = None,
                   assertion_keys: Iterable[bytes | PublicKeyTypes | PrivateKeyTypes] = (),
                   tls_client_certificate: bytes | None = None,
                   tls_client_subject: str | None = None) -> None:
        """Register (or replace) a confidential client.

        ``assertion_keys``: the public keys (PEM, or key objects; a private key stands for its public key)
        that verify its private_key_jwt assertions. ``tls_client_certificate`` (PEM; also trusted as is, so
        self-signed ones work) or ``tls_client_subject`` (an RFC 4514 DN such as ``CN=orders``): the client
        certificate of its tls_client_auth. ``auth_methods`` None: every method the given credentials
        allow (basic, post and client_secret_jwt with a secret, private_key_jwt with keys, tls_client_auth
        with a certificate or subject). ``grant_types``/``scopes`` None allow every grant/scope; otherwise
        others are refused with unauthorized_client/invalid_scope."""
        keys = tuple(_public_key(key) for key in assertion_keys)
        fingerprints: set[str] = set()
        if tls_client_certificate is not None:
            certificate = x509.load_pem_x509_certificate(tls_client_certificate)
            fingerprints.add(_fingerprint(certificate.public_bytes(serialization.Encoding.DER)))
            if self._ssl_context is not None:  # trusted from now on, for self-signed certificates
                self._ssl_context.load_verify_locations(cadata=tls_client_certificate.decode("ascii"))
        subjects = frozenset({tls_client_subject} if tls_client_subject else set())
        if auth_methods is None:
            derived: list[AuthMethod] = []
            if client_secret is not None:
                derived += ["basic", "post", "client_secret_jwt"]
            if keys:
                derived.append("private_key_jwt")
            if fingerprints or subjects:
                derived.append("tls_client_auth")
            auth_methods = derived
        unknown = set(auth_methods) - AUTH_METHODS
        if unknown or not auth_methods:
            raise ValueError(f"auth_methods must be a non-empty subset of {sorted(AUTH_METHODS)}")
        if client_secret is None and set(auth_methods) & {"basic", "post", "client_secret_jwt"}:
            raise ValueError("basic, post and client_secret_jwt need a client secret")
        if "private_key_jwt" in auth_methods and not keys:
            raise ValueError("private_key_jwt needs assertion_keys")
        if "tls_client_auth" in auth_methods and not (fingerprints or subjects):
            raise ValueError("tls_client_auth needs tls_client_certificate or tls_client_subject")
        if grant_types is not None and not set(grant_types) <= GRANT_TYPES:
            raise ValueError(f"grant_types must be a subset of {sorted(GRANT_TYPES)}")
        with self._lock:
            self._clients[client_id] = _Client(
                client_id, client_secret, frozenset(auth_methods),
                None if grant_types is None else frozenset(grant_types),
                None if scopes is None else frozenset(scopes),
                assertion_keys=keys, tls_fingerprints=frozenset(fingerprints), tls_subjects=subjects,
            )

    def add_user(self, username: str, password: str) -> None:
        with self._lock:
            self._users[username] = password

    # -- knobs --

    @property
    def knobs(self) -> Knobs:
        return self._knobs

    def configure(self, **changes: Any) -> Knobs:
        """Change several knobs at once (ValueError on an unknown knob or a bad value)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(Knobs)}
        if unknown:
            raise ValueError(f"unknown knobs: {sorted(unknown)}")
        with self._lock:
            self._knobs = dataclasses.replace(self._knobs, **changes)
            return self._knobs

    def reset(self) -> None:
        """Default knobs; forget recorded requests. Clients, users and tokens stay."""
        with self._lock:
            self._knobs = Knobs()
            self._requests.clear()

    @property
    def lifetime_seconds(self) -> int:
        return self._knobs.lifetime_seconds

    @lifetime_seconds.setter
    def lifetime_seconds(self, value: int) -> None:
        self.configure(lifetime_seconds=value)

    @property
    def omit_expires_in(self) -> bool:
        return self._knobs.omit_expires_in

    @omit_expires_in.setter
    def omit_expires_in(self, value: bool) -> None:
        self.configure(omit_expires_in=value)

    @property
    def token_format(self) -> TokenFormat:
        return self._knobs.token_format

    @token_format.setter
    def token_format(self, value: TokenFormat) -> None:
        self.configure(token_format=value)

    @property
    def issue_refresh_tokens(self) -> bool:
        return self._knobs.issue_refresh_tokens

    @issue_refresh_tokens.setter
    def issue_refresh_tokens(self, value: bool) -> None:
        self.configure(issue_refresh_tokens=value)

    @property
    def delay_seconds(self) -> float:
        return self._knobs.delay_seconds

    @delay_seconds.setter
    def delay_seconds(self, value: float) -> None:
        self.configure(delay_seconds=value)

    @property
    def fault(self) -> Fault | None:
        return self._knobs.fault

    @fault.setter
    def fault(self, value: Fault | None) -> None:
        """Setting a fault applies it until cleared; use ``configure(fault=..., fault_count=n)`` for n."""
        self.configure(fault=value, fault_count=None)

    # -- introspection --

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every token endpoint request so far (a copy)."""
        with self._lock:
            return list(self._requests)

    @property
    def token_requests(self) -> int:
        with self._lock:
            return len(self._requests)

    @property
    def issued_tokens(self) -> list[IssuedToken]:
        with self._lock:
            return list(self._tokens.values())

    def is_valid(self, access_token: str) -> bool:
        """Issued here, not expired, not revoked."""
        with self._lock:
            issued = self._tokens.get(access_token)
            if issued is None or access_token in self._revoked:
                return False
            return time.time() < issued.expires_at

    def revoke(self, access_token: str) -> bool:
        with self._lock:
            if access_token not in self._tokens or access_token in self._revoked:
                return False
            self._revoked.add(access_token)
            return True

    def revoke_all(self) -> int:
        """Revoke every access token issued so far; returns how many were still unrevoked."""
        with self._lock:
            fresh = self._tokens.keys() - self._revoked
            self._revoked |= fresh
            return len(fresh)

    def revoke_refresh_tokens(self) -> int:
        with self._lock:
            count = len(self._refresh_grants)
            self._refresh_grants.clear()
            return count

    def stats(self) -> dict[str, Any]:
        with self._lock:
            by_grant: dict[str, int] = {}
            failures = 0
            for recorded in self._requests:
                by_grant[recorded.grant_type or "none"] = by_grant.get(recorded.grant_type or "none", 0) + 1
                failures += recorded.status != 200
            now = time.time()
            return {
                "token_requests": len(self._requests),
                "token_requests_by_grant": by_grant,
                "failed_token_requests": failures,
                "issued_tokens": len(self._tokens),
                "valid_tokens": sum(1 for token, issued in self._tokens.items()
                                    if token not in self._revoked and now < issued.expires_at),
                "refresh_tokens": len(self._refresh_grants),
                "knobs": dataclasses.asdict(self._knobs),
            }

    # -- request handling (called from handler threads) --

    def _dispatch(self, method: str, path: str, headers: Message, body: bytes,
               wait: Callable[[float], bool], peer_certificate: bytes | None = None) -> _Reply | None:
        """The answer to one request; None means "drop the connection" (the server is going down).
        ``peer_certificate``: the DER client certificate of the TLS connection, if one was presented."""
        if path == TOKEN_PATH:
            if method != "POST":
                return _Reply(HTTPStatus.METHOD_NOT_ALLOWED, headers={"Allow": "POST"})
            return self._token_endpoint(headers, body, wait, peer_certificate)
        routes: dict[tuple[str, str], Callable[[], _Reply]] = {
            ("GET", "/healthz"): lambda: _Reply(200, b"ok\n", "text/plain;charset=UTF-8"),
            ("GET", "/admin/stats"): lambda: _Reply.json(200, self.stats()),
            ("POST", "/admin/config"): lambda: self._admin_config(body),
            ("POST", "/admin/revoke-all"): lambda: _Reply.json(200, {"revoked": self.revoke_all()}),
            ("POST", "/admin/reset"): self._admin_reset,
            ("GET", "/api/echo"): lambda: self._echo(headers),
            ("GET", "/.well-known/oauth-authorization-server"): self._metadata,
        }
        handler = routes.get((method, path))
        if handler is not None:
            return handler()
        if any(route_path == path for _, route_path in routes):
            return _Reply(HTTPStatus.METHOD_NOT_ALLOWED)
        return _Reply.json(404, {"error": "not_found"})

    def _admin_config(self, body: bytes) -> _Reply:
        try:
            changes = json.loads(body or b"{}")
            if not isinstance(changes, dict):
                raise ValueError("expected a JSON object of knobs")
            knobs = self.configure(**changes)
        except (ValueError, TypeError) as exc:
            return _Reply.json(400, {"error": "invalid_config", "error_description": str(exc)})
        return _Reply.json(200, dataclasses.asdict(knobs))

    def _admin_reset(self) -> _Reply:
        self.reset()
        return _Reply.json(200, self.stats())

    def _echo(self, headers: Message) -> _Reply:
        authorization = headers.get("Authorization", "")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _Reply(401, b"", headers={"WWW-Authenticate": f"Bearer {_REALM}"})
        token = token.strip()
        with self._lock:
            issued = self._tokens.get(token)
        if issued is None or not self.is_valid(token):
            challenge = f'Bearer {_REALM}, error="invalid_token"'
            return _Reply.json(401, {"error": "invalid_token"}, headers={"WWW-Authenticate": challenge})
        return _Reply.json(200, {"ok": True, "client_id": issued.client_id, "subject": issued.subject,
                                 "scope": issued.scope, "expires_at": int(issued.expires_at)})

    def _metadata(self) -> _Reply:
        return _Reply.json(200, {
            "issuer": self.url,
            "token_endpoint": self.token_url,
            "grant_types_supported": sorted(GRANT_TYPES),
            "token_endpoint_auth_methods_supported": [
                "client_secret_basic", "client_secret_post", "client_secret_jwt", "private_key_jwt",
                *(["tls_client_auth", "self_signed_tls_client_auth"] if self._ssl_context is not None else []),
            ],
            "token_endpoint_auth_signing_alg_values_supported": [*_SIGNATURE_ALGORITHMS, *_HMAC_ALGORITHMS],
        })

    def _token_endpoint(self, headers: Message, body: bytes, wait: Callable[[float], bool],
                        peer_certificate: bytes | None = None) -> _Reply | None:
        knobs, fault = self._take_fault()
        if knobs.delay_seconds > 0 and wait(knobs.delay_seconds):
            return None
        form: dict[str, str] = {}
        presented = _Presented(None, None)
        try:
            form = _parse_form(headers, body)
            presented = _client_credentials(headers, form, peer_certificate)
            if fault is not None:
                reply = _fault_reply(fault, knobs, self.url, body)
            else:
                reply = self._grant(knobs, form, self._authenticate(presented, peer_certificate))
        except _OAuthError as error:
            reply = error.reply()
        with self._lock:
            self._requests.append(RecordedRequest(
                time=time.time(), grant_type=form.get("grant_type"), client_id=presented.client_id,
                auth_method=presented.method, form=form, status=reply.status, error=reply.error,
                access_token=reply.access_token, refresh_token=reply.refresh_token,
                assertion_header=presented.assertion_header, assertion_claims=presented.assertion_claims,
                client_certificate=None if peer_certificate is None else _fingerprint(peer_certificate),
            ))
        return reply

    def _take_fault(self) -> tuple[Knobs, Fault | None]:
        with self._lock:
            knobs = self._knobs
            if knobs.fault is not None and knobs.fault_count is not None:
                remaining = knobs.fault_count - 1
                self._knobs = dataclasses.replace(
                    knobs, fault=knobs.fault if remaining else None, fault_count=remaining or None)
            return knobs, knobs.fault

    def _authenticate(self, presented: _Presented, peer_certificate: bytes | None) -> _Client:
        method, client_id = presented.method, presented.client_id
        if method is None or client_id is None:
            raise _OAuthError("invalid_client", "client authentication is required", 401)
        with self._lock:
            client = self._clients.get(client_id)
        if method in ("basic", "post"):
            secret = presented.secret or ""
            # Compare even for unknown clients, so timing does not tell which client ids exist.
            expected = client.secret if client is not None and client.secret is not None else secrets.token_urlsafe(16)
            if not hmac.compare_digest(expected.encode(), secret.encode()) or client is None:
                raise _OAuthError("invalid_client", "client authentication failed", 401)
        elif client is None:
            raise _OAuthError("invalid_client", "client authentication failed", 401)
        if method not in client.auth_methods:
            label = f"client_secret_{method}" if method in ("basic", "post") else method
            raise _OAuthError("invalid_client", f"{label} is not allowed for this client", 401)
        if method in ("client_secret_jwt", "private_key_jwt"):
            self._verify_assertion(client, presented)
        elif method == "tls_client_auth":
            _verify_client_certificate(client, peer_certificate)
        return client

    def _verify_assertion(self, client: _Client, presented: _Presented) -> None:
        """RFC 7523 §3: signature, iss = sub = client id, aud = this token endpoint (or the issuer), exp in
        the future and not too far, jti never seen before."""
        assert presented.assertion is not None
        assert presented.assertion_header is not None
        algorithm = str(presented.assertion_header.get("alg"))
        keys: Sequence[str | PublicKeyTypes]
        if presented.method == "client_secret_jwt":
            assert client.secret is not None  # client_secret_jwt is only allowed with a secret
            keys = [client.secret]
        else:
            keys = client.assertion_keys
        claims: dict[str, Any] | None = None
        for key in keys:
            try:
                claims = jwt.decode(
                    presented.assertion, key,  # type: ignore[arg-type]
                    algorithms=[algorithm], audience=[self.token_url, self.url], issuer=client.client_id,
                    options={"require": ["iss", "sub", "aud", "exp", "jti"]}, leeway=5,
                )
                break
            except (jwt.InvalidSignatureError, jwt.InvalidKeyError, TypeError, ValueError):
                continue  # another key (rotation), or a key of another type
            except jwt.InvalidTokenError as exc:
                raise _OAuthError("invalid_client", f"the client assertion is invalid: {exc}", 401) from None
        if claims is None:
            raise _OAuthError("invalid_client", "the client assertion's signature does not verify", 401)
        if claims["sub"] != client.client_id:
            raise _OAuthError("invalid_client", "the client assertion's sub is not the client id", 401)
        now = time.time()
        if float(claims["exp"]) - now > MAX_ASSERTION_LIFETIME_SECONDS:
            raise _OAuthError("invalid_client", "the client assertion lives too long", 401)
        jti = str(claims["jti"])
        with self._lock:
            for seen, expires in list(self._seen_jtis.items()):
                if expires < now - 60:
                    del self._seen_jtis[seen]
            if jti in self._seen_jtis:
                raise _OAuthError("invalid_client", "the client assertion was used before (jti replay)", 401)
            self._seen_jtis[jti] = float(claims["exp"])

    def _grant(self, knobs: Knobs, form: Mapping[str, str], client: _Client) -> _Reply:
        grant_type = form.get("grant_type")
        if not grant_type:
            raise _OAuthError("invalid_request", "grant_type is missing")
        if grant_type not in GRANT_TYPES:
            raise _OAuthError("unsupported_grant_type", "this server supports client_credentials, "
                                                        "password and refresh_token")
        if client.grant_types is not None and grant_type not in client.grant_types:
            raise _OAuthError("unauthorized_client", f"the client may not use the {grant_type} grant")
        requested_scope = _scope_param(form)
        requested = set((requested_scope or "").split())
        if client.scopes is not None and not requested <= client.scopes:
            raise _OAuthError("invalid_scope", "the requested scope is not allowed for this client")
        audience = form.get("audience") or None

        if grant_type == "client_credentials":
            return self._issue(knobs, client, client.client_id, requested_scope, audience, refresh=False)
        if grant_type == "password":
            username, password = form.get("username"), form.get("password")
            if not username or password is None:
                raise _OAuthError("invalid_request", "username and password are required")
            with self._lock:
                expected = self._users.get(username)
            if expected is None or not hmac.compare_digest(expected.encode(), password.encode()):
                raise _OAuthError("invalid_grant", "the resource owner credentials are invalid")
            return self._issue(knobs, client, username, requested_scope, audience,
                               refresh=knobs.issue_refresh_tokens)
        return self._refresh(knobs, form, client, requested_scope, audience)

    def _refresh(self, knobs: Knobs, form: Mapping[str, str], client: _Client,
                 requested_scope: str | None, audience: str | None) -> _Reply:
        presented = form.get("refresh_token")
        if not presented:
            raise _OAuthError("invalid_request", "refresh_token is missing")
        with self._lock:
            grant = self._refresh_grants.get(presented)
            if grant is None or grant.client_id != client.client_id:
                raise _OAuthError("invalid_grant", "the refresh token is invalid, expired or revoked")
            scope = grant.scope
            if requested_scope is not None:
                # RFC 6749 §6: a refresh may narrow the original scope, never widen it.
                if not set(requested_scope.split()) <= set((grant.scope or "").split()):
                    raise _OAuthError("invalid_scope", "the requested scope exceeds the original grant")
                scope = requested_scope
            if knobs.issue_refresh_tokens:
                del self._refresh_grants[presented]  # rotation: each refresh token works once
        return self._issue(knobs, client, grant.username, scope, audience or grant.audience,
                           refresh=knobs.issue_refresh_tokens)

    def _issue(self, knobs: Knobs, client: _Client, subject: str, scope: str | None,
               audience: str | None, *, refresh: bool) -> _Reply:
        now = time.time()
        expires_at = now + knobs.lifetime_seconds
        if knobs.token_format == "jwt":
            claims: dict[str, Any] = {
                "iss": self.url, "sub": subject, "aud": audience or client.client_id,
                "client_id": client.client_id, "iat": int(now + knobs.clock_skew_seconds),
                "exp": int(expires_at + knobs.clock_skew_seconds),
                "jti": secrets.token_hex(8),
            }
            if scope:
                claims["scope"] = scope
            access_token = jwt.encode(claims, self._jwt_key, algorithm="HS256")
        else:
            access_token = secrets.token_urlsafe(32)
        refresh_token = secrets.token_urlsafe(32) if refresh else None
        with self._lock:
            self._tokens[access_token] = IssuedToken(access_token, client.client_id, subject, scope,
                                                     audience, now, expires_at)
            if refresh_token is not None:
                self._refresh_grants[refresh_token] = _RefreshGrant(client.client_id, subject, scope,
                                                                    audience)
        document: dict[str, Any] = {"access_token": access_token, "token_type": "Bearer"}
        if not knobs.omit_expires_in:
            document["expires_in"] = knobs.lifetime_seconds
        if scope:
            document["scope"] = scope
        if refresh_token is not None:
            document["refresh_token"] = refresh_token
        return _Reply.json(200, document, headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
                           access_token=access_token, refresh_token=refresh_token)


def _parse_form(headers: Message, body: bytes) -> dict[str, str]:
    media_type = headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/x-www-form-urlencoded":
        raise _OAuthError("invalid_request", "the body must be application/x-www-form-urlencoded")
    try:
        pairs = parse_qsl(body.decode("ascii"), keep_blank_values=True, strict_parsing=bool(body),
                          encoding="utf-8", errors="strict", max_num_fields=100)
    except (UnicodeDecodeError, ValueError):
        raise _OAuthError("invalid_request", "the body is not valid form encoding") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:  # RFC 6749 §3.2: parameters MUST NOT be included more than once
            raise _OAuthError("invalid_request", f"parameter {name!r} is repeated")
        form[name] = value
    return form


def _public_key(key: bytes | PublicKeyTypes | PrivateKeyTypes) -> PublicKeyTypes:
    if isinstance(key, bytes):
        if b"PRIVATE KEY" in key:
            return serialization.load_pem_private_key(key, password=None).public_key()
        return serialization.load_pem_public_key(key)
    if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        return key.public_key()
    if isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return key
    raise ValueError("assertion keys are RSA or EC keys (PEM or key objects)")


def _fingerprint(der: bytes) -> str:
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _verify_client_certificate(client: _Client, peer_certificate: bytes | None) -> None:
    """RFC 8705 §2: the (already chain-verified) certificate of the connection must be the client's."""
    if peer_certificate is None:
        raise _OAuthError("invalid_client", "tls_client_auth needs a client certificate on the connection", 401)
    certificate = x509.load_der_x509_certificate(peer_certificate)
    if (_fingerprint(peer_certificate) not in client.tls_fingerprints
            and certificate.subject.rfc4514_string() not in client.tls_subjects):
        raise _OAuthError("invalid_client", "the client certificate is not the one registered for this client",
                          401)


def _client_credentials(headers: Message, form: Mapping[str, str], peer_certificate: bytes | None = None
                        ) -> _Presented:
    """The client credentials as presented, not yet checked."""
    authorization = headers.get("Authorization", "")
    scheme, _, encoded = authorization.partition(" ")
    has_assertion = "client_assertion" in form or "client_assertion_type" in form
    if has_assertion:
        if scheme.lower() == "basic" or "client_secret" in form:
            raise _OAuthError("invalid_request", "use exactly one client authentication method")
        return _assertion_credentials(form)
    if scheme.lower() == "basic":
        if "client_secret" in form:
            raise _OAuthError("invalid_request", "use exactly one client authentication method")
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise _OAuthError("invalid_client", "malformed Basic credentials", 401) from None
        raw_id, colon, raw_secret = decoded.partition(":")
        if not colon:
            raise _OAuthError("invalid_client", "malformed Basic credentials", 401)
        # RFC 6749 §2.3.1: both parts were form-urlencoded before base64.
        client_id, secret = unquote_plus(raw_id), unquote_plus(raw_secret)
        if form.get("client_id", client_id) != client_id:
            raise _OAuthError("invalid_request", "client_id in the body differs from the Basic credentials")
        return _Presented(client_id, "basic", secret=secret)
    if "client_secret" in form:
        return _Presented(form.get("client_id"), "post", secret=form["client_secret"])
    if peer_certificate is not None and form.get("client_id"):
        return _Presented(form["client_id"], "tls_client_auth")
    return _Presented(form.get("client_id"), None)


def _assertion_credentials(form: Mapping[str, str]) -> _Presented:
    if form.get("client_assertion_type") != CLIENT_ASSERTION_TYPE:
        raise _OAuthError("invalid_request", f"client_assertion_type must be {CLIENT_ASSERTION_TYPE}")
    assertion = form.get("client_assertion", "")
    try:
        header = jwt.get_unverified_header(assertion)
        claims = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        raise _OAuthError("invalid_client", "the client assertion is not a JWT", 401) from None
    algorithm = header.get("alg")
    if algorithm in _HMAC_ALGORITHMS:
        method: AuthMethod = "client_secret_jwt"
    elif algorithm in _SIGNATURE_ALGORITHMS:
        method = "private_key_jwt"
    else:
        raise _OAuthError("invalid_client", "the client assertion's alg is not supported", 401)
    subject = claims.get("sub")
    client_id = form.get("client_id") or (subject if isinstance(subject, str) else None)
    if form.get("client_id") is not None and subject != form["client_id"]:
        raise _OAuthError("invalid_client", "client_id differs from the client assertion's sub", 401)
    return _Presented(client_id, method, assertion=assertion, assertion_header=dict(header),
                      assertion_claims=dict(claims))


def _scope_param(form: Mapping[str, str]) -> str | None:
    scope = form.get("scope")
    if scope is None or not scope.strip():
        return None
    return " ".join(scope.split())


def _fault_reply(fault: Fault, knobs: Knobs, base_url: str, request_body: bytes) -> _Reply:
    """A deliberately broken answer."""
    token = secrets.token_urlsafe(32)
    no_store = {"Cache-Control": "no-store"}
    lifetime = knobs.lifetime_seconds
    match fault:
        case "500":
            return _Reply(500, b"Internal Server Error\n", "text/plain;charset=UTF-8")
        case "503":
            return _Reply.json(503, {"error": "temporarily_unavailable"}, headers={"Retry-After": "1"},
                               error="temporarily_unavailable")
        case "429":
            return _Reply(429, b"Too Many Requests\n", "text/plain;charset=UTF-8",
                          headers={"Retry-After": "1"})
        case "bad_json":
            body = ('{"access_token": "' + token + '", "token_type": "Bearer", "expires_in": ').encode()
            return _Reply(200, body, headers=no_store, access_token=token)
        case "html":
            body = b"<!doctype html><html><body><h1>Sign in</h1><form></form></body></html>\n"
            return _Reply(200, body, "text/html;charset=UTF-8")
        case "missing_access_token":
            return _Reply.json(200, {"token_type": "Bearer", "expires_in": lifetime}, headers=no_store)
        case "missing_token_type":
            return _Reply.json(200, {"access_token": token, "expires_in": lifetime}, headers=no_store,
                               access_token=token)
        case "invalid_client" | "invalid_grant" | "invalid_scope":
            status = 401 if fault == "invalid_client" else 400
            return _OAuthError(fault, f"simulated {fault}", status).reply()
        case "redirect":
            return _Reply(302, b"", "text/plain", headers={"Location": base_url + "/login"})
        case "empty_body":
            return _Reply(200, b"", headers=no_store)
        case "echo_request":
            # Like servers that quote the request in their error text: secrets must not leak through it.
            echoed = request_body.decode("ascii", "replace")
            return _OAuthError("invalid_request", f"cannot handle {echoed}").reply()


# -- HTTP plumbing ---------------------------------------------------------------------------------------


class _HTTPServer(LoopbackHTTPServer):
    def __init__(self, address: tuple[str, int], app: TokenServer,
                 ssl_context: ssl.SSLContext | None) -> None:
        self.app = app
        super().__init__(address, _Handler, ssl_context)


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"  # keep-alive, like real token servers
    server_version = "secured-endpoint-devenv-tokenserver"
    timeout = 30  # idle keep-alive connections do not pin a thread forever

    def setup(self) -> None:
        self.request.settimeout(self.timeout)
        self.peer_certificate: bytes | None = None
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()
            self.peer_certificate = self.request.getpeercert(binary_form=True)
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: tests and the demo print what matters themselves."""

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        length_header = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") is not None:
            self._send(_Reply(HTTPStatus.LENGTH_REQUIRED), close=True)
            return
        try:
            length = int(length_header or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= _MAX_REQUEST_BYTES:
            self._send(_Reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE), close=True)
            return
        body = self.rfile.read(length) if length else b""
        reply = self.server.app._dispatch(method, urlsplit(self.path).path, self.headers, body,
                                          self.server.closing.wait, self.peer_certificate)
        if reply is None:
            self.close_connection = True
            return
        self._send(reply)

    def _send(self, reply: _Reply, *, close: bool = False) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(reply.body)


# -- command line ----------------------------------------------------------------------------------------


def _pair(text: str) -> tuple[str, str]:
    name, colon, secret = text.partition(":")
    if not colon or not name:
        raise argparse.ArgumentTypeError("expected NAME:SECRET")
    return name, secret


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m secured_endpoint_devenv.tokenserver",
        description="An OAuth 2.0 token server for development and demos (never for production).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    parser.add_argument("--tls", action="store_true", help="serve https with a freshly generated CA")
    parser.add_argument("--tls-host", action="append", default=[], metavar="NAME",
                        help="extra DNS name or IP for the server certificate (repeatable)")
    parser.add_argument("--ca-out", type=Path, metavar="PATH", help="write the CA certificate (PEM) here")
    parser.add_argument("--client", action="append", type=_pair, default=[], metavar="ID:SECRET",
                        help="register a client (repeatable; the id cannot contain ':')")
    parser.add_argument("--user", action="append", type=_pair, default=[], metavar="NAME:PASSWORD",
                        help="register a resource owner for the password grant (repeatable)")
    parser.add_argument("--lifetime", type=int, default=3600, help="token lifetime in seconds")
    parser.add_argument("--token-format", choices=get_args(TokenFormat), default="opaque")
    parser.add_argument("--no-refresh-tokens", action="store_true",
                        help="do not issue refresh tokens for the password grant")
    args = parser.parse_args(argv)
    if args.ca_out is not None and not args.tls:
        parser.error("--ca-out needs --tls")

    server = TokenServer(tls=args.tls, host=args.host, port=args.port, tls_hosts=args.tls_host)
    try:
        server.configure(lifetime_seconds=args.lifetime, token_format=args.token_format,
                         issue_refresh_tokens=not args.no_refresh_tokens)
    except ValueError as exc:
        parser.error(str(exc))
    for client_id, secret in args.client:
        server.add_client(client_id, secret)
    for username, password in args.user:
        server.add_user(username, password)

    stopped = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopped.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with server:
        if args.ca_out is not None:
            args.ca_out.write_bytes(server.ca_pem)
        print(f"token server listening on {server.url} (token endpoint {server.token_url})", flush=True)
        while not stopped.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

