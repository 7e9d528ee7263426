"""Client authentication without a shared secret on the wire, trust stores in Java's formats, and proxies —
end to end: a real control plane, the operator as its own process, the real token server and HTTP proxy.

Cases:
- PrivateKeyJWT with an RSA key (RS256 from the key type) and an EC key (ES256): the server verifies the
  assertion with the registered public key; ClientSecretJWT (HS256 with the client secret);
- TLSClientAuth against the TLS token server with a kubernetes.io/tls Secret; rotating that Secret, or
  the signing key Secret, fetches a new token at once with the new key; a key that cannot sign is
  ``ClientKeyInvalid`` naming the Secret and key, and mending it recovers;
- PKCS#12 and JKS trust stores: good → Ready; wrong password → TrustStoreInvalid naming passwordKey; every
  CA expired → TrustStoreInvalid with the date;
- spec.proxy (with credentials from a Secret) carries the token request through a CONNECT tunnel; a proxy
  that is down → TokenRequestFailed naming the proxy;
- the operator's environment (HTTPS_PROXY, NO_PROXY) for a second operator watching ``p-*``: token
  URLs not in NO_PROXY go through the proxy, the rest direct, and spec.proxy overrides the environment.

Every key, password and client assertion is added to ``secret_values`` for the session's leak scan.
"""

from __future__ import annotations

import base64
import datetime as dt
import uuid
from collections.abc import Iterator
from typing import Any

import jks
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509 import load_pem_x509_certificate
from kubernetes import client as k8s

from secured_endpoint import api
from secured_endpoint_devenv import controlplane
from secured_endpoint_devenv.proxy import HttpProxy
from secured_endpoint_devenv.tokenserver import CertificateAuthority, TokenServer, generate_ca
from tests.conftest import Kube, OperatorProcess, Setup, _namespace, _operator, wait_for

pytestmark = pytest.mark.e2e

STORE_PASSWORD_PREFIX = "store-pw-"


def private_pem(key: Any) -> str:
    data: bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    return data.decode()


def create_secret(setup: Setup, name: str, values: dict[str, bytes | str], *, secret_type: str = "Opaque") -> None:
    """A Secret with binary-safe values; every value goes to the leak scan's list."""
    data = {}
    for key, value in values.items():
        raw = value.encode() if isinstance(value, str) else value
        data[key] = base64.b64encode(raw).decode()
    setup.kube.core.create_namespaced_secret(setup.namespace, k8s.V1Secret(
        metadata=k8s.V1ObjectMeta(name=name), type=secret_type, data=data))


def replace_secret(setup: Setup, name: str, values: dict[str, bytes | str]) -> None:
    data = {key: base64.b64encode(value.encode() if isinstance(value, str) else value).decode()
            for key, value in values.items()}
    setup.kube.core.patch_namespaced_secret(name, setup.namespace, {"data": data})


def ca_configmap(setup: Setup, server: TokenServer, name: str = "idp-ca") -> dict[str, Any]:
    setup.kube.core.create_namespaced_config_map(setup.namespace, k8s.V1ConfigMap(
        metadata=k8s.V1ObjectMeta(name=name), data={"ca.crt": server.ca_pem.decode()}))
    return {"configMapRef": {"name": name, "key": "ca.crt"}}


def client_id_only(setup: Setup, name: str = "oauth") -> str:
    """The client's Secret with its id only: key-based methods need no client secret."""
    client_id = f"client-{uuid.uuid4().hex[:8]}"
    setup.kube.create_secret(setup.namespace, name, {"client_id": client_id})
    return client_id


def remember_assertions(server: TokenServer, secret_values: set[str]) -> None:
    secret_values.update(seen.form["client_assertion"] for seen in server.requests if "client_assertion" in seen.form)


def token(kube: Kube, namespace: str, name: str) -> str | None:
    data = kube.secret_data(namespace, f"{name}-token")
    return data["access_token"] if data else None


