"""Client authentication beyond the secret: RFC 7523 client assertions (PrivateKeyJWT, ClientSecretJWT) and
RFC 8705 mutual TLS (TLSClientAuth), against the real TokenServer on loopback.

Cases:
- assertions: claims (iss = sub = client id, aud = token URL or the configured audience, jti, iat, exp =
  iat + lifetime, kid) and signatures for RS256, PS256, ES256, ES384, HS256; the algorithm follows the key
  when unset; a fresh jti per request, also on the refresh-token path; the server refuses a replayed jti,
  a wrong key, a wrong audience;
- bad key material → ClientKeyInvalidError with a message that names the problem and holds no key
  (encrypted, garbage, too small, wrong algorithm for the key, short HMAC secret);
- mutual TLS: the server sees the certificate and the client id; a certificate from another CA, or one the
  client did not register, is refused; the pool keeps one client per identity; certificate checks
  (mismatched key, expired, not yet valid, no certificate);
- the spec: CEL-equivalent model rules, referenced Secrets, the config hash of older specs unchanged;
- repr() of requests, assertions and certificates never shows a key.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from pydantic import SecretStr

from secured_endpoint import api
from secured_endpoint.tokens import (
    CLIENT_ASSERTION_TYPE,
    ClientAssertion,
    ClientCertificate,
    ClientKeyInvalidError,
    InvalidCredentialsError,
    TokenClient,
    TokenError,
    TokenRequest,
    TokenRequestFailedError,
)
from secured_endpoint_devenv.tokenserver import TokenServer, generate_ca

CLIENT_ID = "orders-client"
CLIENT_SECRET = "client-secret-for-hmac-0123456789abcdef-xyz"  # 43 bytes: enough for HS256
PRIVATE_KEY_JWT = api.ClientAuthMethod.PRIVATE_KEY_JWT
CLIENT_SECRET_JWT = api.ClientAuthMethod.CLIENT_SECRET_JWT
TLS_CLIENT_AUTH = api.ClientAuthMethod.TLS_CLIENT_AUTH


def pem(key: Any, *, password: bytes | None = None) -> bytes:
    encryption = (serialization.BestAvailableEncryption(password) if password
                  else serialization.NoEncryption())
    data: bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    return data


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def server() -> Iterator[TokenServer]:
    with TokenServer() as running:
        yield running


@pytest.fixture
def tls_server() -> Iterator[TokenServer]:
    with TokenServer(tls=True) as running:
        yield running


@pytest.fixture
async def client() -> AsyncIterator[TokenClient]:
    async with TokenClient(timeout=3.0, connect_timeout=2.0, trust_env=False) as token_client:
        yield token_client


def request(server: TokenServer, method: api.ClientAuthMethod, **fields: Any) -> TokenRequest:
    values: dict[str, Any] = {
        "token_url": server.token_url, "grant_type": api.GrantType.CLIENT_CREDENTIALS,
        "client_auth_method": method, "client_id": CLIENT_ID, "client_secret": None,
    }
    if server.token_url.startswith("https:"):
        values["trust_store_pem"] = server.ca_pem
    return TokenRequest(**(values | fields))


# -- client assertions ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("algorithm", "key_kind"), [
    ("RS256", "rsa"), ("PS256", "rsa"), ("RS512", "rsa"), ("ES256", "ec256"), ("ES384", "ec384"),
])
async def test_private_key_jwt_signs_and_the_server_verifies(
    server: TokenServer, client: TokenClient, rsa_key: rsa.RSAPrivateKey, algorithm: str, key_kind: str,
) -> None:
    key: Any = {"rsa": rsa_key, "ec256": ec.generate_private_key(ec.SECP256R1()),
                "ec384": ec.generate_private_key(ec.SECP384R1())}[key_kind]
    server.add_client(CLIENT_ID, assertion_keys=[key.public_key()])
    assertion = ClientAssertion.from_private_key_pem(pem(key), algorithm=algorithm, key_id="key-2026",
                                                     lifetime_seconds=90)
    response = await client.fetch(request(server, PRIVATE_KEY_JWT, client_assertion=assertion))

    assert server.is_valid(response.access_token.get_secret_value())
    [seen] = server.requests
    assert (seen.auth_method, seen.client_id, seen.status) == ("private_key_jwt", CLIENT_ID, 200)
    assert seen.form["client_assertion_type"] == CLIENT_ASSERTION_TYPE
    assert seen.form["client_id"] == CLIENT_ID
    assert "client_secret" not in seen.form
    assert seen.assertion_header == {"alg": algorithm, "typ": "JWT", "kid": "key-2026"}
    claims = jwt.decode(seen.form["client_assertion"], key.public_key(), algorithms=[algorithm],
                        audience=server.token_url)
    assert claims["iss"] == claims["sub"] == CLIENT_ID
    assert claims["aud"] == server.token_url
    assert claims["exp"] - claims["iat"] == 90
    assert len(claims["jti"]) >= 32


@pytest.mark.parametrize(("curve", "expected"), [
    (ec.SECP256R1(), "ES256"), (ec.SECP384R1(), "ES384"), (ec.SECP521R1(), "ES512"),
])
def test_the_algorithm_follows_the_key(curve: ec.EllipticCurve, expected: str,
                                       rsa_key: rsa.RSAPrivateKey) -> None:
    assert ClientAssertion.from_private_key_pem(pem(ec.generate_private_key(curve))).algorithm == expected
    assert ClientAssertion.from_private_key_pem(pem(rsa_key)).algorithm == "RS256"


def test_pkcs1_and_sec1_keys_are_read(rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> None:
    pkcs1 = rsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                  serialization.NoEncryption())
    sec1 = ec_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    assert b"RSA PRIVATE KEY" in pkcs1
    assert b"EC PRIVATE KEY" in sec1
    assert ClientAssertion.from_private_key_pem(pkcs1).algorithm == "RS256"
    assert ClientAssertion.from_private_key_pem(sec1).algorithm == "ES256"


async def test_client_secret_jwt_uses_hs256_with_the_secret(server: TokenServer, client: TokenClient) -> None:
    server.add_client(CLIENT_ID, CLIENT_SECRET, auth_methods=["client_secret_jwt"])
    assertion = ClientAssertion.from_client_secret(SecretStr(CLIENT_SECRET))
    await client.fetch(request(server, CLIENT_SECRET_JWT, client_secret=SecretStr(CLIENT_SECRET),
                               client_assertion=assertion))
    [seen] = server.requests
    assert seen.auth_method == "client_secret_jwt"
    assert CLIENT_SECRET not in seen.form.values()  # the secret itself never travels
    claims = jwt.decode(seen.form["client_assertion"], CLIENT_SECRET, algorithms=["HS256"],
                        audience=server.token_url)
    assert claims["iss"] == claims["sub"] == CLIENT_ID


async def test_every_request_gets_a_fresh_assertion(server: TokenServer, client: TokenClient,
                                                    ec_key: ec.EllipticCurvePrivateKey) -> None:
    server.add_client(CLIENT_ID, assertion_keys=[ec_key])
    token_request = request(server, PRIVATE_KEY_JWT,
                            client_assertion=ClientAssertion.from_private_key_pem(pem(ec_key)))
    for _ in range(3):
        await client.fetch(token_request)
    jtis = [seen.assertion_claims["jti"] for seen in server.requests if seen.assertion_claims]
    assert len(jtis) == 3
    assert len(set(jtis)) == 3
    assert all(seen.status == 200 for seen in server.requests)


async def test_the_refresh_path_signs_again(server: TokenServer, client: TokenClient,
                                            ec_key: ec.EllipticCurvePrivateKey) -> None:
    server.add_client(CLIENT_ID, assertion_keys=[ec_key])
    server.add_user("alice", "alice-password-1")
    token_request = request(server, PRIVATE_KEY_JWT, grant_type=api.GrantType.PASSWORD, username="alice",
                            password=SecretStr("alice-password-1"),
                            client_assertion=ClientAssertion.from_private_key_pem(pem(ec_key)))
    first = await client.fetch(token_request)
    assert first.refresh_token is not None
    await client.fetch(replace(token_request, refresh_token=first.refresh_token))
    grants = [(seen.grant_type, seen.auth_method, seen.status) for seen in server.requests]
    assert grants == [("password", "private_key_jwt", 200), ("refresh_token", "private_key_jwt", 200)]


def test_the_server_refuses_a_replayed_assertion(server: TokenServer, ec_key: ec.EllipticCurvePrivateKey) -> None:
    import httpx

    server.add_client(CLIENT_ID, assertion_keys=[ec_key])
    assertion = ClientAssertion.from_private_key_pem(pem(ec_key)).create(CLIENT_ID, server.token_url)
    form = {"grant_type": "client_credentials", "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": assertion}
    assert httpx.post(server.token_url, data=form).status_code == 200
    again = httpx.post(server.token_url, data=form)
    assert again.status_code == 401
    assert "replay" in again.json()["error_description"]


async def test_a_key_the_server_does_not_know_is_invalid_credentials(
    server: TokenServer, client: TokenClient, ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    server.add_client(CLIENT_ID, assertion_keys=[ec.generate_private_key(ec.SECP256R1())])
    with pytest.raises(InvalidCredentialsError) as caught:
        await client.fetch(request(server, PRIVATE_KEY_JWT,
                                   client_assertion=ClientAssertion.from_private_key_pem(pem(ec_key))))
    assert "signature" in str(caught.value)


async def test_a_rotated_key_is_accepted_once_registered(server: TokenServer, client: TokenClient) -> None:
    old, new = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    server.add_client(CLIENT_ID, assertion_keys=[old, new])  # the server knows both during the rollover
    for key in (old, new):
        await client.fetch(request(server, PRIVATE_KEY_JWT,
                                   client_assertion=ClientAssertion.from_private_key_pem(pem(key))))
    assert [seen.status for seen in server.requests] == [200, 200]


async def test_another_audience_can_be_configured(server: TokenServer, client: TokenClient,
                                                  ec_key: ec.EllipticCurvePrivateKey) -> None:
    server.add_client(CLIENT_ID, assertion_keys=[ec_key])
    # the issuer identifier is accepted by the test server too; anything else is not
    await client.fetch(request(server, PRIVATE_KEY_JWT, client_assertion=ClientAssertion.from_private_key_pem(
        pem(ec_key), audience=server.url)))
    assert (server.requests[-1].assertion_claims or {}).get("aud") == server.url
    with pytest.raises(InvalidCredentialsError, match="Audience"):
        await client.fetch(request(server, PRIVATE_KEY_JWT, client_assertion=ClientAssertion.from_private_key_pem(
            pem(ec_key), audience="https://elsewhere.example")))


def test_bad_signing_keys_are_client_key_invalid(rsa_key: rsa.RSAPrivateKey,
                                                 ec_key: ec.EllipticCurvePrivateKey) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    cases: list[tuple[bytes, str | None, str]] = [
        (b"not a key", None, "holds no PEM private key"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", None, "cannot be parsed"),
        (pem(ec_key, password=b"pass-phrase-1"), None, "encrypted"),
        (pem(small), None, "1024-bit RSA key"),
        (pem(rsa_key), "ES256", "RSA key, which cannot sign ES256"),
        (pem(ec_key), "ES384", "curve secp256r1, which signs ES256, not ES384"),
        (pem(ed25519.Ed25519PrivateKey.generate()), None, "RSA or EC key"),
    ]
    for data, algorithm, message in cases:
        with pytest.raises(ClientKeyInvalidError, match=message) as caught:
            ClientAssertion.from_private_key_pem(data, algorithm=algorithm)
        assert caught.value.reason is api.Reason.CLIENT_KEY_INVALID
        assert caught.value.permanent
        assert "PRIVATE KEY" not in str(caught.value)


def test_a_short_client_secret_cannot_sign_hmac() -> None:
    with pytest.raises(ClientKeyInvalidError, match="10 bytes; HS256 needs at least 32"):
        ClientAssertion.from_client_secret(SecretStr("0123456789"))
    with pytest.raises(ClientKeyInvalidError, match="HS512 needs at least 64"):
        ClientAssertion.from_client_secret(SecretStr(CLIENT_SECRET), algorithm="HS512")
    assert ClientAssertion.from_client_secret(SecretStr("x" * 48), algorithm="HS384").algorithm == "HS384"


def test_requests_need_the_right_kind_of_assertion(server: TokenServer, ec_key: ec.EllipticCurvePrivateKey) -> None:
    hmac_assertion = ClientAssertion.from_client_secret(SecretStr(CLIENT_SECRET))
    key_assertion = ClientAssertion.from_private_key_pem(pem(ec_key))
    with pytest.raises(ValueError, match="PrivateKeyJWT"):
        request(server, PRIVATE_KEY_JWT, client_assertion=hmac_assertion)
    with pytest.raises(ValueError, match="ClientSecretJWT"):
        request(server, CLIENT_SECRET_JWT, client_assertion=key_assertion)
    with pytest.raises(ValueError, match="TLSClientAuth"):
        request(server, TLS_CLIENT_AUTH)
    with pytest.raises(ValueError, match="client secret"):
        request(server, api.ClientAuthMethod.CLIENT_SECRET_BASIC)


def test_reprs_show_no_key(rsa_key: rsa.RSAPrivateKey, server: TokenServer) -> None:
    secret_assertion = ClientAssertion.from_client_secret(SecretStr(CLIENT_SECRET))
    key_assertion = ClientAssertion.from_private_key_pem(pem(rsa_key))
    ca = generate_ca()
    cert_pem, key_pem = ca.issue_client_certificate("orders")
    certificate = ClientCertificate.load(cert_pem, key_pem)
    token_request = request(server, CLIENT_SECRET_JWT, client_secret=SecretStr(CLIENT_SECRET),
                            client_assertion=secret_assertion, client_certificate=None)
    texts = [repr(secret_assertion), repr(key_assertion), repr(certificate), repr(token_request), str(token_request)]
    key_body = key_pem.decode().splitlines()[1]
    rsa_body = pem(rsa_key).decode().splitlines()[1]
    for text in texts:
        assert CLIENT_SECRET not in text
        assert key_body not in text
        assert rsa_body not in text
        assert "PRIVATE KEY" not in text


# -- mutual TLS -----------------------------------------------------------------------------------------


async def test_tls_client_auth(tls_server: TokenServer, client: TokenClient) -> None:
    cert_pem, key_pem = tls_server.issue_client_certificate("orders-gateway")
    tls_server.add_client(CLIENT_ID, tls_client_certificate=cert_pem)
    certificate = ClientCertificate.load(cert_pem, key_pem)
    response = await client.fetch(request(tls_server, TLS_CLIENT_AUTH, client_certificate=certificate))
    assert tls_server.is_valid(response.access_token.get_secret_value())
    [seen] = tls_server.requests
    assert (seen.auth_method, seen.client_id, seen.status) == ("tls_client_auth", CLIENT_ID, 200)
    assert seen.client_certificate == certificate.fingerprint
    assert set(seen.form) == {"grant_type", "client_id"}  # RFC 8705 §2: client_id, and no secret
    assert certificate.subject == "CN=orders-gateway"


async def test_tls_client_auth_by_subject_with_an_rsa_key(tls_server: TokenServer, client: TokenClient) -> None:
    cert_pem, key_pem = tls_server.issue_client_certificate("by-subject", key_type="rsa")
    tls_server.add_client(CLIENT_ID, tls_client_subject="CN=by-subject")
    await client.fetch(request(tls_server, TLS_CLIENT_AUTH,
                               client_certificate=ClientCertificate.load(cert_pem, key_pem)))
    assert tls_server.requests[-1].status == 200


async def test_a_self_signed_registered_certificate_works(tls_server: TokenServer, client: TokenClient) -> None:
    """self_signed_tls_client_auth: the registered certificate is its own trust anchor."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "orders self-signed")])
    now = dt.datetime.now(dt.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
                   .not_valid_after(now + dt.timedelta(days=30))
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                   .sign(key, hashes.SHA256()))
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    tls_server.add_client(CLIENT_ID, tls_client_certificate=cert_pem)
    await client.fetch(request(tls_server, TLS_CLIENT_AUTH,
                               client_certificate=ClientCertificate.load(cert_pem, pem(key))))
    assert (tls_server.requests[-1].status, tls_server.requests[-1].auth_method) == (200, "tls_client_auth")


