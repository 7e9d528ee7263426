"""TokenClient against a real TokenServer on loopback (http and https), and the server's own surface."""

from __future__ import annotations

import asyncio
import base64
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from secured_endpoint import api
from secured_endpoint.tokens import (
    InvalidCredentialsError,
    InvalidTokenResponseError,
    TokenClient,
    TokenError,
    TokenRequest,
    TokenRequestFailedError,
    TrustStoreInvalidError,
    basic_authorization,
    jwt_expiry,
)
from secured_endpoint_devenv.tokenserver import Knobs, TokenServer, generate_ca, main

CLIENT_ID = "orders-client"
CLIENT_SECRET = "client-secret-3f9a7c1e"
USERNAME = "alice"
PASSWORD = "user-password-81b2d4"
PARAMETER_SECRET = "tenant-value-from-a-secret-55e1"

BASIC = api.ClientAuthMethod.CLIENT_SECRET_BASIC
POST = api.ClientAuthMethod.CLIENT_SECRET_POST
CLIENT_CREDENTIALS = api.GrantType.CLIENT_CREDENTIALS
PASSWORD_GRANT = api.GrantType.PASSWORD


def populate(server: TokenServer) -> TokenServer:
    server.add_client(CLIENT_ID, CLIENT_SECRET)
    server.add_user(USERNAME, PASSWORD)
    return server


@pytest.fixture
def server() -> Iterator[TokenServer]:
    with TokenServer() as running:
        yield populate(running)


@pytest.fixture
def tls_server() -> Iterator[TokenServer]:
    with TokenServer(tls=True) as running:
        yield populate(running)


@pytest.fixture
async def client() -> AsyncIterator[TokenClient]:
    async with TokenClient(timeout=2.0, connect_timeout=1.0) as token_client:
        yield token_client


def token_request(server: TokenServer, **overrides: Any) -> TokenRequest:
    fields: dict[str, Any] = {
        "token_url": server.token_url,
        "grant_type": CLIENT_CREDENTIALS,
        "client_auth_method": BASIC,
        "client_id": CLIENT_ID,
        "client_secret": SecretStr(CLIENT_SECRET),
    }
    if overrides.get("grant_type") is PASSWORD_GRANT:
        fields |= {"username": USERNAME, "password": SecretStr(PASSWORD)}
    if server.token_url.startswith("https:"):
        fields["trust_store_pem"] = server.ca_pem
    return TokenRequest(**(fields | overrides))


def assert_leaks_nothing(text: str, server: TokenServer, *extra: str) -> None:
    """Neither a credential nor any token the server ever handed out appears in ``text``."""
    forbidden = [CLIENT_SECRET, PASSWORD, PARAMETER_SECRET, *extra]
    forbidden += [issued.access_token for issued in server.issued_tokens]
    for recorded in server.requests:
        forbidden += [token for token in (recorded.access_token, recorded.refresh_token) if token]
    for secret in forbidden:
        assert secret not in text


async def fetch_error(client: TokenClient, request: TokenRequest, server: TokenServer) -> TokenError:
    """The TokenError a fetch raises, after checking that neither its str() nor its repr() leaks."""
    with pytest.raises(TokenError) as caught:
        await client.fetch(request)
    assert_leaks_nothing(str(caught.value), server)
    assert_leaks_nothing(repr(caught.value), server)
    return caught.value


# -- the happy paths -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "recorded"), [(BASIC, "basic"), (POST, "post")])
async def test_client_credentials_over_http(
    server: TokenServer, client: TokenClient, method: api.ClientAuthMethod, recorded: str
) -> None:
    response = await client.fetch(token_request(server, client_auth_method=method))

    assert server.is_valid(response.access_token.get_secret_value())
    assert response.token_type == "Bearer"
    assert response.expires_in == 3600
    assert response.refresh_token is None  # RFC 6749 §4.4.3
    [seen] = server.requests
    assert (seen.grant_type, seen.client_id, seen.auth_method, seen.status) == (
        "client_credentials", CLIENT_ID, recorded, 200)
    assert ("client_secret" in seen.form) is (method is POST)