# -- client assertions -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("key_type", "algorithm"), [("rsa", "RS256"), ("ec", "ES256")])
def test_private_key_jwt(operator: OperatorProcess, kube: Kube, setup: Setup, token_server: TokenServer,
                         secret_values: set[str], key_type: str, algorithm: str) -> None:
    key: Any = (rsa.generate_private_key(public_exponent=65537, key_size=2048) if key_type == "rsa"
                else ec.generate_private_key(ec.SECP256R1()))
    client_id = client_id_only(setup)
    token_server.add_client(client_id, assertion_keys=[key.public_key()])
    pem = private_pem(key)
    secret_values.add(pem)
    create_secret(setup, "signing-key", {"private_key.pem": pem})
    setup.endpoint("pkjwt", token_server, clientAuthMethod="PrivateKeyJWT", clientAssertion={
        "privateKeySecretRef": {"name": "signing-key", "key": "private_key.pem"}, "keyId": "k-2026"})
    kube.wait_ready(setup.namespace, "pkjwt", reason="TokenIssued")
    remember_assertions(token_server, secret_values)
    [seen] = token_server.requests
    assert (seen.auth_method, seen.client_id, seen.status) == ("private_key_jwt", client_id, 200)
    assert seen.assertion_header == {"alg": algorithm, "typ": "JWT", "kid": "k-2026"}
    claims = seen.assertion_claims or {}
    assert claims["iss"] == claims["sub"] == client_id
    assert claims["aud"] == token_server.token_url
    assert claims["exp"] - claims["iat"] == 60
    assert token_server.is_valid(token(kube, setup.namespace, "pkjwt") or "")


def test_client_secret_jwt(operator: OperatorProcess, kube: Kube, setup: Setup, token_server: TokenServer,
                           secret_values: set[str]) -> None:
    setup.client(token_server, auth_methods=["client_secret_jwt"])
    setup.endpoint("csjwt", token_server, clientAuthMethod="ClientSecretJWT")
    kube.wait_ready(setup.namespace, "csjwt")
    remember_assertions(token_server, secret_values)
    [seen] = token_server.requests
    assert (seen.auth_method, seen.assertion_header) == ("client_secret_jwt", {"alg": "HS256", "typ": "JWT"})
    assert "client_secret" not in seen.form


def test_a_rotated_signing_key_brings_a_new_token(operator: OperatorProcess, kube: Kube, setup: Setup,
                                                  token_server: TokenServer, secret_values: set[str]) -> None:
    old, new = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    client_id = client_id_only(setup)
    token_server.add_client(client_id, assertion_keys=[old])
    secret_values.update({private_pem(old), private_pem(new)})
    create_secret(setup, "signing-key", {"tls.key": private_pem(old)})
    setup.endpoint("rotate", token_server, clientAuthMethod="PrivateKeyJWT",
                   clientAssertion={"privateKeySecretRef": {"name": "signing-key"}})
    kube.wait_ready(setup.namespace, "rotate")
    first = token(kube, setup.namespace, "rotate")

    token_server.add_client(client_id, assertion_keys=[new])  # the IdP now knows only the new key
    replace_secret(setup, "signing-key", {"tls.key": private_pem(new)})
    wait_for(lambda: token(kube, setup.namespace, "rotate") not in (None, first), timeout=10,
             message="a token fetched with the rotated key")
    remember_assertions(token_server, secret_values)
    assert [seen.status for seen in token_server.requests] == [200, 200]  # no attempt with the old key
    kube.wait_ready(setup.namespace, "rotate", reason="TokenRefreshed")


def test_a_key_that_cannot_sign_is_client_key_invalid(operator: OperatorProcess, kube: Kube, setup: Setup,
                                                      token_server: TokenServer, secret_values: set[str]) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    client_id = client_id_only(setup)
    token_server.add_client(client_id, assertion_keys=[key])
    secret_values.add(private_pem(key))
    create_secret(setup, "signing-key", {"tls.key": private_pem(key)})
    setup.endpoint("badkey", token_server, clientAuthMethod="PrivateKeyJWT",
                   clientAssertion={"privateKeySecretRef": {"name": "signing-key"}, "algorithm": "RS256"})
    condition = kube.wait_ready(setup.namespace, "badkey", status="False", reason="ClientKeyInvalid")
    assert condition["message"].startswith(
        "Secret/signing-key key 'tls.key': holds an EC key on curve secp256r1, which signs ES256, not RS256 "
        "(spec.clientAssertion.privateKeySecretRef)")
    assert token_server.requests == []  # refused before anything was sent
    kube.patch_endpoint(setup.namespace, "badkey", {"spec": {"clientAssertion": {"algorithm": None}}})
    kube.wait_ready(setup.namespace, "badkey")
    remember_assertions(token_server, secret_values)


