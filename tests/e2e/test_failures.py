"""When things go wrong, the last valid token stays, the status says why, and nothing is hammered.

Cases:
- token server down → the token stays in the Secret, Ready=False/TokenRequestFailed says until when
  it is usable; the server comes back → Ready=True again, by itself;
- invalid_client → Ready=False/InvalidCredentials, and the status plans the next attempt 30-60 s later, after a
  second refusal 60-120 s (the permanent backoff of docs/contract.md §5.4);
- a non-RFC 6749 answer (HTML) → InvalidTokenResponse, previous token kept;
- the referenced Secret is missing → CredentialsNotFound naming it, no token request at all; creating
  the Secret mends it within seconds, with no polling in between;
- a key missing from the Secret → CredentialsNotFound naming the key;
- a Secret of the target's name that the operator does not own is never overwritten (TargetWriteFailed);
- Redis target asked for while the operator has no Redis → TargetWriteFailed saying so, the Secret
  target still written.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta

import pytest

from secured_endpoint import api
from secured_endpoint_devenv.tokenserver import TokenServer
from tests.conftest import Kube, OperatorProcess, Setup, wait_for

pytestmark = pytest.mark.e2e


def test_token_server_down_keeps_the_token_and_recovers(operator: OperatorProcess, kube: Kube, setup: Setup,
                                                        token_server: TokenServer) -> None:
    token_server.lifetime_seconds = 30
    setup.client(token_server)
    setup.endpoint("down", token_server, refresh={"refreshBeforeSeconds": 28})
    kube.wait_ready(setup.namespace, "down")
    before = kube.secret_data(setup.namespace, "down-token")
    assert before is not None

    token_server.stop()
    condition = kube.wait_ready(setup.namespace, "down", status="False", reason="TokenRequestFailed",
                                timeout=10)
    assert "usable until" in condition["message"]
    assert kube.secret_data(setup.namespace, "down-token") == before, "the valid token must stay"
    status = (kube.get_endpoint(setup.namespace, "down") or {})["status"]
    assert status["consecutiveFailures"] >= 1
    # the Event is posted beside the status write, a moment after it
    wait_for(lambda: "TokenRequestFailed" in {event.reason for event in kube.events(setup.namespace)}, timeout=5,
             message="a TokenRequestFailed Event")

    token_server.start()
    kube.wait_ready(setup.namespace, "down", timeout=15)
    after = kube.secret_data(setup.namespace, "down-token")
    assert after is not None
    assert after["access_token"] != before["access_token"]


def _planned_retry(kube: Kube, namespace: str, name: str, failures: int) -> timedelta:
    """How long after the ``failures``-th consecutive failure the status plans the next attempt."""
    status = wait_for(lambda: (s := (kube.get_endpoint(namespace, name) or {}).get("status") or {})
                      .get("consecutiveFailures") == failures and s, message=f"{failures} failure(s) recorded")
    return _time(status["nextRefreshTime"]) - _time(status["lastFailureTime"])


def _time(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def test_invalid_client_is_not_hammered(operator: OperatorProcess, kube: Kube, setup: Setup,
                                        token_server: TokenServer) -> None:
    """The permanent backoff of docs/contract.md §5.4, read from the status: 30-60 s after the first refusal,
    60-120 s after the second (a forced refresh asks again at once, and is refused again)."""
    setup.client(token_server)
    token_server.fault = "invalid_client"
    setup.endpoint("refused", token_server)
    condition = kube.wait_ready(setup.namespace, "refused", status="False", reason="InvalidCredentials")
    assert "invalid_client" in condition["message"]
    second = timedelta(seconds=1)  # the status' timestamps have second precision
    first_retry = _planned_retry(kube, setup.namespace, "refused", 1)
    assert timedelta(seconds=30) - second <= first_retry <= timedelta(seconds=60) + second, first_retry
    assert token_server.token_requests == 1

    kube.patch_endpoint(setup.namespace, "refused", {"metadata": {"annotations": {api.REFRESH_ANNOTATION: "again"}}})
    wait_for(lambda: token_server.token_requests == 2, message="the forced refresh's request")
    second_retry = _planned_retry(kube, setup.namespace, "refused", 2)
    assert timedelta(seconds=60) - second <= second_retry <= timedelta(seconds=120) + second, second_retry
    assert token_server.token_requests == 2, "nothing asked before the planned retry"


def test_html_answer_is_an_invalid_token_response(operator: OperatorProcess, kube: Kube, setup: Setup,
                                                  token_server: TokenServer) -> None:
    token_server.lifetime_seconds = 30
    setup.client(token_server)
    setup.endpoint("html", token_server, refresh={"refreshBeforeSeconds": 28})
    kube.wait_ready(setup.namespace, "html")
    before = kube.secret_data(setup.namespace, "html-token")
    token_server.fault = "html"
    kube.wait_ready(setup.namespace, "html", status="False", reason="InvalidTokenResponse", timeout=10)
    assert kube.secret_data(setup.namespace, "html-token") == before


def test_missing_secret_then_created(operator: OperatorProcess, kube: Kube, setup: Setup,
                                     token_server: TokenServer) -> None:
    token_server.add_client("late-client", "late-secret-value")
    setup.secret_values.add("late-secret-value")
    setup.endpoint("late", token_server, clientSecretRef={"name": "late-oauth"})
    condition = kube.wait_ready(setup.namespace, "late", status="False", reason="CredentialsNotFound")
    assert "Secret/late-oauth" in condition["message"]
    time.sleep(2)
    assert token_server.token_requests == 0

    created = time.monotonic()
    kube.create_secret(setup.namespace, "late-oauth",
                       {"client_id": "late-client", "client_secret": "late-secret-value"})
    kube.wait_ready(setup.namespace, "late", timeout=5)
    assert time.monotonic() - created < 5
    assert token_server.token_requests == 1


def test_missing_key_is_named(operator: OperatorProcess, kube: Kube, setup: Setup,
                              token_server: TokenServer) -> None:
    kube.create_secret(setup.namespace, "oauth", {"client_id": "someone"})
    setup.endpoint("nokey", token_server)
    condition = kube.wait_ready(setup.namespace, "nokey", status="False", reason="CredentialsNotFound")
    assert "client_secret" in condition["message"]
    assert "Secret/oauth" in condition["message"]


def test_foreign_secret_is_never_overwritten(operator: OperatorProcess, kube: Kube, setup: Setup,
                                             token_server: TokenServer) -> None:
    setup.client(token_server)
    kube.create_secret(setup.namespace, "taken-token", {"mine": "do not touch"})
    setup.endpoint("taken", token_server)
    condition = kube.wait_ready(setup.namespace, "taken", status="False", reason="TargetWriteFailed")
    assert "Secret/taken-token" in condition["message"]
    assert "not managed" in condition["message"]
    assert kube.secret_data(setup.namespace, "taken-token") == {"mine": "do not touch"}

    # choosing another name mends it
    kube.patch_endpoint(setup.namespace, "taken", {"spec": {"target": {"secret": {"name": "taken-2"}}}})
    kube.wait_ready(setup.namespace, "taken")
    assert kube.secret_data(setup.namespace, "taken-2") is not None
    assert kube.secret_data(setup.namespace, "taken-token") == {"mine": "do not touch"}


def test_redis_target_without_redis_is_reported(operator: OperatorProcess, kube: Kube, setup: Setup,
                                                token_server: TokenServer) -> None:
    setup.client(token_server)
    setup.endpoint("cache", token_server, target={"secret": {}, "redis": {"enabled": True}})
    condition = kube.wait_ready(setup.namespace, "cache", status="False", reason="TargetWriteFailed")
    assert "Redis" in condition["message"]
    assert "SEP_REDIS" in condition["message"]
    wait_for(lambda: kube.secret_data(setup.namespace, "cache-token"), message="the Secret target")
