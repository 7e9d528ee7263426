"""The chaos suite's apiserver proxy (secured_endpoint_devenv.apiproxy).

Cases:
- pure parts: which requests a Match takes (writes by default, a path regex), how one draw picks a fault from
  shares laid end to end (and none past their sum; non-matching faults take no share), what kind a path is,
  a retry's digest equals the original's, and the gaps between a 429 and its retry;
- through the real proxy in front of a real HTTPS server (the devenv token server): a throttled POST never
  reaches the server and carries Retry-After; a POST failed after forwarding reached it once and was answered
  503; a held request waits until released and then reaches the server; a dropped one never does, nor one
  released after its client left.
"""

from __future__ import annotations

import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from secured_endpoint_devenv.apiproxy import (
    FAIL_AFTER,
    FAIL_BEFORE,
    HELD_DROPPED,
    THROTTLE,
    ApiProxy,
    Fault,
    Match,
    choose_fault,
    path_kind,
    request_digest,
    retry_gaps,
)
from secured_endpoint_devenv.tokenserver import TokenServer

SECRET = "/api/v1/namespaces/ns/secrets/e-1-token"
STATUS = "/apis/secured-endpoint.io/v1alpha1/namespaces/ns/securedendpoints/e-1/status"


def test_a_match_takes_writes_by_default_and_searches_the_path() -> None:
    assert Match().matches("post", SECRET)
    assert Match().matches("DELETE", SECRET)
    assert not Match().matches("GET", SECRET)
    assert Match(methods={"PATCH"}, path=r"/secrets/e-1-token$").matches("PATCH", SECRET)
    assert not Match(methods={"PATCH"}, path=r"/secrets/e-1-token$").matches("PATCH", SECRET + "x")
    assert not Match(methods={"PATCH"}, path=r"/secrets/e-1-token$").matches("POST", SECRET)
    assert Match(methods={"GET"}).matches("GET", "/readyz")


def test_one_draw_picks_from_shares_laid_end_to_end() -> None:
    throttle, before = Fault(THROTTLE, 0.3), Fault(FAIL_BEFORE, 0.1)
    faults = [throttle, before]
    assert choose_fault(faults, "POST", SECRET, 0.0) is throttle
    assert choose_fault(faults, "POST", SECRET, 0.299) is throttle
    assert choose_fault(faults, "POST", SECRET, 0.3) is before
    assert choose_fault(faults, "POST", SECRET, 0.399) is before
    assert choose_fault(faults, "POST", SECRET, 0.41) is None
    assert choose_fault(faults, "GET", SECRET, 0.0) is None  # not a write


def test_a_fault_that_does_not_match_takes_no_share() -> None:
    events_only, after = Fault(FAIL_BEFORE, 0.5, Match(path=r"/events$")), Fault(FAIL_AFTER, 0.2)
    assert choose_fault([events_only, after], "PATCH", SECRET, 0.1) is after
    assert choose_fault([events_only, after], "POST", "/api/v1/namespaces/ns/events", 0.1) is events_only
    assert choose_fault([events_only, after], "POST", "/api/v1/namespaces/ns/events", 0.6) is after


def test_a_fault_is_checked() -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        Fault("500", 0.1)
    with pytest.raises(ValueError, match="share"):
        Fault(THROTTLE, 1.5)


@pytest.mark.parametrize(("path", "kind"), [
    (SECRET, "secrets"),
    ("/api/v1/namespaces/ns/secrets", "secrets"),
    ("/api/v1/namespaces/ns/events", "events"),
    (STATUS, "securedendpoints/status"),
    ("/apis/secured-endpoint.io/v1alpha1/namespaces/ns/securedendpoints/e-1", "securedendpoints"),
    ("/apis/secured-endpoint.io/v1alpha1/securedendpoints", "securedendpoints"),
    ("/apis/coordination.k8s.io/v1/namespaces/default/leases/sep", "leases"),
    ("/api/v1/namespaces/ns", "namespaces"),
    ("/api/v1/namespaces", "namespaces"),
    ("/readyz", "/readyz"),
])
def test_path_kinds(path: str, kind: str) -> None:
    assert path_kind(path) == kind


def test_a_retry_has_the_digest_of_the_original() -> None:
    original = request_digest("PATCH", SECRET, "", b'{"data": 1}')
    assert request_digest("patch", SECRET, "", b'{"data": 1}') == original
    assert request_digest("PATCH", SECRET, "", b'{"data": 2}') != original
    assert request_digest("PUT", SECRET, "", b'{"data": 1}') != original
    assert request_digest("PATCH", SECRET, "dryRun=All", b'{"data": 1}') != original