# -- mutual TLS ------------------------------------------------------------------------------------------


def test_tls_client_auth_and_a_rotated_certificate(operator: OperatorProcess, kube: Kube, setup: Setup,
                                                   tls_token_server: TokenServer,
                                                   secret_values: set[str]) -> None:
    client_id = client_id_only(setup)
    cert, key = tls_token_server.issue_client_certificate(client_id)
    tls_token_server.add_client(client_id, tls_client_subject=f"CN={client_id}")
    secret_values.add(key.decode())
    create_secret(setup, "client-cert", {"tls.crt": cert, "tls.key": key}, secret_type="kubernetes.io/tls")
    setup.endpoint("mtls", tls_token_server, clientAuthMethod="TLSClientAuth",
                   clientCertificateSecretRef={"name": "client-cert"},
                   trustStore=ca_configmap(setup, tls_token_server))
    kube.wait_ready(setup.namespace, "mtls")
    [seen] = tls_token_server.requests
    assert (seen.auth_method, seen.client_id, seen.status) == ("tls_client_auth", client_id, 200)
    first_fingerprint = seen.client_certificate
    assert first_fingerprint is not None
    first = token(kube, setup.namespace, "mtls")

    new_cert, new_key = tls_token_server.issue_client_certificate(client_id)  # same subject, new key pair
    secret_values.add(new_key.decode())
    replace_secret(setup, "client-cert", {"tls.crt": new_cert, "tls.key": new_key})
    wait_for(lambda: token(kube, setup.namespace, "mtls") not in (None, first), timeout=10,
             message="a token fetched with the rotated certificate")
    last = tls_token_server.requests[-1]
    assert last.client_certificate not in (None, first_fingerprint)
    assert last.status == 200

    # a certificate that does not match its key: named, and no request is made
    count = len(tls_token_server.requests)
    replace_secret(setup, "client-cert", {"tls.key": key})
    condition = kube.wait_ready(setup.namespace, "mtls", status="False", reason="ClientKeyInvalid")
    assert condition["message"].startswith("Secret/client-cert: tls.key does not belong to the certificate in "
                                           "tls.crt (spec.clientCertificateSecretRef)")
    assert len(tls_token_server.requests) == count


# -- trust stores ----------------------------------------------------------------------------------------


def _store(kind: str, cas: list[CertificateAuthority], password: str) -> bytes:
    if kind == "PKCS12":
        return pkcs12.serialize_key_and_certificates(
            None, None, None, [ca.cert for ca in cas], serialization.BestAvailableEncryption(password.encode()))
    entries = [jks.TrustedCertEntry.new(f"ca{index}", ca.cert.public_bytes(serialization.Encoding.DER))
               for index, ca in enumerate(cas)]
    data: bytes = jks.KeyStore.new("jks", entries).saves(password)
    return data