@pytest.mark.parametrize("method", [BASIC, POST])
async def test_https_with_the_servers_own_ca_as_trust_store(
    tls_server: TokenServer, client: TokenClient, method: api.ClientAuthMethod
) -> None:
    assert tls_server.token_url.startswith("https://")
    response = await client.fetch(token_request(tls_server, client_auth_method=method))
    assert tls_server.is_valid(response.access_token.get_secret_value())


@pytest.mark.parametrize("method", [BASIC, POST])
@pytest.mark.parametrize(
    ("client_id", "client_secret"),
    [
        ("id:with:colons", "secret:with:colons"),
        ("per%cent", "100%25 sure"),
        ("with space", "  leading and trailing  "),
        ("plus+sign", "a+b=c&d"),
        ("euro€", "geheim€ß"),
        ("all :%+&€~*", "all :%+&€~*/?#"),
    ],
)
async def test_ids_and_secrets_with_special_characters(
    server: TokenServer, client: TokenClient, method: api.ClientAuthMethod, client_id: str, client_secret: str
) -> None:
    server.add_client(client_id, client_secret)
    request = token_request(server, client_auth_method=method, client_id=client_id,
                            client_secret=SecretStr(client_secret))
    await client.fetch(request)
    assert server.requests[-1].client_id == client_id


def test_basic_credentials_are_form_urlencoded_before_base64() -> None:
    header = basic_authorization("my id:1", "p@ss w+rd%€~")
    assert header.startswith("Basic ")
    decoded = base64.b64decode(header.removeprefix("Basic ")).decode("ascii")
    assert decoded == "my+id%3A1:p%40ss+w%2Brd%25%E2%82%AC%7E"


async def test_scopes_audience_and_parameters_reach_the_server(
    server: TokenServer, client: TokenClient
) -> None:
    request = token_request(
        server,
        scopes=("orders.read", "orders.write"),
        audience="https://orders.internal",
        parameters=(("resource", SecretStr("https://orders.internal/api")),
                    ("tenant", SecretStr(PARAMETER_SECRET))),
    )
    response = await client.fetch(request)

    form = server.requests[-1].form
    assert form["scope"] == "orders.read orders.write"
    assert form["audience"] == "https://orders.internal"
    assert form["resource"] == "https://orders.internal/api"
    assert form["tenant"] == PARAMETER_SECRET
    assert response.scope == "orders.read orders.write"
    [issued] = server.issued_tokens
    assert issued.audience == "https://orders.internal"


async def test_no_scope_no_audience_means_no_such_fields(server: TokenServer, client: TokenClient) -> None:
    await client.fetch(token_request(server))
    assert set(server.requests[-1].form) == {"grant_type"}


async def test_a_response_without_expires_in(server: TokenServer, client: TokenClient) -> None:
    server.omit_expires_in = True
    assert (await client.fetch(token_request(server))).expires_in is None


async def test_jwt_tokens_carry_their_expiry(server: TokenServer, client: TokenClient) -> None:
    server.token_format = "jwt"
    server.lifetime_seconds = 120
    response = await client.fetch(token_request(server))

    expiry = jwt_expiry(response.access_token.get_secret_value())
    assert expiry is not None
    assert abs(expiry.timestamp() - (time.time() + 120)) < 5
    assert server.is_valid(response.access_token.get_secret_value())


async def test_many_concurrent_requests_share_one_pooled_client(
    tls_server: TokenServer, client: TokenClient
) -> None:
    responses = await asyncio.gather(*(client.fetch(token_request(tls_server)) for _ in range(40)))
    assert len({response.access_token.get_secret_value() for response in responses}) == 40
    assert client.pool_size == 1


# -- the password grant and refresh tokens ---------------------------------------------------------------


async def test_password_grant_issues_a_refresh_token(server: TokenServer, client: TokenClient) -> None:
    response = await client.fetch(token_request(server, grant_type=PASSWORD_GRANT))

    assert response.refresh_token is not None
    [seen] = server.requests
    assert seen.grant_type == "password"
    assert seen.form["username"] == USERNAME
    assert server.issued_tokens[0].subject == USERNAME


