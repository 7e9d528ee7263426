"""An endpoint's life: rotation, spec changes, renaming, suspension, forced refresh, deletion, restarts.

Cases:
- the client secret rotates in its Secret → a new token with the new credentials within seconds;
- a spec change that shapes the token (scopes) → a new token at once; one that does not (target
  labels) → the same token, relabelled, and no token request;
- renaming the Secret target → the new Secret is written and the old one removed;
- suspend → Ready=False/Suspended and no token requests; resume → fresh token;
- the annotation secured-endpoint.io/refresh-requested-at forces exactly one refresh per new value;
- deleting the SecuredEndpoint removes its token Secret and the object itself (finalizer released);
- deleting the token Secret by hand → the operator puts it back;
- restarting the operator → no token request for endpoints whose Secret still holds a good token;
  and a Secret rotated while the operator was down is noticed after the restart.
"""

from __future__ import annotations

import time

import pytest

from secured_endpoint import api
from secured_endpoint_devenv.tokenserver import TokenServer
from tests.conftest import Kube, OperatorProcess, Setup, wait_for

pytestmark = pytest.mark.e2e


def test_rotated_client_secret_gives_a_new_token(operator: OperatorProcess, kube: Kube, setup: Setup,
                                                 token_server: TokenServer) -> None:
    client_id, _ = setup.client(token_server)
    setup.endpoint("rotate", token_server)
    kube.wait_ready(setup.namespace, "rotate")
    old = kube.secret_data(setup.namespace, "rotate-token")
    assert old is not None

    token_server.add_client(client_id, "rotated-secret-value")  # the IdP now only knows the new secret
    setup.secret_values.add("rotated-secret-value")
    rotated = time.monotonic()
    kube.update_secret(setup.namespace, "oauth", {"client_secret": "rotated-secret-value"})
    wait_for(lambda: (kube.secret_data(setup.namespace, "rotate-token") or old)["access_token"]
             != old["access_token"], timeout=5, message="a token from the rotated credentials")
    assert time.monotonic() - rotated < 5
    last = token_server.requests[-1]
    assert last.status == 200
    assert last.client_id == client_id
    kube.wait_ready(setup.namespace, "rotate", reason="TokenRefreshed")


def test_spec_changes_that_shape_the_token_and_those_that_do_not(
        operator: OperatorProcess, kube: Kube, setup: Setup, token_server: TokenServer) -> None:
    setup.client(token_server)
    setup.endpoint("spec", token_server, scopes=["a"])
    kube.wait_ready(setup.namespace, "spec")
    first = kube.secret_data(setup.namespace, "spec-token")
    assert first is not None

    kube.patch_endpoint(setup.namespace, "spec", {"spec": {"target": {"secret": {"labels": {"team": "x"}}}}})
    wait_for(lambda: (kube.core.read_namespaced_secret("spec-token", setup.namespace).metadata.labels or {})
             .get("team") == "x", message="the new label on the token Secret")
    assert kube.secret_data(setup.namespace, "spec-token") == first
    assert token_server.token_requests == 1
    generation = (kube.get_endpoint(setup.namespace, "spec") or {})["metadata"]["generation"]
    wait_for(lambda: (kube.get_endpoint(setup.namespace, "spec") or {})["status"]["observedGeneration"]
             == generation, message="observedGeneration to follow")

    kube.patch_endpoint(setup.namespace, "spec", {"spec": {"scopes": ["a", "b"]}})
    wait_for(lambda: token_server.token_requests == 2, timeout=5, message="a token for the new scopes")
    assert token_server.requests[-1].form["scope"] == "a b"
    wait_for(lambda: (kube.secret_data(setup.namespace, "spec-token") or first) != first,
             message="the new token in the Secret")


def test_renaming_the_target_moves_the_secret(operator: OperatorProcess, kube: Kube, setup: Setup,
                                              token_server: TokenServer) -> None:
    setup.client(token_server)
    setup.endpoint("move", token_server)
    wait_for(lambda: kube.secret_data(setup.namespace, "move-token"), message="the first Secret")
    kube.patch_endpoint(setup.namespace, "move", {"spec": {"target": {"secret": {"name": "moved"}}}})
    wait_for(lambda: kube.secret_data(setup.namespace, "moved"), message="the renamed Secret")
    wait_for(lambda: kube.secret_data(setup.namespace, "move-token") is None, message="the old Secret gone")
    status = (kube.get_endpoint(setup.namespace, "move") or {})["status"]
    assert status["targets"]["secret"]["name"] == "moved"


