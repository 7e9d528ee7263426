"""Trust stores in the formats people have: a PEM bundle, a PKCS#12 file, a Java keystore (JKS/JCEKS).

``to_pem_bundle`` turns any of them into the PEM bundle the token client takes, keeping only certificates
that are valid now, and explains in a TrustStoreInvalidError why a store cannot be used: wrong password,
no certificate, every certificate expired, a format that is not what the spec says. Messages never contain
the password.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from pydantic import SecretStr

from secured_endpoint import api
from secured_endpoint.tokens.errors import TrustStoreInvalidError

_JKS_MAGIC = b"\xfe\xed\xfe\xed"
_JCEKS_MAGIC = b"\xce\xce\xce\xce"
_PASSWORD_FIELD = "spec.trustStore.passwordKey"


Format = api.TrustStoreFormat  # the spec's enum: one list of formats


def detect_format(data: bytes) -> Format | None:
    """PEM text, a JKS/JCEKS magic number, or DER that starts like PKCS#12 (a SEQUENCE); else None."""
    if data[:4] in (_JKS_MAGIC, _JCEKS_MAGIC):
        return Format.JKS
    if b"-----BEGIN" in data[:4096]:
        return Format.PEM
    if data[:1] == b"\x30":
        return Format.PKCS12
    return None


_NAMES = {Format.PEM: "a PEM bundle", Format.PKCS12: "a PKCS#12 keystore", Format.JKS: "a JKS keystore"}


def to_pem_bundle(data: bytes, *, format: str | None = None, password: SecretStr | None = None,
                  now: dt.datetime | None = None) -> bytes:
    """The certificates of the store that are valid at ``now``, as one PEM bundle."""
    detected = detect_format(data)
    wanted = Format(format) if format is not None else detected
    if detected is None or wanted is None:
        raise TrustStoreInvalidError("is neither a PEM bundle nor a PKCS#12 or JKS keystore")
    if wanted is not detected:
        hint = " (keytool writes PKCS#12 unless given -storetype JKS)" if detected is Format.PKCS12 else ""
        raise TrustStoreInvalidError(
            f"holds {_NAMES[detected]}, not {_NAMES[wanted]}{hint}: set spec.trustStore.format to "
            f"{detected.value} or leave it unset")
    if wanted is Format.PEM:
        if password is not None:
            raise TrustStoreInvalidError(f"is a PEM bundle, which has no password ({_PASSWORD_FIELD})")
        certificates = _from_pem(data)
    elif wanted is Format.PKCS12:
        certificates = _from_pkcs12(data, password)
    else:
        certificates = _from_jks(data, password)
    return _valid_bundle(certificates, now or dt.datetime.now(dt.UTC))


def _from_pem(data: bytes) -> list[x509.Certificate]:
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise TrustStoreInvalidError("holds no PEM certificate")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TrustStoreInvalidError("holds a PEM certificate that cannot be parsed") from None


def _from_pkcs12(data: bytes, password: SecretStr | None) -> list[x509.Certificate]:
    # Without a password: an unprotected file, or one protected with the empty password (both exist).
    attempts = [password.get_secret_value().encode()] if password is not None else [None, b""]
    for attempt in attempts:
        try:
            store = pkcs12.load_pkcs12(data, attempt)
        except ValueError:
            continue
        certificates = [item.certificate for item in store.additional_certs]
        if store.cert is not None:
            certificates.insert(0, store.cert.certificate)
        return certificates
    if password is None:
        raise TrustStoreInvalidError(f"is a password-protected PKCS#12 file, or corrupt: set {_PASSWORD_FIELD}")
    raise TrustStoreInvalidError(f"wrong password or corrupt file ({_PASSWORD_FIELD})")


def _from_jks(data: bytes, password: SecretStr | None) -> list[x509.Certificate]:
    import jks  # pyjks; imported here, as only JKS trust stores need it

    if password is None:
        raise TrustStoreInvalidError(f"is a JKS keystore, which is read with its password: set {_PASSWORD_FIELD}")
    try:
        store = jks.KeyStore.loads(data, password.get_secret_value(), try_decrypt_keys=False)
    except jks.KeystoreSignatureException:
        raise TrustStoreInvalidError(f"wrong password or corrupt file ({_PASSWORD_FIELD})") from None
    except Exception:  # pyjks raises assorted errors (struct, EOF, its own) for a damaged file
        raise TrustStoreInvalidError("is not a readable JKS keystore (corrupt or truncated)") from None
    certificates: list[x509.Certificate] = []
    skipped = 0
    for entry in store.certs.values():  # trusted certificate entries: what Java's trust managers use
        if entry.type != "X.509":
            skipped += 1
            continue
        try:
            certificates.append(x509.load_der_x509_certificate(entry.cert))
        except ValueError:
            skipped += 1
    if not certificates and (store.private_keys or store.secret_keys or skipped):
        raise TrustStoreInvalidError("holds no trusted certificate entry (only keys, or unreadable entries)")
    return certificates


def _valid_bundle(certificates: Sequence[x509.Certificate], now: dt.datetime) -> bytes:
    unique = list({cert.fingerprint(hashes.SHA256()): cert for cert in certificates}.values())
    if not unique:
        raise TrustStoreInvalidError("holds no certificate")
    valid = [cert for cert in unique if cert.not_valid_before_utc <= now < cert.not_valid_after_utc]
    if not valid:
        expired = [cert for cert in unique if cert.not_valid_after_utc <= now]
        future = [cert for cert in unique if cert.not_valid_before_utc > now]
        count = len(unique)
        if expired and not future:
            newest = max(cert.not_valid_after_utc for cert in expired)
            every = "the certificate" if count == 1 else f"all {count} certificates"
            raise TrustStoreInvalidError(f"{every} expired; the newest on {_day(newest)}")
        if future and not expired:
            soonest = min(cert.not_valid_before_utc for cert in future)
            every = "the certificate is" if count == 1 else f"all {count} certificates are"
            raise TrustStoreInvalidError(f"{every} not yet valid; the first from {_day(soonest)}")
        raise TrustStoreInvalidError(f"holds no certificate valid now: {len(expired)} expired, "
                                     f"{len(future)} not yet valid")
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in valid)


def _day(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