async def test_password_grant_uses_the_refresh_token_first(server: TokenServer, client: TokenClient) -> None:
    first = await client.fetch(token_request(server, grant_type=PASSWORD_GRANT))
    second = await client.fetch(token_request(server, grant_type=PASSWORD_GRANT,
                                              refresh_token=first.refresh_token))

    assert [seen.grant_type for seen in server.requests] == ["password", "refresh_token"]
    assert "password" not in server.requests[-1].form
    assert second.refresh_token is not None
    assert second.refresh_token != first.refresh_token  # rotated
    assert server.is_valid(second.access_token.get_secret_value())


async def test_a_revoked_refresh_token_falls_back_to_the_password(
    server: TokenServer, client: TokenClient
) -> None:
    first = await client.fetch(token_request(server, grant_type=PASSWORD_GRANT))
    server.revoke_refresh_tokens()

    response = await client.fetch(token_request(server, grant_type=PASSWORD_GRANT,
                                                refresh_token=first.refresh_token))

    assert [(seen.grant_type, seen.status, seen.error) for seen in server.requests[1:]] == [
        ("refresh_token", 400, "invalid_grant"), ("password", 200, None)]
    assert server.is_valid(response.access_token.get_secret_value())
    assert response.refresh_token is not None


async def test_a_used_refresh_token_cannot_be_replayed(server: TokenServer, client: TokenClient) -> None:
    first = await client.fetch(token_request(server, grant_type=PASSWORD_GRANT))
    await client.fetch(token_request(server, grant_type=PASSWORD_GRANT, refresh_token=first.refresh_token))
    await client.fetch(token_request(server, grant_type=PASSWORD_GRANT, refresh_token=first.refresh_token))
    assert [seen.grant_type for seen in server.requests] == [
        "password", "refresh_token", "refresh_token", "password"]


async def test_a_refresh_answer_without_a_refresh_token_keeps_the_old_one(
    server: TokenServer, client: TokenClient
) -> None:
    first = await client.fetch(token_request(server, grant_type=PASSWORD_GRANT))
    server.issue_refresh_tokens = False  # refresh tokens now reusable, answers carry none

    second = await client.fetch(token_request(server, grant_type=PASSWORD_GRANT,
                                              refresh_token=first.refresh_token))

    assert server.requests[-1].grant_type == "refresh_token"
    assert second.refresh_token == first.refresh_token


async def test_a_transient_refresh_failure_does_not_fall_back(
    server: TokenServer, client: TokenClient
) -> None:
    first = await client.fetch(token_request(server, grant_type=PASSWORD_GRANT))
    server.fault = "503"
    error = await fetch_error(client, token_request(server, grant_type=PASSWORD_GRANT,
                                                    refresh_token=first.refresh_token), server)
    assert isinstance(error, TokenRequestFailedError)
    assert [seen.grant_type for seen in server.requests[1:]] == ["refresh_token"]


async def test_a_wrong_password_is_invalid_credentials(server: TokenServer, client: TokenClient) -> None:
    wrong = "not-the-password-77"
    request = token_request(server, grant_type=PASSWORD_GRANT, password=SecretStr(wrong),
                            refresh_token=SecretStr("unknown-refresh-token-1"))
    error = await fetch_error(client, request, server)

    assert isinstance(error, InvalidCredentialsError)
    assert error.permanent
    assert error.oauth_error == "invalid_grant"
    assert wrong not in str(error)
    assert [seen.grant_type for seen in server.requests] == ["refresh_token", "password"]


def test_the_password_grant_needs_username_and_password() -> None:
    with pytest.raises(ValueError, match="username and a password"):
        TokenRequest("https://idp.example/token", PASSWORD_GRANT, BASIC, "c", SecretStr("s"))


# -- refusals from a strict server -----------------------------------------------------------------------


async def test_a_wrong_client_secret_is_invalid_credentials(server: TokenServer, client: TokenClient) -> None:
    wrong = "wrong-client-secret-42"
    for method in (BASIC, POST):
        error = await fetch_error(client, token_request(server, client_auth_method=method,
                                                        client_secret=SecretStr(wrong)), server)
        assert isinstance(error, InvalidCredentialsError)
        assert (error.status_code, error.oauth_error, error.permanent) == (401, "invalid_client", True)
        assert wrong not in str(error)


async def test_an_auth_method_the_client_may_not_use(server: TokenServer, client: TokenClient) -> None:
    server.add_client("post-only", CLIENT_SECRET, auth_methods={"post"})
    error = await fetch_error(client, token_request(server, client_id="post-only"), server)
    assert isinstance(error, InvalidCredentialsError)