async def test_a_certificate_of_an_unknown_ca_is_refused(tls_server: TokenServer, client: TokenClient) -> None:
    cert_pem, key_pem = generate_ca().issue_client_certificate("stranger")
    tls_server.add_client(CLIENT_ID, tls_client_subject="CN=stranger")
    with pytest.raises(TokenError) as caught:
        await client.fetch(request(tls_server, TLS_CLIENT_AUTH,
                                   client_certificate=ClientCertificate.load(cert_pem, key_pem)))
    # TLS 1.3 sends the server's alert after the handshake; it can be lost when the server hangs up at once
    assert isinstance(caught.value, InvalidCredentialsError | TokenRequestFailedError)
    assert "client certificate" in str(caught.value)


async def test_another_clients_certificate_is_refused(tls_server: TokenServer, client: TokenClient) -> None:
    mine, _ = tls_server.issue_client_certificate("mine")
    theirs_cert, theirs_key = tls_server.issue_client_certificate("theirs")
    tls_server.add_client(CLIENT_ID, tls_client_certificate=mine)
    with pytest.raises(InvalidCredentialsError, match="not the one registered"):
        await client.fetch(request(tls_server, TLS_CLIENT_AUTH,
                                   client_certificate=ClientCertificate.load(theirs_cert, theirs_key)))