def test_suspend_and_resume(operator: OperatorProcess, kube: Kube, setup: Setup,
                            token_server: TokenServer) -> None:
    token_server.lifetime_seconds = 3
    setup.client(token_server)
    setup.endpoint("pause", token_server)
    kube.wait_ready(setup.namespace, "pause")
    kube.patch_endpoint(setup.namespace, "pause", {"spec": {"suspend": True}})
    kube.wait_ready(setup.namespace, "pause", status="False", reason="Suspended")
    count = token_server.token_requests
    time.sleep(4)
    assert token_server.token_requests == count, "a suspended endpoint must not request tokens"
    kube.patch_endpoint(setup.namespace, "pause", {"spec": {"suspend": False}})
    kube.wait_ready(setup.namespace, "pause", timeout=5)
    assert token_server.token_requests > count


def test_refresh_annotation_forces_one_refresh(operator: OperatorProcess, kube: Kube, setup: Setup,
                                               token_server: TokenServer) -> None:
    setup.client(token_server)
    setup.endpoint("force", token_server)
    kube.wait_ready(setup.namespace, "force")
    assert token_server.token_requests == 1
    kube.patch_endpoint(setup.namespace, "force",
                        {"metadata": {"annotations": {api.REFRESH_ANNOTATION: "2026-11-28T10:00:00Z"}}})
    wait_for(lambda: token_server.token_requests == 2, timeout=5, message="the forced refresh")
    wait_for(lambda: (kube.get_endpoint(setup.namespace, "force") or {})["status"].get("lastRefreshRequest")
             == "2026-11-28T10:00:00Z", message="the handled request in the status")
    time.sleep(2)
    assert token_server.token_requests == 2, "one value of the annotation forces one refresh"
    kube.patch_endpoint(setup.namespace, "force",
                        {"metadata": {"annotations": {api.REFRESH_ANNOTATION: "2026-11-28T10:05:00Z"}}})
    wait_for(lambda: token_server.token_requests == 3, timeout=5, message="the second forced refresh")


def test_delete_cleans_up(operator: OperatorProcess, kube: Kube, setup: Setup,
                          token_server: TokenServer) -> None:
    setup.client(token_server)
    setup.endpoint("gone", token_server)
    wait_for(lambda: kube.secret_data(setup.namespace, "gone-token"), message="the token Secret")
    kube.delete_endpoint(setup.namespace, "gone")
    wait_for(lambda: kube.get_endpoint(setup.namespace, "gone") is None, timeout=5,
             message="the SecuredEndpoint to be deleted")
    assert kube.secret_data(setup.namespace, "gone-token") is None
    assert kube.secret_data(setup.namespace, "oauth") is not None, "credentials are the user's: kept"


def test_deleted_token_secret_is_put_back(operator: OperatorProcess, kube: Kube, setup: Setup,
                                          token_server: TokenServer) -> None:
    setup.client(token_server)
    setup.endpoint("back", token_server)
    first = wait_for(lambda: kube.secret_data(setup.namespace, "back-token"), message="the token Secret")
    kube.core.delete_namespaced_secret("back-token", setup.namespace)
    again = wait_for(lambda: kube.secret_data(setup.namespace, "back-token"), timeout=5,
                     message="the token Secret to come back")
    assert again == first, "the token still valid in memory is written back, not a new one fetched"
    assert token_server.token_requests == 1


def test_restart_requests_no_token_it_already_has(operator: OperatorProcess, kube: Kube, setup: Setup,
                                                  token_server: TokenServer) -> None:
    setup.client(token_server)
    setup.client(token_server, secret_name="oauth-2")
    setup.endpoint("keep-1", token_server)
    setup.endpoint("keep-2", token_server, clientSecretRef={"name": "oauth-2"})
    kube.wait_ready(setup.namespace, "keep-1")
    kube.wait_ready(setup.namespace, "keep-2")
    before = {name: kube.secret_data(setup.namespace, f"{name}-token") for name in ("keep-1", "keep-2")}
    assert token_server.token_requests == 2

    operator.stop()
    kube.update_secret(setup.namespace, "oauth-2", {"unrelated": "touched while the operator was down"})
    operator.start()
    # the operator lists the Secrets of every t-* namespace of the session before it plans: allow for that
    wait_for(lambda: token_server.token_requests == 3, timeout=20,
             message="a refresh for the Secret that changed while the operator was down")
    time.sleep(3)
    assert token_server.token_requests == 3, "the untouched endpoint must not ask for a token again"
    assert kube.secret_data(setup.namespace, "keep-1-token") == before["keep-1"]
    kube.wait_ready(setup.namespace, "keep-1")
    kube.wait_ready(setup.namespace, "keep-2")