@pytest.mark.parametrize("kind", ["PKCS12", "JKS"])
def test_pkcs12_and_jks_trust_stores(operator: OperatorProcess, kube: Kube, setup: Setup,
                                     tls_token_server: TokenServer, secret_values: set[str], kind: str) -> None:
    setup.client(tls_token_server)
    password = f"{STORE_PASSWORD_PREFIX}{uuid.uuid4().hex[:12]}"
    secret_values.add(password)
    server_ca = CertificateAuthority(cert=load_pem_x509_certificate(tls_token_server.ca_pem),
                                     key=generate_ca().key)  # only the certificate goes into the store
    now = dt.datetime.now(dt.UTC)
    expired = generate_ca("expired CA", not_before=now - dt.timedelta(days=400),
                          not_after=now - dt.timedelta(days=30))
    create_secret(setup, "stores", {
        "good": _store(kind, [generate_ca("unrelated"), server_ca], password),
        "expired": _store(kind, [expired], password),
        "password": password, "wrong-password": "not-the-store-password",
    })
    extension = {"PKCS12": "p12", "JKS": "jks"}[kind]

    def trust_store(key: str, password_key: str) -> dict[str, Any]:
        return {"secretRef": {"name": "stores", "key": key}, "passwordKey": password_key, "format": kind}

    setup.endpoint(f"good-{extension}", tls_token_server, trustStore=trust_store("good", "password"))
    setup.endpoint(f"wrong-{extension}", tls_token_server, trustStore=trust_store("good", "wrong-password"))
    setup.endpoint(f"expired-{extension}", tls_token_server, trustStore=trust_store("expired", "password"))
    kube.wait_ready(setup.namespace, f"good-{extension}")
    wrong = kube.wait_ready(setup.namespace, f"wrong-{extension}", status="False", reason="TrustStoreInvalid")
    assert wrong["message"].startswith(
        "Secret/stores key 'good': wrong password or corrupt file (spec.trustStore.passwordKey)")
    old = kube.wait_ready(setup.namespace, f"expired-{extension}", status="False", reason="TrustStoreInvalid")
    day = expired.cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert old["message"].startswith(
        f"Secret/stores key 'expired': the certificate expired; the newest on {day} (spec.trustStore.secretRef)")
    assert password not in wrong["message"] + old["message"]
    assert len(tls_token_server.requests) == 1  # the broken stores never reached the server


# -- proxies ---------------------------------------------------------------------------------------------


def test_spec_proxy_with_credentials(operator: OperatorProcess, kube: Kube, setup: Setup,
                                     tls_token_server: TokenServer, secret_values: set[str]) -> None:
    proxy_password = f"proxy-{uuid.uuid4().hex}"
    secret_values.add(proxy_password)
    with HttpProxy(credentials=("gateway", proxy_password)) as proxy:
        setup.client(tls_token_server)
        setup.kube.create_secret(setup.namespace, "proxy-login", {"username": "gateway", "password": proxy_password})
        setup.endpoint("proxied", tls_token_server, trustStore=ca_configmap(setup, tls_token_server),
                       proxy={"url": proxy.url, "credentialsSecretRef": {"name": "proxy-login"}})
        kube.wait_ready(setup.namespace, "proxied")
        assert proxy.connects == [f"127.0.0.1:{tls_token_server.port}"]
        assert proxy.refused == []


def test_a_proxy_that_is_down_is_named(operator: OperatorProcess, kube: Kube, setup: Setup,
                                       tls_token_server: TokenServer) -> None:
    proxy = HttpProxy().start()
    proxy_url, port = proxy.url, proxy.port
    proxy.stop()
    setup.client(tls_token_server)
    setup.endpoint("noproxy", tls_token_server, trustStore=ca_configmap(setup, tls_token_server),
                   proxy={"url": proxy_url})
    condition = kube.wait_ready(setup.namespace, "noproxy", status="False", reason="TokenRequestFailed")
    assert condition["message"].startswith(
        f"cannot connect to proxy 127.0.0.1:{port} (spec.proxy.url) for 127.0.0.1:{tls_token_server.port}")
    assert tls_token_server.requests == []


# -- the operator's environment --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env_proxy() -> Iterator[HttpProxy]:
    with HttpProxy() as proxy:
        yield proxy


@pytest.fixture
def proxy_setup(kube: Kube, secret_values: set[str]) -> Iterator[Setup]:
    for namespace in _namespace(kube, "p"):
        yield Setup(kube, namespace, secret_values)


