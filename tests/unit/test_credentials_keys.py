"""``credentials.load`` for the new key material, against an in-memory stand-in for the Kubernetes API.

Cases:
- PrivateKeyJWT reads the signing key (default key ``tls.key``), ClientSecretJWT the secret, TLSClientAuth
  the kubernetes.io/tls Secret; PrivateKeyJWT and TLSClientAuth need no client secret in the Secret;
- a bad key or certificate → ClientKeyInvalid naming the Secret, the key and the spec field, never the key;
- trust stores: PKCS#12 and JKS with passwordKey from the same Secret, binaryData in a ConfigMap; wrong
  password, expired CA, missing password key → the right reason and a message naming the field;
- proxy credentials become the request's proxy; every Secret read is in ``source_versions``.
"""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any

import jks
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12

from secured_endpoint import api, credentials
from secured_endpoint_devenv.tokenserver import generate_ca

PASSWORD = "store-pass-5e2a"


class FakeKube:
    """``get_secret``/``get_configmap`` as the operator's KubeClient answers them."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}

    def secret(self, name: str, values: dict[str, bytes | str]) -> None:
        data = {key: base64.b64encode(value.encode() if isinstance(value, str) else value).decode()
                for key, value in values.items()}
        self.objects[("Secret", name)] = {"kind": "Secret", "metadata": {"name": name, "resourceVersion": "7"},
                                          "data": data}

    def configmap(self, name: str, *, data: dict[str, str] | None = None,
                  binary: dict[str, bytes] | None = None) -> None:
        self.objects[("ConfigMap", name)] = {
            "kind": "ConfigMap", "metadata": {"name": name, "resourceVersion": "9"}, "data": data or {},
            "binaryData": {key: base64.b64encode(value).decode() for key, value in (binary or {}).items()}}

    async def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects.get(("Secret", name))

    async def get_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects.get(("ConfigMap", name))


def key_pem(key: Any) -> bytes:
    data: bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    return data


async def load(kube: FakeKube, **spec: Any) -> credentials.LoadedCredentials:
    raw = {"tokenUrl": "https://idp.example/token", "clientSecretRef": {"name": "oauth"}, **spec}
    reader = credentials.SourceReader(kube, lambda namespace, ref: None)  # type: ignore[arg-type]
    return await credentials.load(reader, "ns", api.parse_spec(raw))


async def failure(kube: FakeKube, **spec: Any) -> credentials.CredentialsError:
    with pytest.raises(credentials.CredentialsError) as caught:
        await load(kube, **spec)
    assert "PRIVATE KEY" not in caught.value.message
    assert PASSWORD not in caught.value.message
    return caught.value


@pytest.fixture
def kube() -> FakeKube:
    fake = FakeKube()
    fake.secret("oauth", {"client_id": "orders"})  # no client secret: not needed by the key-based methods
    return fake


async def test_private_key_jwt_reads_the_signing_key(kube: FakeKube) -> None:
    kube.secret("signing", {"tls.key": key_pem(ec.generate_private_key(ec.SECP384R1()))})
    loaded = await load(kube, clientAuthMethod="PrivateKeyJWT",
                        clientAssertion={"privateKeySecretRef": {"name": "signing"}, "keyId": "k1"})
    assertion = loaded.request.client_assertion
    assert assertion is not None
    assert (assertion.algorithm, assertion.key_id, assertion.lifetime_seconds) == ("ES384", "k1", 60)
    assert loaded.request.client_secret is None
    assert loaded.source_versions == {"Secret/oauth": "7", "Secret/signing": "7"}


async def test_a_bad_signing_key_is_client_key_invalid(kube: FakeKube) -> None:
    kube.secret("signing", {"private_key": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"})
    error = await failure(kube, clientAuthMethod="PrivateKeyJWT",
                          clientAssertion={"privateKeySecretRef": {"name": "signing", "key": "private_key"}})
    assert error.reason is api.Reason.CLIENT_KEY_INVALID
    assert error.message == ("Secret/signing key 'private_key': holds a private key that cannot be parsed "
                             "(spec.clientAssertion.privateKeySecretRef)")
    missing = await failure(kube, clientAuthMethod="PrivateKeyJWT",
                            clientAssertion={"privateKeySecretRef": {"name": "signing"}})
    assert missing.reason is api.Reason.CREDENTIALS_NOT_FOUND
    assert missing.message == "Secret/signing has no key 'tls.key' (spec.clientAssertion.privateKeySecretRef.key)"


async def test_client_secret_jwt_needs_a_long_enough_secret(kube: FakeKube) -> None:
    kube.secret("oauth", {"client_id": "orders", "client_secret": "short-secret"})
    error = await failure(kube, clientAuthMethod="ClientSecretJWT")
    assert error.reason is api.Reason.CLIENT_KEY_INVALID
    assert error.message == ("Secret/oauth key 'client_secret': the client secret is 12 bytes; HS256 needs at "
                             "least 32 (RFC 7518 §3.2) (spec.clientAuthMethod: ClientSecretJWT)")
    kube.secret("oauth", {"client_id": "orders", "client_secret": "s" * 64})
    loaded = await load(kube, clientAuthMethod="ClientSecretJWT", clientAssertion={"algorithm": "HS512"})
    assert loaded.request.client_assertion is not None
    assert loaded.request.client_assertion.algorithm == "HS512"


async def test_tls_client_auth_reads_a_tls_secret(kube: FakeKube) -> None:
    cert, key = generate_ca().issue_client_certificate("orders")
    kube.secret("client-cert", {"tls.crt": cert, "tls.key": key})
    loaded = await load(kube, clientAuthMethod="TLSClientAuth", clientCertificateSecretRef={"name": "client-cert"})
    assert loaded.request.client_certificate is not None
    assert loaded.request.client_certificate.subject == "CN=orders"
    assert "Secret/client-cert" in loaded.source_versions


async def test_a_bad_client_certificate_is_client_key_invalid(kube: FakeKube) -> None:
    ca = generate_ca()
    cert, _ = ca.issue_client_certificate("orders")
    _, other_key = ca.issue_client_certificate("other")
    kube.secret("client-cert", {"tls.crt": cert, "tls.key": other_key})
    error = await failure(kube, clientAuthMethod="TLSClientAuth", clientCertificateSecretRef={"name": "client-cert"})
    assert error.reason is api.Reason.CLIENT_KEY_INVALID
    assert error.message == ("Secret/client-cert: tls.key does not belong to the certificate in tls.crt "
                             "(spec.clientCertificateSecretRef)")
    kube.secret("client-cert", {"tls.crt": cert})
    error = await failure(kube, clientAuthMethod="TLSClientAuth", clientCertificateSecretRef={"name": "client-cert"})
    assert error.reason is api.Reason.CREDENTIALS_NOT_FOUND
    assert error.message == "Secret/client-cert has no key 'tls.key' (spec.clientCertificateSecretRef)"


async def test_pkcs12_and_jks_trust_stores_with_a_password(kube: FakeKube) -> None:
    ca = generate_ca("idp CA")
    p12 = pkcs12.serialize_key_and_certificates(None, None, None, [ca.cert],
                                                serialization.BestAvailableEncryption(PASSWORD.encode()))
    store = jks.KeyStore.new("jks", [jks.TrustedCertEntry.new(
        "idp", ca.cert.public_bytes(serialization.Encoding.DER))]).saves(PASSWORD)
    kube.secret("oauth", {"client_id": "orders", "client_secret": "s3cret"})
    kube.secret("stores", {"ts.p12": p12, "ts.jks": store, "password": PASSWORD + "\n"})
    for key, store_format in (("ts.p12", "PKCS12"), ("ts.jks", "JKS"), ("ts.jks", None)):
        trust_store: dict[str, Any] = {"secretRef": {"name": "stores", "key": key}, "passwordKey": "password"}
        if store_format:
            trust_store["format"] = store_format
        loaded = await load(kube, trustStore=trust_store)
        assert loaded.request.trust_store_pem == ca.cert_pem


async def test_trust_store_failures_name_the_field(kube: FakeKube) -> None:
    now = dt.datetime.now(dt.UTC)
    expired = generate_ca("old", not_before=now - dt.timedelta(days=90), not_after=now - dt.timedelta(days=1))
    p12 = pkcs12.serialize_key_and_certificates(None, None, None, [expired.cert],
                                                serialization.BestAvailableEncryption(PASSWORD.encode()))
    kube.secret("oauth", {"client_id": "orders", "client_secret": "s3cret"})
    kube.secret("stores", {"ts.p12": p12, "password": PASSWORD, "wrong": "not-the-password"})
    kube.configmap("binary", binary={"ts.p12": p12})

    wrong = await failure(kube, trustStore={"secretRef": {"name": "stores", "key": "ts.p12"}, "passwordKey": "wrong"})
    assert wrong.reason is api.Reason.TRUST_STORE_INVALID
    assert wrong.message == ("Secret/stores key 'ts.p12': wrong password or corrupt file "
                             "(spec.trustStore.passwordKey)")
    old = await failure(kube, trustStore={"secretRef": {"name": "stores", "key": "ts.p12"}, "passwordKey": "password"})
    assert old.reason is api.Reason.TRUST_STORE_INVALID
    day = expired.cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert old.message == (f"Secret/stores key 'ts.p12': the certificate expired; the newest on {day} "
                           "(spec.trustStore.secretRef)")
    no_password = await failure(kube, trustStore={"configMapRef": {"name": "binary", "key": "ts.p12"}})
    assert no_password.reason is api.Reason.TRUST_STORE_INVALID
    assert no_password.message == ("ConfigMap/binary key 'ts.p12': is a password-protected PKCS#12 file, or "
                                   "corrupt: set spec.trustStore.passwordKey")
    missing = await failure(kube, trustStore={"secretRef": {"name": "stores", "key": "ts.p12"},
                                              "passwordKey": "nope"})
    assert missing.reason is api.Reason.CREDENTIALS_NOT_FOUND
    assert missing.message == "Secret/stores has no key 'nope' (spec.trustStore.passwordKey)"


async def test_the_proxy_with_credentials(kube: FakeKube) -> None:
    kube.secret("oauth", {"client_id": "orders", "client_secret": "s3cret"})
    kube.secret("proxy-login", {"username": "alice", "password": "proxy-pw-1\n"})
    loaded = await load(kube, proxy={"url": "http://proxy.corp:3128/",
                                     "credentialsSecretRef": {"name": "proxy-login"}})
    proxy = loaded.request.proxy
    assert proxy is not None
    assert (proxy.url, proxy.username, proxy.source) == ("http://proxy.corp:3128", "alice", "spec.proxy.url")
    assert proxy.password is not None
    assert proxy.password.get_secret_value() == "proxy-pw-1"
    assert "proxy-pw-1" not in repr(loaded.request)
    assert "proxy-pw-1" in loaded.request.secret_values()  # scrubbed from any error message
    assert "Secret/proxy-login" in loaded.source_versions


@pytest.mark.parametrize("url", ["http://user:pw@proxy:3128", "socks5://proxy:1080", "http://proxy:3128/path",
                                 "http://proxy:3128?x=1", "proxy:3128"])
def test_bad_proxy_urls_are_refused_by_the_model(url: str) -> None:
    with pytest.raises(api.SpecError, match=r"spec\.proxy"):
        api.parse_spec({"tokenUrl": "https://idp/token", "clientSecretRef": {"name": "o"}, "proxy": {"url": url}})


@pytest.mark.parametrize(("trust_store", "message"), [
    ({"configMapRef": {"name": "c", "key": "k"}, "passwordKey": "p"}, "passwordKey needs secretRef"),
    ({"secretRef": {"name": "s", "key": "k"}, "format": "PEM", "passwordKey": "p"}, "only allowed for the PKCS12"),
    ({"secretRef": {"name": "s", "key": "k"}, "format": "JKS"}, "a JKS trust store needs passwordKey"),
])
def test_trust_store_rules(trust_store: dict[str, Any], message: str) -> None:
    with pytest.raises(api.SpecError, match=message):
        api.parse_spec({"tokenUrl": "https://idp/token", "clientSecretRef": {"name": "o"}, "trustStore": trust_store})