async def test_a_grant_the_client_may_not_use(server: TokenServer, client: TokenClient) -> None:
    server.add_client("machine", CLIENT_SECRET, grant_types={"client_credentials"})
    error = await fetch_error(client, token_request(server, client_id="machine", grant_type=PASSWORD_GRANT),
                              server)
    assert isinstance(error, InvalidCredentialsError)
    assert error.oauth_error == "unauthorized_client"


async def test_a_scope_the_client_may_not_ask_for(server: TokenServer, client: TokenClient) -> None:
    server.add_client("narrow", CLIENT_SECRET, scopes={"orders.read"})
    error = await fetch_error(client, token_request(server, client_id="narrow",
                                                    scopes=("orders.read", "orders.delete")), server)
    assert isinstance(error, TokenRequestFailedError)
    assert (error.oauth_error, error.permanent) == ("invalid_scope", True)


# -- faults ----------------------------------------------------------------------------------------------

FAULT_TABLE = [
    # fault, exception, permanent, status
    ("500", TokenRequestFailedError, False, 500),
    ("503", TokenRequestFailedError, False, 503),
    ("429", TokenRequestFailedError, False, 429),
    ("bad_json", InvalidTokenResponseError, False, 200),
    ("html", InvalidTokenResponseError, False, 200),
    ("missing_access_token", InvalidTokenResponseError, False, 200),
    ("missing_token_type", InvalidTokenResponseError, False, 200),
    ("empty_body", InvalidTokenResponseError, False, 200),
    ("redirect", InvalidTokenResponseError, False, 302),
    ("invalid_client", InvalidCredentialsError, True, 401),
    ("invalid_grant", InvalidCredentialsError, True, 400),
    ("invalid_scope", TokenRequestFailedError, True, 400),
    ("echo_request", TokenRequestFailedError, True, 400),
]


@pytest.mark.parametrize(("fault", "kind", "permanent", "status"), FAULT_TABLE)
@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
async def test_each_fault_maps_to_its_error(
    client: TokenClient, tls: bool, fault: Any, kind: type[TokenError], permanent: bool, status: int
) -> None:
    with TokenServer(tls=tls) as server:
        populate(server)
        server.fault = fault
        error = await fetch_error(client, token_request(server), server)

        assert type(error) is kind
        assert error.reason is kind.reason
        assert error.permanent is permanent
        assert error.status_code == status
        assert f"HTTP {status}" in str(error)
        assert [seen.status for seen in server.requests] == [status]  # a redirect is not followed


async def test_retry_after_is_passed_on(server: TokenServer, client: TokenClient) -> None:
    server.fault = "503"
    error = await fetch_error(client, token_request(server), server)
    assert error.retry_after_seconds == 1.0


async def test_a_fault_can_be_limited_to_some_requests(server: TokenServer, client: TokenClient) -> None:
    server.configure(fault="500", fault_count=2)
    for _ in range(2):
        await fetch_error(client, token_request(server), server)
    await client.fetch(token_request(server))
    assert server.fault is None
    assert [seen.status for seen in server.requests] == [500, 500, 200]


async def test_a_slow_server_times_out(server: TokenServer) -> None:
    server.delay_seconds = 3
    async with TokenClient(timeout=0.3, connect_timeout=0.2) as impatient:
        started = time.monotonic()
        error = await fetch_error(impatient, token_request(server), server)
    assert time.monotonic() - started < 2
    assert isinstance(error, TokenRequestFailedError)
    assert not error.permanent
    assert "timed out after 0.3s" in str(error)
    assert "127.0.0.1" in str(error)


async def test_a_server_that_is_down_and_comes_back(server: TokenServer, client: TokenClient) -> None:
    url = server.token_url
    await client.fetch(token_request(server))  # leaves a kept-alive connection in the pool

    server.go_down()
    error = await fetch_error(client, token_request(server), server)
    assert isinstance(error, TokenRequestFailedError)
    assert not error.permanent
    assert "127.0.0.1" in str(error)

    server.come_up()
    assert server.token_url == url
    await client.fetch(token_request(server))


