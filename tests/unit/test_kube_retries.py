"""The Kubernetes client's pure decisions: which failures are retried, how long to wait, when to relist.

- ``retryable``: a 429 is retried for every method (the server did not act); a 5xx or a connection lost
  mid-request only for idempotent methods — never a POST, which may have been applied; a connection that
  could not be opened is retried even for a POST (nothing was sent); 4xx other than 429 never.
- ``retry_delay``: ``Retry-After`` in seconds is honoured up to 30 s; without it (or in the HTTP-date form)
  the jittered backoff doubles from 0.4 s up to 5 s, never below half its ceiling.
- ``needs_relist``: a watch ERROR event saying 410 Gone/Expired or "resourceVersion too large" means a
  fresh LIST; any other Status (500, 403, 429) means a retry of the same watch.
- ``collection_path``: cluster-wide and namespaced core collections.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import aiohttp
import pytest

from secured_endpoint import kube


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE", "POST", "get", "post"])
def test_429_is_retried_for_every_method(method: str) -> None:
    assert kube.retryable(method, status=429)


@pytest.mark.parametrize("status", [500, 502, 503, 504])
@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE"])
def test_5xx_is_retried_for_idempotent_methods(method: str, status: int) -> None:
    assert kube.retryable(method, status=status)


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_a_post_is_never_repeated_after_a_5xx(status: int) -> None:
    assert not kube.retryable("POST", status=status)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 410, 422, 501])
@pytest.mark.parametrize("method", ["GET", "PATCH", "POST"])
def test_other_errors_are_not_retried(method: str, status: int) -> None:
    assert not kube.retryable(method, status=status)


# what aiohttp raises once the request may have gone out: a reset, a dropped keep-alive connection, a broken
# body, silence past the read timeout, the overall deadline
_MAYBE_SENT = [aiohttp.ClientOSError(104, "reset"), aiohttp.ServerDisconnectedError(),
               aiohttp.ClientPayloadError("cut"), aiohttp.SocketTimeoutError(), TimeoutError()]
_CONNECTION = SimpleNamespace(host="127.0.0.1", port=6443, ssl=True)  # what the error's text names
# raised before a byte went out: the connection could not be opened
_NOT_SENT = [aiohttp.ClientConnectorError(_CONNECTION, ConnectionRefusedError(111, "refused")),  # type: ignore[arg-type]
             aiohttp.ConnectionTimeoutError()]


@pytest.mark.parametrize("error", _MAYBE_SENT, ids=lambda error: type(error).__name__)
def test_a_post_is_not_repeated_once_it_may_have_reached_the_server(error: Exception) -> None:
    assert isinstance(error, kube.TRANSPORT_ERRORS)
    assert not kube.retryable("POST", transport_error=error)
    assert kube.retryable("GET", transport_error=error)
    assert kube.retryable("PATCH", transport_error=error)


@pytest.mark.parametrize("error", _NOT_SENT, ids=lambda error: type(error).__name__)
def test_a_post_is_retried_when_nothing_was_sent(error: Exception) -> None:
    assert isinstance(error, kube.TRANSPORT_ERRORS)
    assert kube.retryable("POST", transport_error=error)


def test_retry_after_seconds_are_honoured_up_to_a_cap() -> None:
    assert kube.retry_delay("7", 1) == 7.0
    assert kube.retry_delay(" 0 ", 3) == 0.0
    assert kube.retry_delay("3600", 1) == kube.MAX_RETRY_AFTER_SECONDS == 30.0


def test_the_retry_after_a_failed_request_carries() -> None:
    """What a KubeError tells its catcher to wait (the controller waits that long before writing again)."""
    assert kube.retry_after_seconds("2") == 2.0
    assert kube.retry_after_seconds("3600") == kube.MAX_RETRY_AFTER_SECONDS
    assert kube.retry_after_seconds(None) is None
    assert kube.retry_after_seconds("Wed, 21 Oct 2026 07:28:00 GMT") is None
    assert kube.KubeError(429, "TooManyRequests", "slow down", retry_after=2.0).retry_after == 2.0
    assert kube.KubeError(503, "ServiceUnavailable", "").retry_after is None


@pytest.mark.parametrize("header", [None, "", "soon", "-1", "1.5", "Wed, 21 Oct 2015 07:28:00 GMT"])
def test_without_usable_retry_after_the_backoff_doubles_to_its_cap(header: str | None) -> None:
    rng = random.Random(7)
    for attempt, ceiling in [(1, 0.4), (2, 0.8), (3, 1.6), (4, 3.2), (5, 5.0), (9, 5.0)]:
        delays = [kube.retry_delay(header, attempt, rng=rng) for _ in range(200)]
        assert min(delays) >= ceiling / 2, (attempt, min(delays))
        assert max(delays) <= ceiling, (attempt, max(delays))
        assert max(delays) - min(delays) > ceiling / 4  # jittered, not a fixed delay


@pytest.mark.parametrize("status", [
    {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old resource version: 202 (214)"},
    {"kind": "Status", "code": 410, "reason": "Gone",
     "message": "The resourceVersion for the provided watch is too old."},
    {"kind": "Status", "reason": "Expired"},
    {"kind": "Status", "code": 504, "reason": "Timeout", "message": "Too large resource version",
     "details": {"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}]}},
])
def test_watch_errors_that_need_a_fresh_list(status: dict[str, object]) -> None:
    assert kube.needs_relist(status)


@pytest.mark.parametrize("status", [
    {"kind": "Status", "code": 500, "reason": "InternalError", "message": "etcdserver: leader changed"},
    {"kind": "Status", "code": 403, "reason": "Forbidden"},
    {"kind": "Status", "code": 429, "reason": "TooManyRequests"},
    {"kind": "Status", "code": 504, "reason": "Timeout", "details": {"causes": [{"reason": "Other"}]}},
    {},
])
def test_watch_errors_that_only_need_a_retry(status: dict[str, object]) -> None:
    assert not kube.needs_relist(status)


def test_collection_paths() -> None:
    assert kube.collection_path("secrets") == "/api/v1/secrets"
    assert kube.collection_path("configmaps", "team-a") == "/api/v1/namespaces/team-a/configmaps"


@pytest.mark.parametrize(("environment", "server", "proxy"), [
    ({}, "https://10.0.0.1:6443", None),
    ({"HTTPS_PROXY": "http://proxy:3128"}, "https://10.0.0.1:6443", "http://proxy:3128"),
    ({"https_proxy": "http://proxy:3128", "NO_PROXY": "10.0.0.1"}, "https://10.0.0.1:6443", None),
    ({"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": "10.0.0.0/8"}, "https://10.96.0.1:443", None),
    ({"HTTPS_PROXY": "http://proxy:3128", "no_proxy": ".svc,.cluster.local"}, "https://kubernetes.default.svc",
     None),
    ({"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": ".svc"}, "https://api.example.com", "http://proxy:3128"),
    ({"HTTP_PROXY": "http://plain:3128"}, "https://10.0.0.1:6443", None),  # only https_proxy serves https
    ({"ALL_PROXY": "http://all:3128"}, "https://10.0.0.1:6443", "http://all:3128"),
])
def test_the_api_client_takes_its_proxy_from_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                              environment: dict[str, str], server: str,
                                                              proxy: str | None) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY",
                 "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    found = kube.environment_proxy(server)
    assert (found.url if found is not None else None) == proxy


def test_proxy_credentials_come_apart_and_a_bad_proxy_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://user:p%40ss@proxy:3128")
    found = kube.environment_proxy("https://10.0.0.1:6443")
    assert found is not None
    assert (found.url, found.username) == ("http://proxy:3128", "user")
    assert found.password is not None
    assert found.password.get_secret_value() == "p@ss"
    monkeypatch.setenv("HTTPS_PROXY", "socks5://proxy:1080")
    with pytest.raises(kube.KubeError, match="HTTPS_PROXY is not an http:// or https:// proxy URL"):
        kube.environment_proxy("https://10.0.0.1:6443")