@dataclass(frozen=True)
class _Seen:
    at: float
    digest: str
    status: int


def test_retry_gaps_pair_a_429_with_the_next_same_request() -> None:
    seen = [_Seen(10.0, "a", 429), _Seen(10.5, "b", 200), _Seen(11.2, "a", 429), _Seen(12.4, "a", 201),
            _Seen(13.0, "c", 429)]  # "c" was never retried
    assert [round(gap, 2) for gap in retry_gaps(reversed(seen))] == [1.2, 1.2]


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[tuple[TokenServer, Path]]:
    server = TokenServer(tls=True).start()
    ca = tmp_path / "ca.pem"
    ca.write_bytes(server.ca_pem)
    yield server, ca
    server.stop()


@pytest.fixture
def proxy(upstream: tuple[TokenServer, Path]) -> Iterator[ApiProxy]:
    server, ca = upstream
    with ApiProxy(server.url, ca, seed=1) as running:
        yield running


def _post(url: str) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(url, data=b"grant_type=client_credentials", method="POST",
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers)


def test_a_throttled_write_never_reaches_the_server(proxy: ApiProxy, upstream: tuple[TokenServer, Path]) -> None:
    server, _ = upstream
    proxy.add_fault(Fault(THROTTLE, 1.0, retry_after=3))
    status, headers = _post(proxy.url + "/oauth2/token")
    assert (status, headers.get("Retry-After")) == (429, "3")
    assert server.token_requests == 0
    [exchange] = proxy.exchanges()
    assert (exchange.method, exchange.fault, exchange.upstream_status, exchange.status) == ("POST", THROTTLE, None, 429)


def test_a_write_failed_after_forwarding_reached_the_server(proxy: ApiProxy,
                                                            upstream: tuple[TokenServer, Path]) -> None:
    server, _ = upstream
    proxy.add_fault(Fault(FAIL_AFTER, 1.0))
    assert _post(proxy.url + "/oauth2/token")[0] == 503
    assert server.token_requests == 1
    [exchange] = proxy.exchanges()
    assert exchange.fault == FAIL_AFTER and exchange.upstream_status == 401  # noqa: PT018 - no client: refused
    proxy.clear_faults()
    assert _post(proxy.url + "/oauth2/token")[0] == 401  # forwarded as it is
    assert proxy.counts()[("POST", "/oauth2/token")] == 2


def test_a_held_request_waits_for_its_release(proxy: ApiProxy, upstream: tuple[TokenServer, Path]) -> None:
    server, _ = upstream
    hold = proxy.hold(Match(methods={"POST"}, path=r"/token$"))
    answers: list[int] = []
    client = threading.Thread(target=lambda: answers.append(_post(proxy.url + "/oauth2/token")[0]))
    client.start()
    assert hold.held.wait(10)
    assert server.token_requests == 0 and answers == []  # noqa: PT018
    hold.release()
    client.join(10)
    assert answers == [401] and server.token_requests == 1  # noqa: PT018
    assert _post(proxy.url + "/oauth2/token")[0] == 401  # only the first is held
    assert hold.outcomes == ["forwarded"]


def test_a_dropped_request_never_reaches_the_server(proxy: ApiProxy, upstream: tuple[TokenServer, Path]) -> None:
    server, _ = upstream
    hold = proxy.hold(Match(methods={"POST"}))
    failures: list[str] = []

    def send() -> None:
        try:
            _post(proxy.url + "/oauth2/token")
        except OSError as exc:  # the connection closed without an answer
            failures.append(type(exc).__name__)

    client = threading.Thread(target=send)
    client.start()
    assert hold.held.wait(10)
    hold.drop()
    client.join(10)
    assert failures and server.token_requests == 0  # noqa: PT018
    assert [exchange.fault for exchange in proxy.exchanges()] == [HELD_DROPPED]


def test_a_held_request_whose_client_left_is_dropped_on_release(proxy: ApiProxy,
                                                                upstream: tuple[TokenServer, Path]) -> None:
    server, _ = upstream
    hold = proxy.hold(Match(methods={"POST"}))
    body = b"grant_type=client_credentials"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
        client.sendall(b"POST /oauth2/token HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                       b"Content-Type: application/x-www-form-urlencoded\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert hold.held.wait(10)
    # the client is gone (as a SIGKILLed operator's connections are)
    assert hold.client_gone.wait(10)
    hold.release()
    assert hold.outcomes == ["dropped"] and server.token_requests == 0  # noqa: PT018
    assert [exchange.fault for exchange in proxy.exchanges()] == [HELD_DROPPED]