async def test_nothing_listening_is_a_transient_failure(client: TokenClient) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    request = TokenRequest(f"http://127.0.0.1:{port}/token", CLIENT_CREDENTIALS, BASIC, "c", SecretStr("s"))
    with pytest.raises(TokenRequestFailedError, match=f"cannot connect to 127.0.0.1:{port}") as caught:
        await client.fetch(request)
    assert not caught.value.permanent


async def test_an_unknown_host_is_a_transient_failure(client: TokenClient) -> None:
    request = TokenRequest("https://idp.invalid/token", CLIENT_CREDENTIALS, BASIC, "c", SecretStr("s"))
    with pytest.raises(TokenRequestFailedError, match=r"idp\.invalid") as caught:
        await client.fetch(request)
    assert not caught.value.permanent


async def test_a_url_that_is_not_http_is_a_permanent_failure(client: TokenClient) -> None:
    request = TokenRequest("ftp://idp.example/token", CLIENT_CREDENTIALS, BASIC, "c", SecretStr("s"))
    with pytest.raises(TokenRequestFailedError, match="not a valid http") as caught:
        await client.fetch(request)
    assert caught.value.permanent


async def test_credentials_in_the_url_are_refused(server: TokenServer, client: TokenClient) -> None:
    url = server.token_url.replace("://", "://user:pw-in-url@")
    with pytest.raises(TokenRequestFailedError, match="must not contain user credentials") as caught:
        await client.fetch(token_request(server, token_url=url))
    assert caught.value.permanent
    assert "pw-in-url" not in str(caught.value)
    assert server.token_requests == 0


# -- trust stores ----------------------------------------------------------------------------------------


async def test_another_ca_is_a_trust_store_error(tls_server: TokenServer, client: TokenClient) -> None:
    error = await fetch_error(client, token_request(tls_server, trust_store_pem=generate_ca().cert_pem),
                              tls_server)
    assert isinstance(error, TrustStoreInvalidError)
    assert error.reason is api.Reason.TRUST_STORE_INVALID
    assert not error.permanent
    assert "does not verify against the trust store" in str(error)
    assert tls_server.token_requests == 0


async def test_the_system_cas_do_not_trust_a_private_ca(tls_server: TokenServer, client: TokenClient) -> None:
    error = await fetch_error(client, token_request(tls_server, trust_store_pem=None), tls_server)
    assert isinstance(error, TrustStoreInvalidError)
    assert "system CAs" in str(error)


@pytest.mark.parametrize(
    "pem",
    [
        b"",
        b"garbage",
        b"\xff\xfe\x00binary",
        b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    ],
    ids=["empty", "text", "binary", "bad-certificate", "no-certificate"],
)
async def test_an_unparsable_trust_store(tls_server: TokenServer, client: TokenClient, pem: bytes) -> None:
    error = await fetch_error(client, token_request(tls_server, trust_store_pem=pem), tls_server)
    assert isinstance(error, TrustStoreInvalidError)
    assert not error.permanent
    assert tls_server.token_requests == 0


async def test_a_bundle_with_extra_cas_still_verifies(tls_server: TokenServer, client: TokenClient) -> None:
    bundle = generate_ca().cert_pem + tls_server.ca_pem + generate_ca().cert_pem
    await client.fetch(token_request(tls_server, trust_store_pem=bundle))


async def test_clients_are_pooled_per_trust_store_in_a_bounded_lru(tls_server: TokenServer) -> None:
    bundles = [tls_server.ca_pem + generate_ca().cert_pem * n for n in range(3)]
    async with TokenClient(max_clients=2) as pooled:
        await pooled.fetch(token_request(tls_server, trust_store_pem=bundles[0]))
        await pooled.fetch(token_request(tls_server, trust_store_pem=bundles[0]))
        assert pooled.pool_size == 1
        for bundle in bundles:
            await pooled.fetch(token_request(tls_server, trust_store_pem=bundle))
        assert pooled.pool_size == 2
        await pooled.fetch(token_request(tls_server, trust_store_pem=bundles[0]))  # evicted, rebuilt
        assert pooled.pool_size == 2


async def test_a_closed_client_refuses_to_fetch(server: TokenServer) -> None:
    closed = TokenClient()
    await closed.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await closed.fetch(token_request(server))


# -- secrets stay secret ---------------------------------------------------------------------------------


