"""The client's own key material: RFC 7523 client assertions (PrivateKeyJWT, ClientSecretJWT) and the RFC 8705
client certificate (TLSClientAuth, or mutual TLS with any method).

Everything here is parsed and checked when the request is assembled, so a key that cannot work is reported
as ``ClientKeyInvalid`` with a message that says why — never with the key — instead of as a refusal by the
token server. Keys live in frozen dataclasses whose ``repr()`` hides them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import secrets
import shutil
import ssl
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from pydantic import SecretBytes, SecretStr

from secured_endpoint.tokens.errors import ClientKeyInvalidError

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGORITHMS = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
_EC_DEFAULTS = {curve: algorithm for algorithm, curve in _EC_ALGORITHMS.items()}
# RFC 7518 §3.2: an HMAC key at least as long as the hash output.
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
_MIN_RSA_BITS = 2048  # RFC 7518 §3.3

AssertionKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | SecretStr


def load_private_key(pem: bytes) -> PrivateKeyTypes:
    """An unencrypted PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC), or ClientKeyInvalidError."""
    if b"-----BEGIN" not in pem or b"PRIVATE KEY-----" not in pem:
        raise ClientKeyInvalidError("holds no PEM private key")
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise ClientKeyInvalidError(
            "holds an encrypted private key; store it unencrypted (the Secret is its protection)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ClientKeyInvalidError("holds a private key that cannot be parsed") from None


@dataclass(frozen=True)
class ClientAssertion:
    """How to make RFC 7523 client assertions. ``create()`` makes a fresh one (new jti) every time."""

    algorithm: str
    key: AssertionKey = field(repr=False)
    key_id: str | None = None
    lifetime_seconds: int = 60
    # The aud claim; None: the token URL (RFC 7523 §3).
    audience: str | None = None

    @property
    def is_hmac(self) -> bool:
        return isinstance(self.key, SecretStr)

    @classmethod
    def from_private_key_pem(cls, pem: bytes, *, algorithm: str | None = None, key_id: str | None = None,
                             lifetime_seconds: int = 60, audience: str | None = None) -> ClientAssertion:
        """PrivateKeyJWT. ``algorithm`` None: RS256 for RSA keys, ES256/ES384/ES512 by the EC key's curve."""
        key = load_private_key(pem)
        if isinstance(key, rsa.RSAPrivateKey):
            if key.key_size < _MIN_RSA_BITS:
                raise ClientKeyInvalidError(
                    f"holds a {key.key_size}-bit RSA key; JWT signatures need at least {_MIN_RSA_BITS} bits")
            chosen = algorithm or "RS256"
            if chosen not in _RSA_ALGORITHMS:
                raise ClientKeyInvalidError(f"holds an RSA key, which cannot sign {chosen} (use RS256 or PS256)")
        elif isinstance(key, ec.EllipticCurvePrivateKey):
            curve = key.curve.name
            default = _EC_DEFAULTS.get(curve)
            if default is None:
                raise ClientKeyInvalidError(f"holds an EC key on curve {curve}; JWTs use P-256, P-384 or P-521")
            chosen = algorithm or default
            if _EC_ALGORITHMS.get(chosen) != curve:
                raise ClientKeyInvalidError(f"holds an EC key on curve {curve}, which signs {default}, "
                                            f"not {chosen}")
        else:
            raise ClientKeyInvalidError(
                f"holds a {_key_kind(key)} key; PrivateKeyJWT signs with an RSA or EC key")
        return cls(algorithm=chosen, key=key, key_id=key_id, lifetime_seconds=lifetime_seconds,
                   audience=audience)

    @classmethod
    def from_client_secret(cls, secret: SecretStr, *, algorithm: str | None = None, key_id: str | None = None,
                           lifetime_seconds: int = 60, audience: str | None = None) -> ClientAssertion:
        """ClientSecretJWT: HMAC with the client secret (HS256 unless told otherwise)."""
        chosen = algorithm or "HS256"
        minimum = _HMAC_MIN_BYTES.get(chosen)
        if minimum is None:
            raise ClientKeyInvalidError(f"ClientSecretJWT signs with HS256, HS384 or HS512, not {chosen}")
        length = len(secret.get_secret_value().encode())
        if length < minimum:
            raise ClientKeyInvalidError(
                f"the client secret is {length} bytes; {chosen} needs at least {minimum} (RFC 7518 §3.2)")
        return cls(algorithm=chosen, key=secret, key_id=key_id, lifetime_seconds=lifetime_seconds,
                   audience=audience)

    def create(self, client_id: str, token_url: str, *, now: float | None = None) -> str:
        """A signed assertion: iss = sub = client id, aud, a random jti, iat, exp = iat + lifetime."""
        issued_at = int(time.time() if now is None else now)
        claims: dict[str, Any] = {
            "iss": client_id, "sub": client_id, "aud": self.audience or token_url,
            "jti": secrets.token_urlsafe(24), "iat": issued_at, "exp": issued_at + self.lifetime_seconds,
        }
        headers = {"kid": self.key_id} if self.key_id else None
        key = self.key.get_secret_value() if isinstance(self.key, SecretStr) else self.key
        return jwt.encode(claims, key, algorithm=self.algorithm, headers=headers)


