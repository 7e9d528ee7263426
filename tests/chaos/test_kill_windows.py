"""Chaos: the operator SIGKILLed inside the two windows of a refresh (scenario 1's windows, made exact with the
apiserver proxy's hold knob). One endpoint, 60 s tokens; a refresh forced with the refresh annotation.

(a) between "token fetched" and "Secret written": the token Secret's write is held at the proxy, the operator
    killed, the held write dropped (its client is dead: it never reaches the apiserver), a new operator
    started. The Secret and the status still agree on the old token, but the annotation was never acted on
    (``lastRefreshRequest`` is unchanged): the new operator fetches exactly one new token.
(b) between "Secret written" and "status patched": the Secret write goes through, the status PATCH is held,
    the operator killed, the PATCH dropped, a new operator started. The Secret holds a token the status does
    not name, and the annotation is still unhandled: the new operator fetches exactly one new token too (it does
    not adopt the token in the Secret: the forced refresh is owed, and the status only ever names a token a
    target holds) and writes it to the Secret, then the status.

For each, within 30 s of the restart: Ready for its generation, the refresh request acted on, the status'
``tokenFingerprint`` equal to the token Secret's and new, exactly one token Secret, and a sampler never saw an
expired or half-written token.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from secured_endpoint import api
from secured_endpoint_devenv.apiproxy import HELD_DROPPED, ApiProxy, Match
from secured_endpoint_devenv.tokenserver import TokenServer
from tests.chaos.conftest import Chaos, TokenSampler, decode, ready_for_generation, report
from tests.conftest import Kube, OperatorProcess, Setup, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]

NAME = "e-1"
SECRET_WRITE = Match(methods={"POST", "PUT", "PATCH"}, path=rf"/secrets(/{NAME}-token)?$")
STATUS_PATCH = Match(methods={"PATCH"}, path=rf"/securedendpoints/{NAME}/status$")
WINDOWS = {"a: fetched, Secret not written": SECRET_WRITE, "b: Secret written, status not patched": STATUS_PATCH}


@pytest.fixture
def apiproxy(kube: Kube) -> Iterator[ApiProxy]:
    """Requested before ``chaos``, so that it outlives the chaos fixture's teardown (which needs the operator)."""
    with ApiProxy.for_control_plane(kube.control_plane) as proxy:
        yield proxy


def _secret_fingerprint(chaos: Chaos) -> str | None:
    secrets = chaos.token_secrets()
    return decode(secrets[0]).get("fingerprint") if len(secrets) == 1 else None


def _status(chaos: Chaos) -> dict[str, Any]:
    return chaos.kube.get_endpoint(chaos.namespace, NAME).get("status") or {}  # type: ignore[union-attr]


@pytest.mark.parametrize("window", list(WINDOWS))
def test_sigkill_inside_a_refresh(window: str, apiproxy: ApiProxy, chaos: Chaos, token_server: TokenServer,
                                  secret_values: set[str]) -> None:
    token_server.lifetime_seconds = 60
    setup = Setup(chaos.kube, chaos.namespace, secret_values)
    setup.client(token_server)
    kubeconfig = apiproxy.write_kubeconfig(chaos.tmp_path / "kubeconfig-via-proxy")
    chaos.operator = OperatorProcess(kubeconfig=kubeconfig, log_path=chaos.operator.log_path,
                                     scope=chaos.operator.scope, env=chaos.operator.env)
    chaos.operator.start()
    sampler = TokenSampler(chaos.kube, chaos.namespace, [token_server], alive=lambda: {NAME}, interval=0.05)
    setup.endpoint(NAME, token_server)
    wait_for(lambda: ready_for_generation(chaos.kube.get_endpoint(chaos.namespace, NAME) or {"metadata": {}}),
             timeout=15, message="the endpoint Ready")
    old = _status(chaos)["tokenFingerprint"]
    assert _secret_fingerprint(chaos) == old
    sampler.start()
    try:
        hold = apiproxy.hold(WINDOWS[window])
        before_refresh = token_server.token_requests
        request = datetime.now(UTC).isoformat()
        chaos.kube.patch_endpoint(chaos.namespace, NAME,
                                  {"metadata": {"annotations": {api.REFRESH_ANNOTATION: request}}})
        assert hold.held.wait(15), "the write to hold never came"
        assert token_server.token_requests == before_refresh + 1, "the token was fetched"
        in_secret = _secret_fingerprint(chaos)
        if WINDOWS[window] is SECRET_WRITE:
            assert in_secret == old, "the Secret was not written yet"
        else:
            assert in_secret not in (None, old), "the Secret holds the new token already"
        assert _status(chaos)["tokenFingerprint"] == old, "the status names the old token"
        chaos.kill()
        assert hold.client_gone.wait(5), "the proxy saw the killed operator's connection close"
        if WINDOWS[window] is SECRET_WRITE:
            hold.release()  # dropped all the same: its client is dead
        else:
            hold.drop()
        assert hold.outcomes == ["dropped"]
        assert HELD_DROPPED in [exchange.fault for exchange in apiproxy.exchanges()]

        before_restart = token_server.token_requests
        restarted = time.monotonic()
        chaos.new_operator().start()

        def recovered() -> bool:
            endpoint = chaos.kube.get_endpoint(chaos.namespace, NAME) or {"metadata": {}}
            status = endpoint.get("status") or {}
            return (ready_for_generation(endpoint) and status.get("lastRefreshRequest") == request
                    and status.get("tokenFingerprint") not in (None, old)
                    and status.get("tokenFingerprint") == _secret_fingerprint(chaos))

        wait_for(recovered, timeout=30, interval=0.1, message="Ready with the Secret's token after the restart")
        recovery_s = time.monotonic() - restarted
        time.sleep(1)  # anything still on its way would show in the counts below
        restart_token_requests = token_server.token_requests - before_restart
        final = _status(chaos)["tokenFingerprint"]
    finally:
        sampler.stop()

    report(f"kill window {window[0]}", recovery_after_restart_s=round(recovery_s, 2),
           token_requests_by_the_restart=restart_token_requests, kept_the_secret_token=final == in_secret,
           sampler_reads=sampler.reads, expired_tokens_observed=len(sampler.expired),
           half_written_observed=len(sampler.broken), tokens_lost=len(sampler.lost))
    assert len(chaos.token_secrets()) == 1
    assert _secret_fingerprint(chaos) == final
    assert restart_token_requests == 1, "the owed refresh: one new token, no more"
    assert final != in_secret, "a token fetched after the restart, not the one the killed operator got"
    assert sampler.expired == [] and sampler.broken == [] and sampler.lost == []  # noqa: PT018