def test_the_repr_of_a_request_shows_no_secret() -> None:
    request = TokenRequest(
        "https://idp.example/token", PASSWORD_GRANT, POST, CLIENT_ID, SecretStr(CLIENT_SECRET),
        username=USERNAME, password=SecretStr(PASSWORD), refresh_token=SecretStr("refresh-abc-123"),
        parameters=(("tenant", SecretStr(PARAMETER_SECRET)),), trust_store_pem=b"-----BEGIN...",
    )
    for text in (repr(request), str(request)):
        for secret in (CLIENT_SECRET, PASSWORD, PARAMETER_SECRET, "refresh-abc-123", "BEGIN"):
            assert secret not in text
        assert CLIENT_ID in text


@pytest.mark.parametrize("special", ["", ":%+ &€"])
async def test_a_server_that_echoes_the_request_makes_nothing_leak(
    server: TokenServer, client: TokenClient, special: str
) -> None:
    """A token server that quotes the request in its error text must not make the operator leak it."""
    secrets = {name: f"{name}-value-{special}-0123456789"
               for name in ("client", "password", "param", "refresh")}
    request = token_request(
        server, grant_type=PASSWORD_GRANT, client_auth_method=POST,
        client_secret=SecretStr(secrets["client"]), password=SecretStr(secrets["password"]),
        parameters=(("tenant", SecretStr(secrets["param"])),),
        refresh_token=SecretStr(secrets["refresh"]),
    )
    server.fault = "echo_request"
    error = await fetch_error(client, request, server)

    assert isinstance(error, TokenRequestFailedError)
    assert "cannot handle" in str(error)
    for value in secrets.values():
        for text in (str(error), repr(error)):
            assert value not in text
            assert value[:12] not in text  # not even cut short by the excerpt


# -- the token server's own surface (used by the demo and the e2e tests) ---------------------------------


def test_health_stats_and_metadata(server: TokenServer) -> None:
    with httpx.Client(base_url=server.url) as http:
        assert http.get("/healthz").text == "ok\n"
        stats = http.get("/admin/stats").json()
        assert stats["token_requests"] == 0
        assert stats["knobs"]["lifetime_seconds"] == 3600
        metadata = http.get("/.well-known/oauth-authorization-server").json()
        assert metadata["token_endpoint"] == server.token_url
        assert http.get("/nowhere").status_code == 404
        assert http.get("/oauth2/token").status_code == 405


def test_admin_config_sets_knobs_and_refuses_bad_ones(server: TokenServer) -> None:
    with httpx.Client(base_url=server.url) as http:
        answer = http.post("/admin/config", json={"lifetime_seconds": 30, "fault": "503"})
        assert answer.status_code == 200
        assert (server.lifetime_seconds, server.fault) == (30, "503")
        assert http.post("/admin/config", json={"fault": "earthquake"}).status_code == 400
        assert http.post("/admin/config", json={"no_such_knob": 1}).status_code == 400
        assert http.post("/admin/config", json={"lifetime_seconds": "30"}).status_code == 400
        assert http.post("/admin/config", content=b"[]").status_code == 400
        assert server.fault == "503"
        http.post("/admin/reset")
        assert server.knobs == Knobs()


