"""The apiserver bearer token as the official loaders leave it (secured_endpoint.kube._bearer_of): the
in-cluster loader writes ``bearer <token>`` in lower case, a kubeconfig ``Bearer <token>``; both must give the
bare token, or every request in a Pod is sent as ``Bearer bearer …`` and refused (401)."""

from __future__ import annotations

import pytest
from kubernetes import client

from secured_endpoint import kube


@pytest.mark.parametrize(("key", "stored"), [
    ("authorization", "bearer eyJ.in-cluster"),  # kubernetes.config.load_incluster_config
    ("authorization", "Bearer eyJ.in-cluster"),  # a kubeconfig's token
    ("BearerToken", "bearer eyJ.in-cluster"),
])
def test_the_bare_token(key: str, stored: str) -> None:
    configuration = client.Configuration()
    configuration.api_key = {key: stored}
    assert kube._bearer_of(configuration) == "eyJ.in-cluster"


def test_no_token() -> None:
    assert kube._bearer_of(client.Configuration()) is None
