"""Trust stores in PEM, PKCS#12 and JKS become one PEM bundle of the certificates valid now.

Cases:
- PEM, PKCS#12 (with a password, without one, with the empty one; certificates with and without a key
  entry) and JKS/JCEKS (trusted certificate entries) turn into the same bundle, and that bundle verifies the
  real TLS token server;
- the format is detected when unset; a stated format that does not match is explained (keytool's PKCS#12
  default named);
- wrong password, corrupt or truncated file, no certificate, only expired (or not yet valid) certificates:
  TrustStoreInvalidError with a clear message that never holds the password; expired certificates among
  valid ones are dropped;
- files written by the JDK's keytool itself (when a JDK is installed).
"""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import jks
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from pydantic import SecretStr

from secured_endpoint import api
from secured_endpoint.tokens import TokenClient, TokenRequest, TrustStoreInvalidError, to_pem_bundle
from secured_endpoint.tokens.truststore import Format, detect_format
from secured_endpoint_devenv.tokenserver import CertificateAuthority, TokenServer, generate_ca

PASSWORD = "store-pass-7d1e"
NOW = dt.datetime.now(dt.UTC)


def der(ca: CertificateAuthority) -> bytes:
    return ca.cert.public_bytes(serialization.Encoding.DER)


def pkcs12_of(*cas: CertificateAuthority, password: str | None = PASSWORD) -> bytes:
    encryption = (serialization.BestAvailableEncryption(password.encode()) if password
                  else serialization.NoEncryption())
    return pkcs12.serialize_key_and_certificates(None, None, None, [ca.cert for ca in cas], encryption)


def jks_of(*cas: CertificateAuthority, password: str = PASSWORD) -> bytes:
    entries = [jks.TrustedCertEntry.new(f"ca{index}", der(ca)) for index, ca in enumerate(cas)]
    data: bytes = jks.KeyStore.new("jks", entries).saves(password)
    return data


def subjects(bundle: bytes) -> set[str]:
    return {cert.subject.rfc4514_string() for cert in x509.load_pem_x509_certificates(bundle)}


@pytest.fixture(scope="module")
def cas() -> tuple[CertificateAuthority, CertificateAuthority]:
    return generate_ca("first CA"), generate_ca("second CA")


@pytest.fixture(scope="module")
def expired() -> CertificateAuthority:
    return generate_ca("expired CA", not_before=NOW - dt.timedelta(days=400), not_after=NOW - dt.timedelta(days=35))


@pytest.fixture
def tls_server() -> Iterator[TokenServer]:
    with TokenServer(tls=True) as running:
        running.add_client("orders", "orders-secret")
        yield running


# -- every format -> the same bundle ----------------------------------------------------------------------


def test_each_format_gives_the_same_certificates(cas: tuple[CertificateAuthority, ...]) -> None:
    pem = b"".join(ca.cert_pem for ca in cas)
    expected = {"CN=first CA", "CN=second CA"}
    assert subjects(to_pem_bundle(pem)) == expected
    assert subjects(to_pem_bundle(pkcs12_of(*cas), password=SecretStr(PASSWORD))) == expected
    assert subjects(to_pem_bundle(jks_of(*cas), password=SecretStr(PASSWORD))) == expected
    assert subjects(to_pem_bundle(pkcs12_of(*cas, password=None))) == expected  # no password at all
    assert subjects(to_pem_bundle(pkcs12_of(*cas), format="PKCS12", password=SecretStr(PASSWORD))) == expected


def test_a_pkcs12_identity_store_trusts_its_certificates(cas: tuple[CertificateAuthority, ...]) -> None:
    """A PKCS#12 with a key entry: its certificate and the extra ones are all trust anchors."""
    first, second = cas
    data = pkcs12.serialize_key_and_certificates(
        b"ca", first.key, first.cert, [second.cert], serialization.BestAvailableEncryption(PASSWORD.encode()))
    assert subjects(to_pem_bundle(data, password=SecretStr(PASSWORD))) == {"CN=first CA", "CN=second CA"}


@pytest.mark.parametrize("kind", ["PEM", "PKCS12", "JKS"])
async def test_the_bundle_verifies_the_token_server(tls_server: TokenServer, kind: str) -> None:
    server_ca = x509.load_pem_x509_certificate(tls_server.ca_pem)
    holder = CertificateAuthority(cert=server_ca, key=generate_ca().key)  # only the certificate is used
    data = {"PEM": tls_server.ca_pem, "PKCS12": pkcs12_of(holder, generate_ca("unrelated")),
            "JKS": jks_of(generate_ca("unrelated"), holder)}[kind]
    password = None if kind == "PEM" else SecretStr(PASSWORD)
    bundle = to_pem_bundle(data, password=password)
    async with TokenClient(timeout=3, connect_timeout=2, trust_env=False) as client:
        await client.fetch(TokenRequest(
            token_url=tls_server.token_url, grant_type=api.GrantType.CLIENT_CREDENTIALS,
            client_auth_method=api.ClientAuthMethod.CLIENT_SECRET_BASIC, client_id="orders",
            client_secret=SecretStr("orders-secret"), trust_store_pem=bundle))
    assert tls_server.requests[-1].status == 200


def test_detection(cas: tuple[CertificateAuthority, ...]) -> None:
    assert detect_format(cas[0].cert_pem) is Format.PEM
    assert detect_format(b"# our CA\n" + cas[0].cert_pem) is Format.PEM
    assert detect_format(pkcs12_of(*cas)) is Format.PKCS12
    assert detect_format(jks_of(*cas)) is Format.JKS
    assert detect_format(b"\xce\xce\xce\xce" + bytes(40)) is Format.JKS  # JCEKS (written by keytool below)
    assert detect_format(b"hello") is None


