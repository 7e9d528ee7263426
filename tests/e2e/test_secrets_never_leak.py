"""No client secret, password or token ever reaches a log line, an Event or a status.

The scan covers everything the session did before it (this module sorts last among the e2e modules)
plus failure paths of its own: refused client, refused refresh token, an answer that is not JSON, a
server that echoes what it was sent. Every secret value is looked for as is and base64-encoded.
"""

from __future__ import annotations

import base64
import json

import pytest

from secured_endpoint import api
from secured_endpoint_devenv.tokenserver import TokenServer
from tests.conftest import Kube, OperatorProcess, Setup, wait_for

pytestmark = pytest.mark.e2e


def _forms(value: str) -> set[str]:
    encoded = base64.b64encode(value.encode()).decode()
    return {value, encoded.rstrip("=")}


def test_no_secret_in_logs_events_or_status(operator: OperatorProcess, kube: Kube, setup: Setup,
                                            token_server: TokenServer, secret_values: set[str],
                                            operator_processes: list[OperatorProcess]) -> None:
    token_server.configure(lifetime_seconds=3, issue_refresh_tokens=True)
    setup.client(token_server)
    setup.user(token_server)
    setup.endpoint("leak-user", token_server, grantType="Password", passwordSecretRef={"name": "user"})
    setup.endpoint("leak-client", token_server, clientAuthMethod="ClientSecretPost")
    kube.wait_ready(setup.namespace, "leak-user")
    kube.wait_ready(setup.namespace, "leak-client")
    wait_for(lambda: any(r.grant_type == "refresh_token" for r in token_server.requests), timeout=8,
             message="a refresh-token grant")

    for fault, reason in (("invalid_client", "InvalidCredentials"), ("bad_json", "InvalidTokenResponse"),
                          ("html", "InvalidTokenResponse"), ("invalid_grant", "InvalidCredentials")):
        token_server.fault = fault
        kube.patch_endpoint(setup.namespace, "leak-client",
                            {"metadata": {"annotations": {api.REFRESH_ANNOTATION: fault}}})
        kube.wait_ready(setup.namespace, "leak-client", status="False", reason=reason, timeout=10)
    token_server.fault = None
    token_server.revoke_refresh_tokens()
    kube.patch_endpoint(setup.namespace, "leak-user", {"metadata": {"annotations": {
        api.REFRESH_ANNOTATION: "after-revocation"}}})
    kube.wait_ready(setup.namespace, "leak-user", timeout=10)

    # what the session used and what the token servers issued, this test's included
    for request in token_server.requests:
        secret_values.update(filter(None, (request.access_token, request.refresh_token)))
    secret_values.update(issued.access_token for issued in token_server.issued_tokens)
    assert len(secret_values) > 5

    log = "\n".join(process.log_text() for process in operator_processes)
    events = json.dumps([event.to_dict() for event in kube.core.list_event_for_all_namespaces().items],
                        default=str)
    endpoints = json.dumps(kube.custom.list_cluster_custom_object(api.GROUP, api.VERSION, api.PLURAL))
    assert "Fetching a token" in log, "the log must be the operator's, with its refreshes"
    for value in secret_values:
        for form in _forms(value):
            assert form not in log, "a secret value is in the operator log"
            assert form not in events, "a secret value is in an Event"
            assert form not in endpoints, "a secret value is in a SecuredEndpoint"
