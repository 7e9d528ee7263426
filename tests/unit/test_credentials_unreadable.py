"""A referenced object the Kubernetes API would not hand over is ``CredentialsUnreadable`` with words that point
at the cause (secured_endpoint.credentials.unreadable_message): the missing RBAC permission for a 403, refused
credentials for a 401, an unreachable apiserver, any other status; never CredentialsNotFound."""

from __future__ import annotations

import pytest

from secured_endpoint import api, kube
from secured_endpoint.credentials import unreadable_message

SECRET, CONFIGMAP = api.SourceRef("Secret", "oauth"), api.SourceRef("ConfigMap", "ca")


@pytest.mark.parametrize(("ref", "error", "expected"), [
    (SECRET, kube.KubeError(403, "Forbidden", 'secrets "oauth" is forbidden: User "x" cannot get resource'),
     "Secret/oauth cannot be read: the operator is not allowed to get secrets in namespace shop (its RBAC needs "
     'get on secrets there): secrets "oauth" is forbidden: User "x" cannot get resource'),
    (CONFIGMAP, kube.KubeError(403, "Forbidden", "no"),
     "ConfigMap/ca cannot be read: the operator is not allowed to get configmaps in namespace shop (its RBAC "
     "needs get on configmaps there): no"),
    (SECRET, kube.KubeError(401, "Unauthorized", ""),
     "Secret/oauth cannot be read: the apiserver refused the operator's credentials (401)"),
    (SECRET, kube.KubeError(0, "Unreachable", "Kubernetes API unreachable: ConnectError"),
     "Secret/oauth cannot be read: the Kubernetes API is unreachable (Kubernetes API unreachable: ConnectError)"),
    (SECRET, kube.KubeError(503, "ServiceUnavailable", "etcd"),
     "Secret/oauth cannot be read: the Kubernetes API answered 503 ServiceUnavailable"),
])
def test_the_message_names_the_cause(ref: api.SourceRef, error: kube.KubeError, expected: str) -> None:
    assert unreadable_message("shop", ref, error) == expected