# -- what goes wrong, and how it is said ------------------------------------------------------------------


def invalid(data: bytes, **options: object) -> str:
    with pytest.raises(TrustStoreInvalidError) as caught:
        to_pem_bundle(data, **options)  # type: ignore[arg-type]
    message = str(caught.value)
    assert PASSWORD not in message
    assert "wrong-password" not in message
    return message


def test_wrong_password(cas: tuple[CertificateAuthority, ...]) -> None:
    wrong = SecretStr("wrong-password")
    assert invalid(pkcs12_of(*cas), password=wrong) == \
        "wrong password or corrupt file (spec.trustStore.passwordKey)"
    assert invalid(jks_of(*cas), password=wrong) == "wrong password or corrupt file (spec.trustStore.passwordKey)"


def test_a_missing_password_is_explained(cas: tuple[CertificateAuthority, ...]) -> None:
    assert "set spec.trustStore.passwordKey" in invalid(pkcs12_of(*cas))
    assert "set spec.trustStore.passwordKey" in invalid(jks_of(*cas))
    assert "has no password" in invalid(cas[0].cert_pem, password=SecretStr(PASSWORD))


def test_corrupt_files(cas: tuple[CertificateAuthority, ...]) -> None:
    store = jks_of(*cas)
    assert "not a readable JKS keystore" in invalid(store[: len(store) // 2], password=SecretStr(PASSWORD))
    assert invalid(pkcs12_of(*cas)[:40], password=SecretStr(PASSWORD)).startswith("wrong password or corrupt")
    assert invalid(b"\x00\x01binary junk") == "is neither a PEM bundle nor a PKCS#12 or JKS keystore"
    assert invalid(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n") == \
        "holds a PEM certificate that cannot be parsed"


def test_no_certificate(cas: tuple[CertificateAuthority, ...]) -> None:
    assert invalid(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n") == "holds no PEM certificate"
    assert invalid(jks_of(), password=SecretStr(PASSWORD)) == "holds no certificate"


def test_format_mismatch_is_explained(cas: tuple[CertificateAuthority, ...]) -> None:
    message = invalid(pkcs12_of(*cas), format="JKS", password=SecretStr(PASSWORD))
    assert message == ("holds a PKCS#12 keystore, not a JKS keystore (keytool writes PKCS#12 unless given "
                       "-storetype JKS): set spec.trustStore.format to PKCS12 or leave it unset")
    assert "holds a JKS keystore, not a PEM bundle" in invalid(jks_of(*cas), format="PEM")


def test_every_certificate_expired(expired: CertificateAuthority) -> None:
    older = generate_ca("older", not_before=NOW - dt.timedelta(days=800), not_after=NOW - dt.timedelta(days=400))
    day = expired.cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert invalid(jks_of(expired, older), password=SecretStr(PASSWORD)) == \
        f"all 2 certificates expired; the newest on {day}"
    assert invalid(pkcs12_of(expired), password=SecretStr(PASSWORD)) == f"the certificate expired; the newest on {day}"
    assert invalid(expired.cert_pem).startswith("the certificate expired")


def test_not_yet_valid() -> None:
    future = generate_ca("future", not_before=NOW + dt.timedelta(days=2), not_after=NOW + dt.timedelta(days=900))
    assert invalid(future.cert_pem).startswith("the certificate is not yet valid; the first from ")


def test_expired_certificates_among_valid_ones_are_dropped(cas: tuple[CertificateAuthority, ...],
                                                           expired: CertificateAuthority) -> None:
    bundle = to_pem_bundle(jks_of(expired, *cas), password=SecretStr(PASSWORD))
    assert subjects(bundle) == {"CN=first CA", "CN=second CA"}
    assert subjects(to_pem_bundle(expired.cert_pem + cas[0].cert_pem)) == {"CN=first CA"}


def test_a_jks_with_only_a_key_entry_has_no_trusted_certificate() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    ca = generate_ca()
    key = ec.generate_private_key(ec.SECP256R1())
    key_der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    entry = jks.PrivateKeyEntry.new("server", [der(ca)], key_der, "pkcs8")
    entry.encrypt(PASSWORD)
    store = jks.KeyStore.new("jks", [entry]).saves(PASSWORD)
    assert invalid(store, password=SecretStr(PASSWORD)) == \
        "holds no trusted certificate entry (only keys, or unreadable entries)"


# -- what the JDK writes ----------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("keytool") is None, reason="no JDK keytool on this machine")
@pytest.mark.parametrize("store_type", ["JKS", "JCEKS", "PKCS12"])
def test_stores_written_by_keytool(tmp_path: Path, cas: tuple[CertificateAuthority, ...], store_type: str) -> None:
    store = tmp_path / "truststore"
    for index, ca in enumerate(cas):
        pem_file = tmp_path / f"ca{index}.pem"
        pem_file.write_bytes(ca.cert_pem)
        subprocess.run(["keytool", "-importcert", "-noprompt", "-alias", f"ca{index}", "-file", str(pem_file),
                        "-keystore", str(store), "-storetype", store_type, "-storepass", PASSWORD],
                       check=True, capture_output=True, timeout=60)
    data = store.read_bytes()
    assert detect_format(data) is Format("JKS" if store_type == "JCEKS" else store_type)
    assert subjects(to_pem_bundle(data, password=SecretStr(PASSWORD))) == {"CN=first CA", "CN=second CA"}
    assert invalid(data, password=SecretStr("wrong-password")).startswith("wrong password or corrupt file")
