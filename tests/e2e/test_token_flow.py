"""Tokens flow from a real token server into the token Secret, and stay fresh.

Cases:
- create → the token Secret appears within 2 s, with every docs/contract.md §2 key, label and owner reference,
  and the status tells the truth (Ready/TokenIssued, observedGeneration, times, fingerprint);
- several refresh cycles with 4 s tokens: the Secret never holds an expired or unknown token;
- expiry sources: expires_in, JWT ``exp`` when expires_in is missing, the spec default otherwise;
- client authentication: ClientSecretBasic vs ClientSecretPost as the server saw it;
- scopes, audience and parameters (literal and from a Secret) reach the token server;
- password grant: a returned refresh_token is used first, the password when it is refused;
- trust store: HTTPS with the server's CA in a ConfigMap works; another CA gives TrustStoreInvalid.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from secured_endpoint import api, tokens
from secured_endpoint_devenv.tokenserver import TokenServer, generate_ca
from tests.conftest import Kube, OperatorProcess, Setup, wait_for

pytestmark = pytest.mark.e2e


def _expires_at(kube: Kube, namespace: str, name: str) -> datetime:
    body = kube.get_endpoint(namespace, name) or {}
    return datetime.fromisoformat(body["status"]["expiresAt"].replace("Z", "+00:00"))


def test_token_secret_appears_within_two_seconds(operator: OperatorProcess, kube: Kube, setup: Setup,
                                                 token_server: TokenServer) -> None:
    setup.client(token_server)
    # the session operator watches the glob 't-*': kopf first has to notice this brand-new namespace, start
    # its watch streams and list them, a delay no installation with existing namespaces has. A first endpoint
    # shows the namespace is served; the second one is timed.
    setup.endpoint("warm-up", token_server)
    kube.wait_ready(setup.namespace, "warm-up")
    started = time.monotonic()
    setup.endpoint("orders", token_server, scopes=["orders.read"])
    data = wait_for(lambda: kube.secret_data(setup.namespace, "orders-token"), timeout=2.0, interval=0.02,
                    message="the token Secret")
    elapsed = time.monotonic() - started
    assert elapsed <= 2.0
    assert set(data) == {"access_token", "token_type", "expires_at", "authorization", "credential",
                         "fingerprint"}
    assert token_server.is_valid(data["access_token"])
    assert data["authorization"] == data["credential"] == f"Bearer {data['access_token']}"
    assert data["fingerprint"] == tokens.fingerprint(data["access_token"])

    secret = kube.core.read_namespaced_secret("orders-token", setup.namespace)
    assert secret.type == "Opaque"
    assert secret.metadata.labels[api.MANAGED_BY_LABEL] == api.MANAGED_BY_VALUE
    endpoint = kube.get_endpoint(setup.namespace, "orders")
    assert endpoint is not None
    [owner] = secret.metadata.owner_references
    assert (owner.kind, owner.name, owner.uid, owner.controller) == (api.KIND, "orders",
                                                                     endpoint["metadata"]["uid"], True)

    condition = kube.wait_ready(setup.namespace, "orders", reason="TokenIssued")
    status = (kube.get_endpoint(setup.namespace, "orders") or {})["status"]
    assert status["observedGeneration"] == endpoint["metadata"]["generation"]
    assert condition["observedGeneration"] == endpoint["metadata"]["generation"]
    assert status["tokenFingerprint"] == data["fingerprint"]
    assert status["expiresAt"] == data["expires_at"]
    assert status["tokenType"] == "Bearer"
    assert status["scope"] == "orders.read"
    assert status["consecutiveFailures"] == 0
    assert "valid until" in condition["message"]
    assert api.FINALIZER in endpoint["metadata"]["finalizers"]
    assert not any(key.startswith("kopf") for key in status)


def test_refresh_cycles_never_leave_an_expired_token(operator: OperatorProcess, kube: Kube, setup: Setup,
                                                     token_server: TokenServer) -> None:
    token_server.lifetime_seconds = 4
    setup.client(token_server)
    setup.endpoint("short", token_server)
    wait_for(lambda: kube.secret_data(setup.namespace, "short-token"), message="the first token")
    seen: set[str] = set()
    deadline = time.monotonic() + 14
    while time.monotonic() < deadline:
        data = kube.secret_data(setup.namespace, "short-token")
        assert data is not None
        now = datetime.now(UTC)
        expires = datetime.fromisoformat(data["expires_at"].replace("Z", "+00:00"))
        assert expires > now, "the Secret holds an expired token"
        assert token_server.is_valid(data["access_token"]), "the Secret holds a token the server rejects"
        seen.add(data["access_token"])
        time.sleep(0.1)
    assert len(seen) >= 4, f"only {len(seen)} tokens in 14 s of 4 s tokens"
    kube.wait_ready(setup.namespace, "short", reason="TokenRefreshed")
    assert token_server.token_requests <= len(seen) + 1, "more token requests than refreshes"


def test_missing_expires_in_uses_the_spec_default(operator: OperatorProcess, kube: Kube, setup: Setup,
                                                  token_server: TokenServer) -> None:
    token_server.omit_expires_in = True
    setup.client(token_server)
    before = datetime.now(UTC)
    setup.endpoint("noexp", token_server, refresh={"defaultExpiresInSeconds": 120})
    kube.wait_ready(setup.namespace, "noexp")
    lifetime = (_expires_at(kube, setup.namespace, "noexp") - before).total_seconds()
    assert 115 <= lifetime <= 125


def test_jwt_exp_is_used_when_expires_in_is_missing(operator: OperatorProcess, kube: Kube, setup: Setup,
                                                    token_server: TokenServer) -> None:
    token_server.configure(omit_expires_in=True, token_format="jwt", lifetime_seconds=90)
    setup.client(token_server)
    before = datetime.now(UTC)
    setup.endpoint("jwt", token_server, refresh={"defaultExpiresInSeconds": 3600})
    kube.wait_ready(setup.namespace, "jwt")
    lifetime = (_expires_at(kube, setup.namespace, "jwt") - before).total_seconds()
    assert 85 <= lifetime <= 95


@pytest.mark.parametrize(("method", "seen"), [("ClientSecretBasic", "basic"), ("ClientSecretPost", "post")])
def test_client_authentication_method(operator: OperatorProcess, kube: Kube, setup: Setup,
                                      token_server: TokenServer, method: str, seen: str) -> None:
    setup.client(token_server, auth_methods=[seen])
    setup.endpoint("auth", token_server, clientAuthMethod=method)
    kube.wait_ready(setup.namespace, "auth")
    assert {request.auth_method for request in token_server.requests} == {seen}


def test_scopes_audience_and_parameters_reach_the_server(operator: OperatorProcess, kube: Kube,
                                                         setup: Setup, token_server: TokenServer) -> None:
    setup.client(token_server)
    kube.create_secret(setup.namespace, "tenant", {"tenant": "acme-from-secret\n"})
    setup.endpoint("params", token_server, scopes=["orders.read", "orders.write"],
                   audience="https://orders.internal",
                   parameters=[{"name": "resource", "value": "https://orders.internal/api"},
                               {"name": "tenant", "valueFrom": {"secretKeyRef": {"name": "tenant",
                                                                                  "key": "tenant"}}}])
    kube.wait_ready(setup.namespace, "params")
    form = token_server.requests[-1].form
    assert form["grant_type"] == "client_credentials"
    assert form["scope"] == "orders.read orders.write"
    assert form["audience"] == "https://orders.internal"
    assert form["resource"] == "https://orders.internal/api"
    assert form["tenant"] == "acme-from-secret"  # one trailing newline is dropped


def test_password_grant_uses_refresh_token_then_falls_back(operator: OperatorProcess, kube: Kube,
                                                           setup: Setup, token_server: TokenServer) -> None:
    token_server.configure(lifetime_seconds=3, issue_refresh_tokens=True)
    setup.client(token_server)
    setup.user(token_server)
    setup.endpoint("user", token_server, grantType="Password", passwordSecretRef={"name": "user"})
    kube.wait_ready(setup.namespace, "user")
    wait_for(lambda: any(r.grant_type == "refresh_token" and r.status == 200 for r in token_server.requests),
             timeout=8, message="a refresh_token grant")
    assert token_server.requests[0].grant_type == "password"

    token_server.revoke_refresh_tokens()
    count = len(token_server.requests)
    wait_for(lambda: any(r.grant_type == "password" for r in token_server.requests[count:]),
             timeout=8, message="the fallback to the password grant")
    refused = [r for r in token_server.requests[count:] if r.grant_type == "refresh_token"]
    assert refused
    assert refused[0].error == "invalid_grant"
    kube.wait_ready(setup.namespace, "user")


def test_https_with_a_dedicated_trust_store(operator: OperatorProcess, kube: Kube, setup: Setup,
                                            tls_token_server: TokenServer) -> None:
    from kubernetes import client as k8s

    setup.client(tls_token_server)
    kube.core.create_namespaced_config_map(setup.namespace, k8s.V1ConfigMap(
        metadata=k8s.V1ObjectMeta(name="idp-ca"), data={"ca.crt": tls_token_server.ca_pem.decode()}))
    kube.core.create_namespaced_config_map(setup.namespace, k8s.V1ConfigMap(
        metadata=k8s.V1ObjectMeta(name="other-ca"), data={"ca.crt": generate_ca().cert_pem.decode()}))
    setup.endpoint("good", tls_token_server, trustStore={"configMapRef": {"name": "idp-ca", "key": "ca.crt"}})
    setup.endpoint("bad", tls_token_server, trustStore={"configMapRef": {"name": "other-ca", "key": "ca.crt"}})
    kube.wait_ready(setup.namespace, "good")
    condition = kube.wait_ready(setup.namespace, "bad", status="False", reason="TrustStoreInvalid")
    assert "certificate" in condition["message"].lower()
    assert kube.secret_data(setup.namespace, "bad-token") is None

    # pointing the bad one at the right CA mends it at once (a spec change that affects the token)
    kube.patch_endpoint(setup.namespace, "bad", {"spec": {"trustStore": {"configMapRef": {"name": "idp-ca"}}}})
    kube.wait_ready(setup.namespace, "bad")