@pytest.fixture
def proxy_env_operator(control_plane: controlplane.ControlPlane, tmp_path_factory: pytest.TempPathFactory,
                       operator_processes: list[OperatorProcess], env_proxy: HttpProxy, kube: Kube,
                       proxy_setup: Setup) -> Iterator[OperatorProcess]:
    """An operator for this test's namespace, named exactly, whose environment names a proxy. NO_PROXY keeps
    127.0.0.1 (the API server, and token URLs written with that address) direct; ``localhost`` token URLs
    go through it. (Started per test: an operator watching a glob and started mid-suite once never delivered
    the endpoints of a namespace it had just discovered.)"""
    log_path = tmp_path_factory.mktemp("proxy-operator") / "operator.log"
    running = _operator(control_plane, log_path, operator_processes,
                        scope=("--namespace", proxy_setup.namespace), env={
        "HTTPS_PROXY": env_proxy.url, "HTTP_PROXY": env_proxy.url, "NO_PROXY": "127.0.0.1",
    })
    yield next(running)
    # delete the endpoints while this operator still runs, so it releases their finalizers
    namespace = proxy_setup.namespace
    for item in kube.custom.list_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL)["items"]:
        kube.delete_endpoint(namespace, item["metadata"]["name"])
    wait_for(lambda: not kube.custom.list_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, api.PLURAL)["items"], message="the endpoints to be released")
    next(running, None)  # stops the operator


def test_the_operators_environment_proxy_and_no_proxy(proxy_env_operator: OperatorProcess, kube: Kube,
                                                      proxy_setup: Setup, tls_token_server: TokenServer,
                                                      token_server: TokenServer, env_proxy: HttpProxy) -> None:
    env_proxy.reset()
    setup = proxy_setup
    setup.client(tls_token_server)
    trust = ca_configmap(setup, tls_token_server)
    by_name = tls_token_server.token_url.replace("127.0.0.1", "localhost")
    kube.create_endpoint(setup.namespace, "via-env", {"tokenUrl": by_name, "clientSecretRef": {"name": "oauth"},
                                                      "trustStore": trust})
    setup.endpoint("direct", tls_token_server, trustStore=trust)  # 127.0.0.1 is in NO_PROXY
    kube.wait_ready(setup.namespace, "via-env")
    kube.wait_ready(setup.namespace, "direct")
    assert env_proxy.connects == [f"localhost:{tls_token_server.port}"]

    # plain http goes through HTTP_PROXY in absolute form
    token_server.add_client(*_client_of(kube, setup))
    kube.create_endpoint(setup.namespace, "plain", {
        "tokenUrl": token_server.token_url.replace("127.0.0.1", "localhost"), "allowInsecureHttp": True,
        "clientSecretRef": {"name": "oauth"}})
    kube.wait_ready(setup.namespace, "plain")
    assert env_proxy.plain_requests == [token_server.token_url.replace("127.0.0.1", "localhost")]

    # the endpoint's own proxy beats the environment
    with HttpProxy() as own:
        kube.create_endpoint(setup.namespace, "own-proxy", {
            "tokenUrl": by_name, "clientSecretRef": {"name": "oauth"}, "trustStore": trust,
            "proxy": {"url": own.url}})
        kube.wait_ready(setup.namespace, "own-proxy")
        assert own.connects == [f"localhost:{tls_token_server.port}"]
    assert len(env_proxy.connects) == 1


def _client_of(kube: Kube, setup: Setup) -> tuple[str, str]:
    data = kube.secret_data(setup.namespace, "oauth") or {}
    return data["client_id"], data["client_secret"]


# -- the schema on the real API server ---------------------------------------------------------------------


def test_the_new_fields_are_accepted_with_their_defaults(control_plane: controlplane.ControlPlane,
                                                         namespace: str) -> None:
    from tests.e2e.test_crd_schema import _accepted, _endpoint

    obj = _endpoint(
        "full", clientAuthMethod="PrivateKeyJWT",
        clientAssertion={"privateKeySecretRef": {"name": "signing-key"}, "algorithm": "PS256", "keyId": "k1",
                         "audience": "https://idp.example.com"},
        clientCertificateSecretRef={"name": "client-cert"},
        trustStore={"secretRef": {"name": "stores", "key": "ts.jks"}, "format": "JKS", "passwordKey": "pw"},
        proxy={"url": "http://proxy.corp:3128", "credentialsSecretRef": {"name": "proxy-login"}},
    )
    stored = _accepted(control_plane, namespace, obj)["spec"]
    assert stored["clientAssertion"]["privateKeySecretRef"]["key"] == "tls.key"
    assert stored["clientAssertion"]["lifetimeSeconds"] == 60
    assert stored["proxy"]["credentialsSecretRef"] == {"name": "proxy-login", "usernameKey": "username",
                                                       "passwordKey": "password"}
    from secured_endpoint import api

    api.parse_spec(stored)
    for url in ("https://[::1]:8443", "HTTP://proxy:3128/"):
        _accepted(control_plane, namespace, _endpoint("proxied", proxy={"url": url}))