async def test_the_echo_backend_accepts_only_valid_tokens(server: TokenServer, client: TokenClient) -> None:
    token = (await client.fetch(token_request(server))).access_token.get_secret_value()
    async with httpx.AsyncClient(base_url=server.url) as http:
        answer = await http.get("/api/echo", headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200
        assert answer.json()["client_id"] == CLIENT_ID

        missing = await http.get("/api/echo")
        assert missing.status_code == 401
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")
        forged = await http.get("/api/echo", headers={"Authorization": "Bearer forged"})
        assert 'error="invalid_token"' in forged.headers["WWW-Authenticate"]

        revoked = (await http.post("/admin/revoke-all")).json()["revoked"]
        assert revoked == 1
        assert not server.is_valid(token)
        answer = await http.get("/api/echo", headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 401


async def test_tokens_expire_and_can_be_revoked_one_by_one(server: TokenServer, client: TokenClient) -> None:
    server.lifetime_seconds = 1
    short = (await client.fetch(token_request(server))).access_token.get_secret_value()
    server.lifetime_seconds = 3600
    long = (await client.fetch(token_request(server))).access_token.get_secret_value()
    await asyncio.sleep(1.1)
    assert not server.is_valid(short)
    assert server.is_valid(long)
    assert server.revoke(long)
    assert not server.revoke(long)
    assert not server.is_valid(long)
    assert not server.is_valid("never-issued")


def raw_token_post(server: TokenServer, content: bytes, **headers: str) -> httpx.Response:
    with httpx.Client() as http:
        return http.post(server.token_url, content=content,
                         headers={"Content-Type": "application/x-www-form-urlencoded"} | headers)


def basic(client_id: str = CLIENT_ID, secret: str = CLIENT_SECRET) -> str:
    return basic_authorization(client_id, secret)


@pytest.mark.parametrize(
    ("content", "headers", "status", "error"),
    [
        (b"grant_type=client_credentials", {}, 401, "invalid_client"),
        (b"grant_type=client_credentials", {"Authorization": basic(secret="nope")}, 401, "invalid_client"),
        (b"grant_type=client_credentials", {"Authorization": "Basic !!!"}, 401, "invalid_client"),
        (b"grant_type=implicit", {"Authorization": basic()}, 400, "unsupported_grant_type"),
        (b"scope=x", {"Authorization": basic()}, 400, "invalid_request"),
        (b"grant_type=client_credentials&grant_type=password", {"Authorization": basic()}, 400,
         "invalid_request"),
        (b"grant_type=client_credentials&client_secret=x", {"Authorization": basic()}, 400,
         "invalid_request"),
        (b"grant_type=client_credentials", {"Authorization": basic(), "Content-Type": "application/json"},
         400, "invalid_request"),
        (b"grant_type=password&username=alice", {"Authorization": basic()}, 400, "invalid_request"),
        (b"grant_type=refresh_token", {"Authorization": basic()}, 400, "invalid_request"),
        (b"grant_type=refresh_token&refresh_token=nope", {"Authorization": basic()}, 400, "invalid_grant"),
    ],
)
def test_the_server_answers_rfc6749_errors(
    server: TokenServer, content: bytes, headers: dict[str, str], status: int, error: str
) -> None:
    answer = raw_token_post(server, content, **headers)
    assert answer.status_code == status
    assert answer.json()["error"] == error
    assert answer.headers["Cache-Control"] == "no-store"
    if status == 401:
        assert answer.headers["WWW-Authenticate"].startswith("Basic")


def test_a_successful_answer_is_not_cacheable(server: TokenServer) -> None:
    answer = raw_token_post(server, b"grant_type=client_credentials", Authorization=basic())
    assert answer.status_code == 200
    assert answer.headers["Cache-Control"] == "no-store"
    assert answer.headers["Content-Type"].startswith("application/json")
    assert server.stats()["valid_tokens"] == 1


def test_knobs_are_validated(server: TokenServer) -> None:
    with pytest.raises(ValueError, match="lifetime_seconds"):
        server.lifetime_seconds = 0
    with pytest.raises(ValueError, match="fault"):
        server.fault = "meteor"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="auth_methods"):
        server.add_client("x", "y", auth_methods=())


def test_the_command_line_refuses_a_ca_file_without_tls() -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--ca-out", "/tmp/never-written.pem"])
    assert caught.value.code == 2


async def test_the_command_line_runs_a_tls_server(tmp_path: Path, client: TokenClient) -> None:
    ca_file = tmp_path / "ca.pem"
    process = subprocess.Popen(
        [sys.executable, "-m", "secured_endpoint_devenv.tokenserver", "--tls", "--ca-out", str(ca_file),
         "--client", f"{CLIENT_ID}:{CLIENT_SECRET}", "--lifetime", "30"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), timeout=30)
        token_url = line.rsplit("token endpoint ", 1)[1].rstrip(")\n")
        assert token_url.startswith("https://127.0.0.1:")
        request = TokenRequest(token_url, CLIENT_CREDENTIALS, BASIC, CLIENT_ID, SecretStr(CLIENT_SECRET),
                               trust_store_pem=ca_file.read_bytes())
        response = await client.fetch(request)
        assert response.expires_in == 30
    finally:
        process.terminate()
        assert await asyncio.to_thread(process.wait, 10) == 0
