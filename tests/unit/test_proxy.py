"""Token requests through an HTTP proxy: the endpoint's own or the environment's, NO_PROXY honoured.

Cases:
- routing decisions: the request's proxy beats the environment; https_proxy/http_proxy/all_proxy by the
  token URL's scheme, lower case first; NO_PROXY with names, suffixes, wildcards, IPs, CIDR ranges, ports and
  ``*``; environment proxy URLs without a scheme or with credentials; a bad one is a permanent failure;
- through the real devenv proxy: CONNECT for https (with the endpoint's trust store and a client
  certificate inside the tunnel), absolute-form requests for http, Proxy-Authorization from credentials
  (refused → 407, permanent, named); NO_PROXY sends a request direct; the proxy down → TokenRequestFailed
  that names the proxy and where it came from; one pooled client per proxy;
- no proxy password in a repr or a message.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from secured_endpoint import api
from secured_endpoint.tokens import (
    ClientCertificate,
    ProxyConfig,
    TokenClient,
    TokenRequest,
    TokenRequestFailedError,
    TrustStoreInvalidError,
)
from secured_endpoint.tokens.proxy import environment_proxy, no_proxy_matches, parse_environment_proxy
from secured_endpoint_devenv.proxy import HttpProxy
from secured_endpoint_devenv.tokenserver import TokenServer

CLIENT_ID = "orders"
CLIENT_SECRET = "orders-secret-1b7c"
PROXY_PASSWORD = "proxy-pass-93ad"


@pytest.fixture
def server() -> Iterator[TokenServer]:
    with TokenServer() as running:
        running.add_client(CLIENT_ID, CLIENT_SECRET)
        yield running


@pytest.fixture
def tls_server() -> Iterator[TokenServer]:
    with TokenServer(tls=True) as running:
        running.add_client(CLIENT_ID, CLIENT_SECRET)
        yield running


@pytest.fixture
def proxy() -> Iterator[HttpProxy]:
    with HttpProxy() as running:
        yield running


def request(server: TokenServer, **fields: object) -> TokenRequest:
    values: dict[str, object] = {
        "token_url": server.token_url, "grant_type": api.GrantType.CLIENT_CREDENTIALS,
        "client_auth_method": api.ClientAuthMethod.CLIENT_SECRET_BASIC, "client_id": CLIENT_ID,
        "client_secret": SecretStr(CLIENT_SECRET),
    }
    if server.token_url.startswith("https:"):
        values["trust_store_pem"] = server.ca_pem
    return TokenRequest(**(values | fields))  # type: ignore[arg-type]


# -- the decision ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("host", "port", "no_proxy", "matches"), [
    ("idp.example.com", 443, "example.com", True),
    ("idp.example.com", 443, ".example.com", True),
    ("idp.example.com", 443, "*.example.com", True),
    ("example.com", 443, ".example.com", True),
    ("badexample.com", 443, "example.com", False),
    ("idp.example.com", 443, "other.org, example.com", True),
    ("idp.example.com", 443, "other.org example.com", True),  # spaces separate too
    ("IDP.Example.COM", 443, "example.com", True),
    ("idp.example.com", 443, "example.com:8443", False),
    ("idp.example.com", 8443, "example.com:8443", True),
    ("10.1.2.3", 443, "10.0.0.0/8", True),
    ("11.1.2.3", 443, "10.0.0.0/8", False),
    ("127.0.0.1", 443, "127.0.0.1", True),
    ("127.0.0.1", 443, "localhost", False),  # names are not resolved
    ("localhost", 443, "127.0.0.1", False),
    ("::1", 443, "::1", True),
    ("fd00::5", 443, "fd00::/8", True),
    ("::1", 8443, "[::1]:8443", True),
    ("anything.org", 443, "*", True),
    ("idp.example.com", 443, "", False),
    ("10.1.2.3", 443, "not-a-cidr/99", False),
])
def test_no_proxy_rules(host: str, port: int, no_proxy: str, matches: bool) -> None:
    assert no_proxy_matches(host, port, no_proxy) is matches


def test_environment_proxy_by_scheme_lower_case_first() -> None:
    environ = {"HTTPS_PROXY": "http://upper:3128", "https_proxy": "http://lower:3128", "HTTP_PROXY": "plain:8080",
               "ALL_PROXY": "http://all:1080"}
    https = environment_proxy("https://idp.example.com/token", environ)
    http = environment_proxy("http://idp.example.com/token", environ)
    assert https is not None
    assert http is not None
    assert (https.url, https.source) == ("http://lower:3128", "HTTPS_PROXY")
    assert (http.url, http.source) == ("http://plain:8080", "HTTP_PROXY")  # no scheme: http://
    only_all = environment_proxy("https://idp.example.com/token", {"ALL_PROXY": "http://all:1080"})
    assert only_all is not None
    assert only_all.source == "ALL_PROXY"
    assert environment_proxy("https://idp.example.com/token", {"HTTP_PROXY": "http://p:1"}) is None
    assert environment_proxy("https://idp.example.com/token",
                             {"HTTPS_PROXY": "http://p:1", "NO_PROXY": ".example.com"}) is None
    assert environment_proxy("https://idp.example.com/token",
                             {"HTTPS_PROXY": "http://p:1", "no_proxy": "other.org", "NO_PROXY": "example.com"}) \
        is not None  # lower case wins here too


def test_environment_proxy_credentials_stay_hidden() -> None:
    proxy = parse_environment_proxy(f"http://alice:{PROXY_PASSWORD.replace('-', '%2D')}@proxy.corp:3128",
                                    source="HTTPS_PROXY")
    assert proxy.url == "http://proxy.corp:3128"
    assert proxy.username == "alice"
    assert proxy.password is not None
    assert proxy.password.get_secret_value() == PROXY_PASSWORD
    for text in (repr(proxy), proxy.label, proxy.pool_key):
        assert PROXY_PASSWORD not in text
    assert proxy.label == "proxy proxy.corp:3128 (HTTPS_PROXY)"


@pytest.mark.parametrize("value", ["socks5://proxy:1080", "http://proxy:99999", "http://"])
def test_a_bad_environment_proxy_is_a_permanent_failure(value: str) -> None:
    with pytest.raises(TokenRequestFailedError) as caught:
        parse_environment_proxy(value, source="HTTPS_PROXY")
    assert caught.value.permanent
    assert "HTTPS_PROXY" in str(caught.value)


def test_the_requests_own_proxy_beats_the_environment(server: TokenServer) -> None:
    client = TokenClient(proxy_environment={"HTTP_PROXY": "http://env-proxy:3128"})
    own = ProxyConfig("http://own-proxy:3128")
    assert client.proxy_for(request(server, proxy=own)) is own
    from_environment = client.proxy_for(request(server))
    assert from_environment is not None
    assert from_environment.url == "http://env-proxy:3128"
    assert TokenClient(trust_env=False).proxy_for(request(server)) is None


def test_a_proxy_config_refuses_credentials_in_the_url() -> None:
    with pytest.raises(ValueError, match="without credentials"):
        ProxyConfig("http://user:pass@proxy:3128")
    with pytest.raises(ValueError, match="both"):
        ProxyConfig("http://proxy:3128", username="alice")


# -- through the real proxy ------------------------------------------------------------------------------


async def test_https_goes_through_a_connect_tunnel(tls_server: TokenServer, proxy: HttpProxy) -> None:
    async with TokenClient(timeout=3, connect_timeout=2, trust_env=False) as client:
        await client.fetch(request(tls_server, proxy=ProxyConfig(proxy.url)))
        await client.fetch(request(tls_server, proxy=ProxyConfig(proxy.url)))
    assert proxy.connects == [f"127.0.0.1:{tls_server.port}"]  # one tunnel, kept alive
    assert [seen.status for seen in tls_server.requests] == [200, 200]


async def test_mutual_tls_inside_the_tunnel(tls_server: TokenServer, proxy: HttpProxy) -> None:
    cert_pem, key_pem = tls_server.issue_client_certificate("tunnelled")
    tls_server.add_client("mtls", tls_client_certificate=cert_pem)
    async with TokenClient(timeout=3, connect_timeout=2, trust_env=False) as client:
        await client.fetch(request(tls_server, client_id="mtls", client_secret=None,
                                   client_auth_method=api.ClientAuthMethod.TLS_CLIENT_AUTH,
                                   client_certificate=ClientCertificate.load(cert_pem, key_pem),
                                   proxy=ProxyConfig(proxy.url)))
    assert tls_server.requests[-1].auth_method == "tls_client_auth"
    assert len(proxy.connects) == 1


async def test_http_goes_as_an_absolute_form_request(server: TokenServer, proxy: HttpProxy) -> None:
    async with TokenClient(timeout=3, connect_timeout=2, trust_env=False) as client:
        await client.fetch(request(server, proxy=ProxyConfig(proxy.url)))
    assert proxy.plain_requests == [server.token_url]
    assert proxy.connects == []
    assert server.requests[-1].status == 200


async def test_proxy_credentials(tls_server: TokenServer) -> None:
    with HttpProxy(credentials=("alice", PROXY_PASSWORD)) as proxy:
        async with TokenClient(timeout=3, connect_timeout=2, trust_env=False) as client:
            await client.fetch(request(tls_server, proxy=ProxyConfig(proxy.url, username="alice",
                                                                     password=SecretStr(PROXY_PASSWORD))))
            assert len(proxy.connects) == 1
            with pytest.raises(TokenRequestFailedError) as missing:
                await client.fetch(request(tls_server, proxy=ProxyConfig(proxy.url)))
            with pytest.raises(TokenRequestFailedError) as wrong:
                await client.fetch(request(tls_server, proxy=ProxyConfig(proxy.url, username="alice",
                                                                         password=SecretStr("not-it-7"))))
    assert missing.value.permanent
    assert str(missing.value) == (f"proxy 127.0.0.1:{proxy.port} (spec.proxy.url) asks for credentials "
                                  "(407 Proxy Authentication Required); set spec.proxy.credentialsSecretRef")
    assert wrong.value.permanent
    assert "refused the proxy credentials" in str(wrong.value)
    assert "not-it-7" not in str(wrong.value)
    assert [refusal.status for refusal in proxy.refused] == [407, 407]


async def test_proxy_credentials_for_plain_http(server: TokenServer) -> None:
    with HttpProxy(credentials=("alice", PROXY_PASSWORD)) as proxy:
        async with TokenClient(timeout=3, connect_timeout=2, trust_env=False) as client:
            await client.fetch(request(server, proxy=ProxyConfig(proxy.url, username="alice",
                                                                 password=SecretStr(PROXY_PASSWORD))))
            with pytest.raises(TokenRequestFailedError, match="asks for credentials") as caught:
                await client.fetch(request(server, proxy=ProxyConfig(proxy.url)))
    assert caught.value.permanent
    assert proxy.plain_requests == [server.token_url]


async def test_the_environment_proxy_and_no_proxy(tls_server: TokenServer, proxy: HttpProxy) -> None:
    environ = {"HTTPS_PROXY": proxy.url, "NO_PROXY": "localhost"}
    async with TokenClient(timeout=3, connect_timeout=2, proxy_environment=environ) as client:
        await client.fetch(request(tls_server))  # 127.0.0.1: through the proxy
        await client.fetch(request(tls_server, token_url=tls_server.token_url.replace("127.0.0.1", "localhost")))
        assert client.pool_size == 2  # one through the proxy, one direct
    assert proxy.connects == [f"127.0.0.1:{tls_server.port}"]
    assert [seen.status for seen in tls_server.requests] == [200, 200]


async def test_a_proxy_that_is_down_is_named(tls_server: TokenServer) -> None:
    proxy = HttpProxy().start()
    url = proxy.url
    proxy.stop()
    async with TokenClient(timeout=3, connect_timeout=2, proxy_environment={"HTTPS_PROXY": url}) as client:
        with pytest.raises(TokenRequestFailedError) as from_spec:
            await client.fetch(request(tls_server, proxy=ProxyConfig(url)))
        with pytest.raises(TokenRequestFailedError) as from_environment:
            await client.fetch(request(tls_server))
    address = url.removeprefix("http://")
    assert str(from_spec.value).startswith(f"cannot connect to proxy {address} (spec.proxy.url) for 127.0.0.1:")
    assert str(from_environment.value).startswith(f"cannot connect to proxy {address} (HTTPS_PROXY) for ")
    assert not from_spec.value.permanent
    assert tls_server.requests == []


async def test_a_destination_the_proxy_refuses(tls_server: TokenServer, proxy: HttpProxy) -> None:
    async with TokenClient(timeout=3, connect_timeout=2, trust_env=False) as client:
        with pytest.raises(TokenRequestFailedError) as caught:
            await client.fetch(request(tls_server, token_url="https://192.0.2.1/token",
                                       proxy=ProxyConfig(proxy.url)))
    assert caught.value.permanent
    assert str(caught.value) == (f"proxy 127.0.0.1:{proxy.port} (spec.proxy.url) does not allow connections to "
                                 "192.0.2.1 (403 Forbidden)")


async def test_one_pooled_client_per_proxy_identity(tls_server: TokenServer) -> None:
    with HttpProxy() as first, HttpProxy() as second:
        async with TokenClient(timeout=3, connect_timeout=2, trust_env=False) as client:
            for proxy_config in (ProxyConfig(first.url), ProxyConfig(second.url), ProxyConfig(first.url),
                                 ProxyConfig(first.url, username="a", password=SecretStr("b"))):
                await client.fetch(request(tls_server, proxy=proxy_config))
            await client.fetch(request(tls_server))
            assert client.pool_size == 4
    assert len(first.connects) == 2
    assert len(second.connects) == 1


async def test_an_https_proxy_verified_with_the_system_trust(tls_server: TokenServer, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """TLS to the proxy, and the token server's TLS inside it; the proxy's certificate is checked against
    the system trust (here SSL_CERT_FILE), the token server's against the endpoint's trust store."""
    with HttpProxy(tls=True, credentials=("alice", PROXY_PASSWORD)) as proxy:
        assert proxy.url.startswith("https://")
        config = ProxyConfig(proxy.url, username="alice", password=SecretStr(PROXY_PASSWORD))
        async with TokenClient(timeout=3, connect_timeout=2, trust_env=False) as client:
            with pytest.raises(TrustStoreInvalidError) as caught:  # certifi does not know the proxy's CA
                await client.fetch(request(tls_server, proxy=config))
        assert f"that of proxy 127.0.0.1:{proxy.port} (spec.proxy.url), checked against the system CAs" in \
            str(caught.value)
        ca_file = tmp_path / "proxy-ca.pem"
        ca_file.write_bytes(proxy.ca_pem)
        monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
        async with TokenClient(timeout=3, connect_timeout=2, proxy_environment={}) as client:
            await client.fetch(request(tls_server, proxy=config))
            await client.fetch(request(tls_server, proxy=config))
    assert proxy.connects == [f"127.0.0.1:{tls_server.port}"]
    assert [seen.status for seen in tls_server.requests] == [200, 200]