async def test_a_client_certificate_can_accompany_a_secret(tls_server: TokenServer, client: TokenClient) -> None:
    cert_pem, key_pem = tls_server.issue_client_certificate("bound")
    tls_server.add_client(CLIENT_ID, CLIENT_SECRET)
    certificate = ClientCertificate.load(cert_pem, key_pem)
    await client.fetch(request(tls_server, api.ClientAuthMethod.CLIENT_SECRET_BASIC,
                               client_secret=SecretStr(CLIENT_SECRET), client_certificate=certificate))
    [seen] = tls_server.requests
    assert (seen.auth_method, seen.client_certificate) == ("basic", certificate.fingerprint)


async def test_the_pool_keeps_one_client_per_identity(tls_server: TokenServer, client: TokenClient) -> None:
    identities = [tls_server.issue_client_certificate(f"client-{index}") for index in range(3)]
    for index, (cert_pem, _) in enumerate(identities):
        tls_server.add_client(f"client-{index}", tls_client_certificate=cert_pem)
    for _ in range(2):
        for index, (cert_pem, key_pem) in enumerate(identities):
            await client.fetch(request(tls_server, TLS_CLIENT_AUTH, client_id=f"client-{index}",
                                       client_certificate=ClientCertificate.load(cert_pem, key_pem)))
    assert client.pool_size == 3  # same trust store, three identities; a reloaded identity reuses its client
    fingerprints = {seen.client_id: seen.client_certificate for seen in tls_server.requests}
    assert len(set(fingerprints.values())) == 3
    assert all(seen.status == 200 for seen in tls_server.requests)
    # without a certificate, the same trust store: one more client, and no certificate on its connections
    tls_server.add_client("plain", CLIENT_SECRET)
    await client.fetch(request(tls_server, api.ClientAuthMethod.CLIENT_SECRET_POST, client_id="plain",
                               client_secret=SecretStr(CLIENT_SECRET)))
    assert client.pool_size == 4
    assert tls_server.requests[-1].client_certificate is None