def _key_kind(key: object) -> str:
    name = type(key).__name__.removeprefix("_").removesuffix("PrivateKey")
    return name or "unsupported"


# -- the client certificate ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientCertificate:
    """A client certificate (then its chain) and its private key, checked to belong together and to be
    valid now. ``identity`` tells identities apart (it keys the connection pool) without revealing the key."""

    certificate_pem: bytes = field(repr=False)
    private_key_pem: SecretBytes
    fingerprint: str  # "sha256:<hex>" of the leaf certificate's DER
    subject: str
    not_after: dt.datetime
    identity: str = field(repr=False)

    @classmethod
    def load(cls, certificate_pem: bytes, private_key_pem: bytes, *,
             now: dt.datetime | None = None) -> ClientCertificate:
        """Raises ClientKeyInvalidError whose message starts with the part at fault (``tls.crt``/``tls.key``)."""
        if b"-----BEGIN CERTIFICATE-----" not in certificate_pem:
            raise ClientKeyInvalidError("tls.crt holds no PEM certificate")
        try:
            chain = x509.load_pem_x509_certificates(certificate_pem)
        except ValueError:
            raise ClientKeyInvalidError("tls.crt holds a certificate that cannot be parsed") from None
        try:
            key = load_private_key(private_key_pem)
        except ClientKeyInvalidError as exc:
            raise ClientKeyInvalidError(f"tls.key {exc.message}") from None
        leaf = chain[0]
        if not _same_public_key(leaf, key):
            raise ClientKeyInvalidError("tls.key does not belong to the certificate in tls.crt")
        moment = now or dt.datetime.now(dt.UTC)
        if leaf.not_valid_after_utc <= moment:
            raise ClientKeyInvalidError(
                f"the client certificate in tls.crt expired on {leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}")
        if leaf.not_valid_before_utc > moment:
            raise ClientKeyInvalidError("the client certificate in tls.crt is not valid before "
                                        f"{leaf.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}")
        normalized_chain = b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in chain)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return cls(
            certificate_pem=normalized_chain,
            private_key_pem=SecretBytes(key_pem),
            fingerprint="sha256:" + leaf.fingerprint(hashes.SHA256()).hex(),
            subject=leaf.subject.rfc4514_string(),
            not_after=leaf.not_valid_after_utc,
            identity=hashlib.sha256(normalized_chain + b"\0" + key_pem).hexdigest(),
        )

    def load_into(self, context: ssl.SSLContext) -> None:
        """Present this certificate in ``context``'s handshakes.

        Python's ssl module loads a certificate chain from files only (``SSLContext.load_cert_chain``; there
        is no in-memory variant). So the chain and the key are written to anonymous in-memory files
        (``memfd_create``: on no file system, gone when closed) that OpenSSL opens through
        ``/proc/self/fd``. Where that does not exist, they go into files of mode 0600 in a fresh private
        directory (``tempfile.mkdtemp``, mode 0700, on ``/dev/shm`` when there is one), deleted right after
        loading. Either way the key is on no disk and readable by no other user, for milliseconds.
        """
        with _private_files(self.certificate_pem, self.private_key_pem.get_secret_value()) as (cert, key):
            try:
                context.load_cert_chain(cert, key)
            except ssl.SSLError:
                raise ClientKeyInvalidError("tls.crt and tls.key cannot be loaded for TLS") from None


def _same_public_key(certificate: x509.Certificate, key: PrivateKeyTypes) -> bool:
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    try:
        return certificate.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)
    except (ValueError, UnsupportedAlgorithm):
        return False


@contextlib.contextmanager
def _private_files(*contents: bytes) -> Iterator[list[str]]:
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        descriptors: list[int] = []
        try:
            for content in contents:
                fd = os.memfd_create("secured-endpoint-client-identity", os.MFD_CLOEXEC)
                descriptors.append(fd)
                _write_all(fd, content)
            yield [f"/proc/self/fd/{fd}" for fd in descriptors]
        finally:
            for fd in descriptors:
                os.close(fd)
        return
    shm = Path("/dev/shm")  # noqa: S108 - only as the parent of mkdtemp's private 0700 directory
    directory = tempfile.mkdtemp(prefix="sep-identity-",
                                 dir=str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None)
    try:
        paths = []
        for index, content in enumerate(contents):
            path = os.path.join(directory, f"part{index}.pem")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _write_all(fd, content)
            finally:
                os.close(fd)
            paths.append(path)
        yield paths
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _write_all(fd: int, content: bytes) -> None:
    view = memoryview(content)
    while view:
        written = os.write(fd, view)
        view = view[written:]