@pytest.mark.parametrize(("changes", "expected"), [
    ({"clientAuthMethod": "PrivateKeyJWT"},
     "clientAssertion.privateKeySecretRef is required when clientAuthMethod is PrivateKeyJWT"),
    ({"clientAssertion": {"lifetimeSeconds": 30}},
     "clientAssertion is only allowed when clientAuthMethod is PrivateKeyJWT or ClientSecretJWT"),
    ({"clientAuthMethod": "ClientSecretJWT", "clientAssertion": {"privateKeySecretRef": {"name": "k"}}},
     "clientAssertion.privateKeySecretRef is only allowed with PrivateKeyJWT"),
    ({"clientAuthMethod": "ClientSecretJWT", "clientAssertion": {"algorithm": "ES256"}},
     "clientAssertion.algorithm must be HS256, HS384 or HS512 with ClientSecretJWT"),
    ({"clientAuthMethod": "PrivateKeyJWT", "clientAssertion": {"privateKeySecretRef": {"name": "k"},
                                                                "algorithm": "HS256"}},
     "spec.clientAssertion.algorithm"),
    ({"clientAuthMethod": "TLSClientAuth"},
     "clientCertificateSecretRef is required when clientAuthMethod is TLSClientAuth"),
    ({"tokenUrl": "http://idp/token", "allowInsecureHttp": True, "clientCertificateSecretRef": {"name": "c"}},
     "clientCertificateSecretRef needs an https:// tokenUrl"),
    ({"trustStore": {"configMapRef": {"name": "c", "key": "k"}, "passwordKey": "p"}},
     "passwordKey needs secretRef"),
    ({"trustStore": {"secretRef": {"name": "s", "key": "k"}, "format": "JKS"}},
     "a JKS trust store needs passwordKey"),
    ({"trustStore": {"secretRef": {"name": "s", "key": "k"}, "format": "PEM", "passwordKey": "p"}},
     "passwordKey is only allowed for the PKCS12 and JKS formats"),
    ({"proxy": {"url": "http://user:pw@proxy:3128"}}, "proxy.url must be http(s)://host[:port]"),
    ({"proxy": {"url": "socks5://proxy:1080"}}, "proxy.url must be http(s)://host[:port]"),
    ({"proxy": {"url": "http://proxy:3128/path"}}, "proxy.url must be http(s)://host[:port]"),
    ({"clientAuthMethod": "PrivateKeyJWT", "clientAssertion": {"privateKeySecretRef": {"name": "k"},
                                                                "lifetimeSeconds": 5}},
     "spec.clientAssertion.lifetimeSeconds"),
    ({"clientCertificateSecretRef": {"name": "c", "namespace": "other"}}, "unknown field"),
], ids=["pkjwt-needs-key", "assertion-forbidden", "csjwt-no-key", "csjwt-hmac", "pkjwt-not-hmac",
        "tls-needs-cert", "mtls-needs-https", "password-needs-secret", "jks-needs-password", "pem-no-password",
        "proxy-credentials", "proxy-socks", "proxy-path", "lifetime", "no-namespace"])
def test_the_new_rules_refuse_at_apply(control_plane: controlplane.ControlPlane, namespace: str,
                                       changes: dict[str, Any], expected: str) -> None:
    from tests.e2e.test_crd_schema import _endpoint, _refused

    obj = _endpoint("refused", **changes)
    _refused(control_plane, namespace, obj, expected)
    # and the operator's models agree with the API server
    from secured_endpoint import api

    with pytest.raises(api.SpecError):
        api.parse_spec(obj["spec"])