def test_client_certificate_checks() -> None:
    ca = generate_ca()
    cert_pem, key_pem = ca.issue_client_certificate("orders")
    _, other_key = ca.issue_client_certificate("other")
    now = dt.datetime.now(dt.UTC)
    expired, expired_key = ca.issue_client_certificate("old", not_before=now - dt.timedelta(days=30),
                                                       not_after=now - dt.timedelta(days=1))
    future, future_key = ca.issue_client_certificate("new", not_before=now + dt.timedelta(days=1))
    cases = [
        (b"", key_pem, "tls.crt holds no PEM certificate"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", key_pem, "cannot be parsed"),
        (cert_pem, b"nope", "tls.key holds no PEM private key"),
        (cert_pem, other_key, "tls.key does not belong to the certificate"),
        (expired, expired_key, "expired on"),
        (future, future_key, "not valid before"),
    ]
    for certificate, key, message in cases:
        with pytest.raises(ClientKeyInvalidError, match=message) as caught:
            ClientCertificate.load(certificate, key)
        assert "PRIVATE KEY" not in str(caught.value)


def test_a_client_certificate_needs_https() -> None:
    cert_pem, key_pem = generate_ca().issue_client_certificate("orders")
    with pytest.raises(ValueError, match="https"):
        TokenRequest(token_url="http://127.0.0.1:1/token", grant_type=api.GrantType.CLIENT_CREDENTIALS,
                     client_auth_method=TLS_CLIENT_AUTH, client_id=CLIENT_ID, client_secret=None,
                     client_certificate=ClientCertificate.load(cert_pem, key_pem))


# -- the spec --------------------------------------------------------------------------------------------

BASE = {"tokenUrl": "https://idp.example/token", "clientSecretRef": {"name": "oauth"}}


@pytest.mark.parametrize(("changes", "message"), [
    ({"clientAuthMethod": "PrivateKeyJWT"}, "clientAssertion.privateKeySecretRef is required"),
    ({"clientAuthMethod": "PrivateKeyJWT", "clientAssertion": {"algorithm": "RS256"}},
     "clientAssertion.privateKeySecretRef is required"),
    ({"clientAssertion": {"lifetimeSeconds": 30}}, "clientAssertion is only allowed"),
    ({"clientAuthMethod": "ClientSecretJWT", "clientAssertion": {"privateKeySecretRef": {"name": "k"}}},
     "only allowed with PrivateKeyJWT"),
    ({"clientAuthMethod": "ClientSecretJWT", "clientAssertion": {"algorithm": "RS256"}}, "HS256, HS384 or HS512"),
    ({"clientAuthMethod": "PrivateKeyJWT",
      "clientAssertion": {"privateKeySecretRef": {"name": "k"}, "algorithm": "HS256"}}, "RS, PS or ES"),
    ({"clientAuthMethod": "TLSClientAuth"}, "clientCertificateSecretRef is required"),
    ({"tokenUrl": "http://idp/token", "allowInsecureHttp": True, "clientCertificateSecretRef": {"name": "c"}},
     "needs an https:// tokenUrl"),
    ({"clientAuthMethod": "PrivateKeyJWT",
      "clientAssertion": {"privateKeySecretRef": {"name": "k"}, "lifetimeSeconds": 5}}, "greater than or equal"),
])
def test_spec_rules(changes: dict[str, Any], message: str) -> None:
    raw = {**BASE, **{key: value for key, value in changes.items() if value is not None}}
    with pytest.raises(api.SpecError, match=message):
        api.parse_spec(raw)


def test_a_full_client_auth_spec_parses_with_defaults() -> None:
    spec = api.parse_spec({**BASE, "clientAuthMethod": "PrivateKeyJWT",
                           "clientAssertion": {"privateKeySecretRef": {"name": "signing-key"}},
                           "clientCertificateSecretRef": {"name": "client-cert"},
                           "proxy": {"url": "http://proxy:3128",
                                     "credentialsSecretRef": {"name": "proxy-login"}}})
    assert spec.client_assertion is not None
    assert spec.client_assertion.private_key_secret_ref == api.PrivateKeySecretRef(name="signing-key", key="tls.key")
    assert spec.client_assertion.lifetime_seconds == 60
    assert spec.client_assertion.algorithm is None
    assert spec.referenced_sources() == {api.SourceRef("Secret", name) for name in (
        "oauth", "signing-key", "client-cert", "proxy-login")}


def test_the_config_hash_of_an_older_spec_is_unchanged() -> None:
    """Digest of BASE + a PEM trust store as computed before these fields existed: an upgrade must not
    fetch every token again."""
    spec = api.parse_spec({**BASE, "trustStore": {"configMapRef": {"name": "ca", "key": "ca.crt"}}})
    import hashlib
    import json
    old_fields = {"tokenUrl": "https://idp.example/token", "allowInsecureHttp": False,
                  "grantType": "ClientCredentials", "clientAuthMethod": "ClientSecretBasic",
                  "clientSecretRef": {"name": "oauth", "clientIdKey": "client_id", "clientSecretKey": "client_secret"},
                  "passwordSecretRef": None, "scopes": [], "audience": None, "parameters": [],
                  "trustStore": {"configMapRef": {"name": "ca", "key": "ca.crt"}, "secretRef": None}}
    canonical = json.dumps(old_fields, sort_keys=True, separators=(",", ":"))
    assert spec.token_config_hash() == "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()[:16]


def test_the_config_hash_follows_the_new_fields() -> None:
    base = {**BASE, "clientAuthMethod": "PrivateKeyJWT",
            "clientAssertion": {"privateKeySecretRef": {"name": "signing-key"}}}
    hashes = {api.parse_spec(raw).token_config_hash() for raw in (
        base,
        base | {"clientAssertion": {"privateKeySecretRef": {"name": "signing-key"}, "keyId": "2"}},
        base | {"clientAssertion": {"privateKeySecretRef": {"name": "signing-key"}, "lifetimeSeconds": 30}},
        base | {"clientCertificateSecretRef": {"name": "cert"}},
        base | {"proxy": {"url": "http://proxy:3128"}},
        base | {"trustStore": {"secretRef": {"name": "ts", "key": "ts.p12"}, "format": "PKCS12"}},
    )}
    assert len(hashes) == 6
